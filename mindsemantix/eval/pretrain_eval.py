"""Does stage-1 pretraining help? Two measures on the simulated study (results: docs/stage1.md).

1. Masked-voxel reconstruction, with the masks of BrainMAE's validation metric (the export's mask
   ratio, the same seeded per-batch masks, the same subject-homogeneous batches of the same val
   split, mean over repetitions): per sample, Pearson correlation between prediction and truth over
   the hidden voxels (`masked_pearson`, exactly the logged `val/masked_corr`), averaged per subject.
   Predictors, all on the same masks:
     pretrained       the exported MAE (encoder + decoder)
     random_init      the same architecture at its initialisation (same seed), for reference
     voxel_mean       each hidden voxel's training-set mean
     neighbour_interp each hidden voxel := mean of its k nearest *visible* voxels in mm space
                      (the subject's voxel coordinates, as the encoder's tokenizer uses them)
     wiener           a strong linear reference, not a "simple" baseline: the Gaussian conditional
                      mean E[hidden | visible] under the training set's voxel covariance, shrunk
                      towards its diagonal (shrinkage chosen on held-out training samples)
2. Linear probe of stimulus features from frozen, unmasked encoder features (tokens mean-pooled,
   `_mean`, and all tokens concatenated, `_all`, which is what stage 2's queries can read), for the
   pretrained encoder, the randomly initialised one, and raw voxels (mean over repetitions):
   ridge regression (closed form, per-target penalty by exact leave-one-out error on train),
   trained on the train split, scored on the test split (mean over repetitions). Targets come from
   the simulator's ground truth (`toyworld_truth/truth.hdf5`, features indexed by nsd id =
   image_id): categorical ones (background, layout, count, relation, object shape / colour / size)
   are scored by accuracy of the arg-max over one-hot ridge outputs, continuous ones (object
   position, radius) by R^2 on test.

    python -m mindsemantix.eval.pretrain_eval --export runs/demo/pretrain/export \
        --truth data/toyworld/nsd/toyworld_truth/truth.hdf5 --out runs/demo/pretrain/pretrain_eval.json

`--data` defaults to the datasets of the run that wrote the export (`<export>/../config.yaml`), as do
the val batch size and mask seed. Writes the JSON and a markdown table beside it (`.md`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mindsemantix.io import atomic_path, write_json_atomic
from mindsemantix.numerics import ridge_path

log = logging.getLogger(__name__)

PREDICTORS = ("pretrained", "random_init", "voxel_mean", "neighbour_interp", "wiener")
ALPHAS = tuple(10.0 ** np.arange(-3, 6))  # relative to the mean eigenvalue of the feature Gram matrix
# Probed by default: scene-level attributes and the first object's.
DEFAULT_TARGETS = r"^(background|layout|count|relation|object0\.(shape|colour|large|x|y|radius))$"


# ---------------------------------------------------------------------------------------------
# Masked reconstruction


def neighbour_interpolate(x: np.ndarray, mask: np.ndarray, coords_mm: np.ndarray, k: int = 6) -> np.ndarray:
    """x (B, V), mask (B, V) True = hidden, coords_mm (V, 3) -> (B, V): every hidden voxel replaced
    by the mean of its k nearest visible voxels (Euclidean mm); visible voxels are kept."""
    from scipy.spatial import cKDTree

    out = np.array(x, dtype=np.float32, copy=True)
    for b in range(len(x)):
        hidden, visible = np.flatnonzero(mask[b]), np.flatnonzero(~mask[b])
        if len(hidden) == 0 or len(visible) == 0:
            continue
        kk = min(k, len(visible))
        _, nearest = cKDTree(coords_mm[visible]).query(coords_mm[hidden], k=kk)  # (H, kk)
        out[b, hidden] = x[b, visible[nearest.reshape(len(hidden), kk)]].mean(1)
    return out


@dataclass
class Wiener:
    """Linear Gaussian interpolation: hidden = mu_h + C_hv C_vv^-1 (visible - mu_v)."""

    mean: np.ndarray   # (V,)
    cov: np.ndarray    # (V, V) shrunk covariance
    shrink: float

    def __call__(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """x (B, V), mask (B, V) True = hidden -> (B, V) with hidden voxels predicted."""
        out = np.array(x, dtype=np.float64, copy=True)
        for b in range(len(x)):
            h, v = mask[b], ~mask[b]
            if h.any() and v.any():
                coef = np.linalg.solve(self.cov[np.ix_(v, v)], x[b, v] - self.mean[v])   # (n_visible,)
                out[b, h] = self.mean[h] + self.cov[np.ix_(h, v)] @ coef
        return out


def fit_wiener(x: np.ndarray, voxel_patch: np.ndarray, mask_ratio: float,
               shrinks: Sequence[float] = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95), n_holdout: int = 100,
               seed: int = 0) -> Wiener:
    """Covariance of x (N, V) shrunk as (1 - s) S + s diag(S); s maximises the masked correlation on
    `n_holdout` held-out samples under random patch masks (voxel_patch (V,): each voxel's token)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float64)
    order = rng.permutation(len(x))
    held, fit = x[order[:n_holdout]], x[order[n_holdout:]]
    n_patches = int(voxel_patch.max()) + 1
    n_hidden = min(max(n_patches - round(n_patches * (1 - mask_ratio)), 1), n_patches - 1)
    mask = np.stack([np.isin(voxel_patch, rng.permutation(n_patches)[:n_hidden]) for _ in held])  # (H, V)

    def shrunk(a: np.ndarray, s: float) -> np.ndarray:
        c = np.cov(a, rowvar=False)
        return (1 - s) * c + s * np.diag(np.diag(c))

    scores = {s: per_sample_corr(Wiener(fit.mean(0), shrunk(fit, s), s)(held, mask), held, mask).mean() for s in shrinks}
    best = max(scores, key=scores.get)
    return Wiener(x.mean(0), shrunk(x, best), best)


def per_sample_corr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, V) x3 -> (B,) Pearson over the hidden voxels of each sample (the stage's metric)."""
    from mindsemantix.numerics import masked_pearson

    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    return masked_pearson(t(pred), t(target), torch.as_tensor(np.asarray(mask))).numpy()


@torch.no_grad()
def masked_reconstruction(encoders: dict[str, Any], batches: Iterable[dict[str, Any]], coords: dict[str, np.ndarray],
                          train_mean: dict[str, np.ndarray], mask_seed: int, k: int = 6,
                          wiener: dict[str, Wiener] | None = None, total: int | None = None
                          ) -> dict[str, dict[str, list[float]]]:
    """{subject: {predictor: per-sample correlations}} over `batches` (the val loader's, in order:
    batch i gets the masks of generator seed mask_seed + i, as in BrainMAE.validation_step)."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, batch in enumerate(tqdm(batches, total=total, desc="masked reconstruction", unit="batch")):
        subject, x = batch["subject"], batch["fmri"].float()          # x (B, V)
        preds, mask = {}, None
        for name, enc in encoders.items():
            gen = torch.Generator().manual_seed(mask_seed + i)
            res = enc.forward_mae(x, subject, generator=gen)
            if mask is not None and not torch.equal(mask, res.mask):
                raise RuntimeError("encoders drew different masks from the same seed")
            mask, preds[name] = res.mask, res.pred.numpy()             # (B, V) bool, (B, V)
        xn, mn = x.numpy(), mask.numpy()
        preds["voxel_mean"] = np.broadcast_to(train_mean[subject], xn.shape)
        preds["neighbour_interp"] = neighbour_interpolate(xn, mn, coords[subject], k)
        if wiener is not None:
            preds["wiener"] = wiener[subject](xn, mn)
        for name, pred in preds.items():
            out[subject][name].extend(per_sample_corr(pred, xn, mn).tolist())
    return {s: dict(v) for s, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Linear probe


def ridge_loo_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, groups: Sequence[slice],
                      alphas: Sequence[float] = ALPHAS) -> tuple[np.ndarray, list[float]]:
    """Ridge with intercept from x (N, F) to y (N, D); predictions for x_test (M, F) -> (M, D).

    The path of `mindsemantix.numerics.ridge_path` (one thin SVD, so the cost grows with F only
    linearly): each column group in `groups` (one target: a one-hot block or one column) gets the
    penalty with the smallest summed leave-one-out MSE. Returns (predictions, alphas).
    """
    path = ridge_path(x_train, y_train, alphas)
    x_test = np.asarray(x_test, np.float64) - path.svd.x_mean
    out = np.empty((len(x_test), path.loo.shape[1]))
    chosen, weights = [], {}
    for g in groups:
        best = path.alphas[int(np.argmin(path.loo[:, g].sum(1)))]
        if best not in weights:
            weights[best] = path.weights(best)                       # (F, D)
        out[:, g] = x_test @ weights[best][:, g] + path.y_mean[g]
        chosen.append(best)
    return out, chosen


def probe_targets(features: np.ndarray, names: Sequence[str], pattern: str = DEFAULT_TARGETS
                  ) -> dict[str, dict[str, Any]]:
    """Truth features (N, F) with `names` -> {target: {"kind", "y" (N, D), "valid" (N,) bool}}.

    "a=b" columns form one categorical target "a" (rows where none is set are invalid, e.g. the
    relation of a single object); other columns with at most 10 integer values are categorical
    too (count, object0.large), the rest continuous. Columns of "objectK.*" are valid only where
    objectK.present is 1. Targets that do not match `pattern` or are constant are left out.
    """
    features = np.asarray(features, np.float64)
    columns: dict[str, list[int]] = defaultdict(list)
    for j, name in enumerate(names):
        columns[name.split("=")[0]].append(j)
    out = {}
    for target, cols in columns.items():
        if not re.search(pattern, target):
            continue
        m = re.match(r"(object\d+)\.", target)
        valid = np.ones(len(features), bool)
        if m and f"{m.group(1)}.present" in names:
            valid &= features[:, list(names).index(f"{m.group(1)}.present")] > 0.5
        if "=" in names[cols[0]]:
            y = features[:, cols]
            valid &= y.sum(1) > 0.5
            kind = "categorical"
        else:
            v = features[:, cols[0]]
            values = np.unique(v[valid])
            if len(values) <= 10 and np.allclose(values, np.round(values)):
                y, kind = (v[:, None] == values[None]).astype(np.float64), "categorical"
            else:
                y, kind = v[:, None], "continuous"
        if valid.sum() < 3 or len(np.unique(y[valid], axis=0)) < 2:
            continue
        out[target] = {"kind": kind, "y": y, "valid": valid}
    return out


def probe_scores(x_train: np.ndarray, x_test: np.ndarray, targets_train: dict[str, dict[str, Any]],
                 targets_test: dict[str, dict[str, Any]], alphas: Sequence[float] = ALPHAS) -> dict[str, dict[str, float]]:
    """Ridge probes from features (N, F) / (M, F) to every target; {target: {"score", "chance", "metric"}}.

    Features are z-scored with training statistics. Targets with the same valid rows share one Gram
    eigendecomposition. Categorical: accuracy of the arg-max (chance: the training majority class);
    continuous: R^2 on test (chance: 0, predicting the test mean).
    """
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    by_rows: dict[bytes, list[str]] = defaultdict(list)
    for name, t in targets_train.items():
        if targets_test[name]["valid"].any():
            by_rows[t["valid"].tobytes() + targets_test[name]["valid"].tobytes()].append(name)
    out = {}
    for names in by_rows.values():
        tr_rows = targets_train[names[0]]["valid"]
        te_rows = targets_test[names[0]]["valid"]
        ys, groups, start = [], [], 0
        for name in names:
            y = targets_train[name]["y"][tr_rows]
            ys.append(y)
            groups.append(slice(start, start + y.shape[1]))
            start += y.shape[1]
        pred, alphas_used = ridge_loo_predict(x_train[tr_rows], np.concatenate(ys, 1), x_test[te_rows], groups, alphas)
        for name, g, a in zip(names, groups, alphas_used):
            y_tr, y_te, p = targets_train[name]["y"][tr_rows], targets_test[name]["y"][te_rows], pred[:, g]
            if targets_train[name]["kind"] == "categorical":
                truth = y_te.argmax(1)
                score = float((p.argmax(1) == truth).mean())
                chance = float((truth == y_tr.sum(0).argmax()).mean())
                metric = "accuracy"
            else:
                sst = float(((y_te - y_te.mean(0)) ** 2).sum()) or 1e-12
                score, chance, metric = 1.0 - float(((y_te - p) ** 2).sum()) / sst, 0.0, "r2"
            out[name] = {"score": score, "chance": chance, "metric": metric, "alpha": a, "n_test": int(te_rows.sum())}
    return out


def few_samples(split: dict[str, np.ndarray], n: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded random subset of n samples (in their original order) of one subject's split arrays."""
    if n < 3:
        raise ValueError(f"--probe-train-size {n}: a probe needs at least 3 training samples")
    count = len(split["image_id"])
    if n > count:
        raise ValueError(f"--probe-train-size {n}: the training split has only {count} samples for a subject")
    keep = np.sort(np.random.default_rng(seed).permutation(count)[:n])
    return {k: v[keep] for k, v in split.items()}


@torch.no_grad()
def encoder_tokens(encoder, subject: str, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Frozen, unmasked encoder output: x (N, V) -> tokens (N, T, D)."""
    return np.concatenate([encoder.forward_features(torch.from_numpy(np.asarray(x[i:i + batch_size], np.float32)),
                                                    subject).numpy() for i in range(0, len(x), batch_size)])


def pooled(tokens: np.ndarray, pool: str) -> np.ndarray:
    """(N, T, D) -> (N, D) mean over tokens ("mean") or (N, T*D) all of them ("all")."""
    return tokens.mean(1) if pool == "mean" else tokens.reshape(len(tokens), -1)


# ---------------------------------------------------------------------------------------------
# Data


def load_split(roots: Sequence[str | Path], split: str) -> dict[str, dict[str, np.ndarray]]:
    """{subject: {"x": (N, V) mean over repetitions, "image_id": (N,)}} of a split over several
    datasets (those without the split add nothing), sorted by key."""
    from mindsemantix.data.shards import ShardDataset
    from mindsemantix.data.arrays import load_split_arrays

    parts = defaultdict(list)  # subject -> its SplitArrays from each dataset
    for root in roots:
        if split in ShardDataset(root, verify="none").splits:
            for subject, a in load_split_arrays(root, split, captions=False, image_ids=True, verify="none").items():
                parts[subject].append(a)
    out = {}
    for subject, arrays in parts.items():
        order = np.argsort([k for a in arrays for k in a.keys], kind="stable")
        out[subject] = {"x": np.concatenate([a.x for a in arrays])[order],
                        "image_id": np.concatenate([a.image_ids for a in arrays])[order]}
    return out


def load_truth(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """(features (n_images, F) indexed by nsd id, feature names) of the simulator's truth.hdf5."""
    import h5py

    with h5py.File(path, "r") as f:
        if "features" not in f:
            raise ValueError(f"{path}: no 'features' dataset; is this the simulator's toyworld_truth/truth.hdf5?")
        return np.asarray(f["features"], np.float64), list(json.loads(f.attrs["feature_names"]))


def run_defaults(export: Path) -> dict[str, Any]:
    """datasets / val batch size / mask seed / seed of the run that wrote `export`, if it left its
    config.yaml beside the export folder."""
    cfg_path = export.parent / "config.yaml"
    if not cfg_path.is_file():
        return {}
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    data = cfg.get("data") or {}
    model = (cfg.get("model") or {}).get("init_args") or {}
    datasets = data.get("datasets")
    return {k: v for k, v in {
        "data": [datasets] if isinstance(datasets, str) else datasets,
        "batch_size": data.get("eval_batch_size") or data.get("batch_size"),
        "mask_seed": model.get("val_mask_seed"),
        "seed": cfg.get("seed_everything") if isinstance(cfg.get("seed_everything"), int) else None,
    }.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Report


def summarise(values: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    per_subject = {s: {p: float(np.mean(v)) for p, v in preds.items()} | {"n": len(next(iter(preds.values())))}
                   for s, preds in sorted(values.items())}
    overall = {p: float(np.mean([per_subject[s][p] for s in per_subject])) for p in PREDICTORS
               if all(p in r for r in per_subject.values())}
    return {"per_subject": per_subject, "overall_mean_of_subjects": overall}


def markdown(result: dict[str, Any]) -> str:
    mc = result["masked_corr"]
    o = mc["overall_mean_of_subjects"]
    preds = [p for p in PREDICTORS if p in o]
    lines = [f"Masked-voxel Pearson r on `{result['split']}` ({result['mask_ratio']:.0%} of voxels hidden "
             f"in patches, seeded masks as in training's val metric; mean over samples):", "",
             "| subject | n | " + " | ".join(preds) + " |", "|---|---|" + "---|" * len(preds)]
    for s, r in mc["per_subject"].items():
        lines.append(f"| {s} | {r['n']} | " + " | ".join(f"{r[p]:.3f}" for p in preds) + " |")
    lines.append("| **mean of subjects** | | " + " | ".join(f"**{o[p]:.3f}**" for p in preds) + " |")
    probe = result.get("probe")
    if probe:
        cols = probe["columns"]
        size = f", {probe['train_size']} samples per subject" if probe.get("train_size") else ""
        lines += ["", f"Linear probe (ridge, leave-one-out penalty on `{probe['train_split']}`{size}, scored on "
                  f"`{probe['test_split']}`; frozen unmasked encoder, tokens `_mean`-pooled or `_all` kept; "
                  "accuracy or R^2, mean of subjects):", "",
                  "| target | metric | chance | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
        for t, r in probe["overall_mean_of_subjects"].items():
            lines.append(f"| {t} | {r['metric']} | {r['chance']:.3f} | " + " | ".join(f"{r[f]:.3f}" for f in cols) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, type=Path, help="stage-1 export folder (with its MAE decoder)")
    p.add_argument("--data", nargs="+", default=None, help="shard datasets (default: those of the run that wrote the export)")
    p.add_argument("--truth", type=Path, default=None, help="simulator truth.hdf5 for the probe (default: no probe)")
    p.add_argument("--out", required=True, type=Path, help="JSON to write (and a .md table beside it)")
    p.add_argument("--split", choices=["val", "test"], default="val",
                   help="split for masked reconstruction (default val, as training's metric)")
    p.add_argument("--probe-train-split", default="train")
    p.add_argument("--probe-test-split", default="test")
    p.add_argument("--probe-train-size", type=int, default=None,
                   help="fit the probes on this many training samples per subject (seeded random subset; "
                        "default all): does pretraining help when labels are few?")
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="regex over truth target names (default: scene + object0)")
    p.add_argument("--pool", nargs="+", choices=["mean", "all"], default=["mean", "all"],
                   help="probe encoder features: tokens mean-pooled (N, D) and/or all tokens (N, T*D)")
    p.add_argument("--neighbours", type=int, default=6, help="k of the neighbour-interpolation baseline")
    p.add_argument("--no-wiener", action="store_true", help="skip the linear (Wiener) reference")
    p.add_argument("--batch-size", type=int, default=None, help="val batch size (default: the run's, else 32)")
    p.add_argument("--mask-seed", type=int, default=None, help="val mask seed (default: the run's, else 1234)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random-init encoder (default: the run's, else 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    return p.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from mindsemantix.data.datamodule import BrainDataModule
    from mindsemantix.models.brain_encoder import BrainEncoder

    if not (args.export / "config.json").is_file():
        raise FileNotFoundError(f"{args.export}: no stage-1 export here (config.json missing); "
                                "run `mindsemantix fit --config stages/pretrain.yaml` first")
    defaults = run_defaults(args.export)
    data = args.data or defaults.get("data")
    if not data:
        raise ValueError(f"--data not given and {args.export.parent / 'config.yaml'} names no datasets")
    for d in data:
        if not (Path(d) / "manifest.json").is_file():
            origin = "" if args.data else f" (named by {args.export.parent / 'config.yaml'}; give --data to override)"
            raise FileNotFoundError(f"{d}: not a shard dataset (manifest.json missing){origin}")
    if args.truth is not None and not args.truth.is_file():
        raise FileNotFoundError(f"--truth {args.truth}: no such file")
    batch_size = args.batch_size or defaults.get("batch_size", 32)
    mask_seed = args.mask_seed if args.mask_seed is not None else defaults.get("mask_seed", 1234)
    seed = args.seed if args.seed is not None else defaults.get("seed", 0)

    pretrained = BrainEncoder.from_pretrained(args.export, with_decoder=True).eval()
    torch.manual_seed(seed)
    random_init = BrainEncoder(pretrained.config).eval()
    for s in pretrained.subjects:
        random_init.add_subject(s, pretrained.tokenizers[s].coords_mm)
    encoders = {"pretrained": pretrained, "random_init": random_init}

    dm = BrainDataModule(data, batch_size=batch_size, verify="none")  # the val loader of training
    dm.setup("validate")
    info = dm.subject_info()
    missing = sorted(set(info) - set(pretrained.subjects))
    if missing:
        raise ValueError(f"subjects {missing} of the data are not in the export {args.export} ({pretrained.subjects})")
    coords = {s: i.coords_mm for s, i in info.items()}
    train = load_split(data, "train")
    train_mean = {s: a["x"].mean(0) for s, a in train.items()}
    wiener = None
    if not args.no_wiener:
        wiener = {s: fit_wiener(train[s]["x"], pretrained.tokenizers[s].voxel_patch.numpy(), pretrained.config.mask_ratio,
                                n_holdout=min(100, len(train[s]["x"]) // 4), seed=seed)
                  for s in tqdm(sorted(train), desc="fitting Wiener reference", unit="subject")}
    loader = dm.val_dataloader() if args.split == "val" else dm.test_dataloader()
    corr = masked_reconstruction(encoders, loader, coords, train_mean, mask_seed, args.neighbours, wiener, total=len(loader))
    result: dict[str, Any] = {
        "export": str(args.export), "data": [str(d) for d in data], "split": args.split,
        "mask_ratio": pretrained.config.mask_ratio, "mask_seed": mask_seed, "batch_size": batch_size,
        "neighbours": args.neighbours, "random_init_seed": seed,
        "wiener_shrinkage": {s: w.shrink for s, w in (wiener or {}).items()}, "masked_corr": summarise(corr)}

    if args.truth is not None:
        features, names = load_truth(args.truth)
        probe_train = train if args.probe_train_split == "train" else load_split(data, args.probe_train_split)
        test = load_split(data, args.probe_test_split)
        per_subject = {}
        subjects = sorted(s for s in test if s in probe_train)
        for s in tqdm(subjects, desc="linear probes", unit="subject"):
            tr, te = probe_train[s], test[s]
            if args.probe_train_size is not None:
                tr = few_samples(tr, args.probe_train_size, seed)
            ids = np.concatenate([tr["image_id"], te["image_id"]])
            if ids.min() < 0 or ids.max() >= len(features):
                continue  # not a subject of the simulated study (e.g. an image-less corpus)
            # targets from train + test together, so both get the same one-hot columns
            both, n = probe_targets(features[ids], names, args.targets), len(tr["image_id"])
            t_tr = {k: v | {"y": v["y"][:n], "valid": v["valid"][:n]} for k, v in both.items()}
            t_te = {k: v | {"y": v["y"][n:], "valid": v["valid"][n:]} for k, v in both.items()}
            tokens = {name: (encoder_tokens(enc, s, tr["x"]), encoder_tokens(enc, s, te["x"])) for name, enc in encoders.items()}
            feats = {f"{name}_{pool}": (pooled(tok_tr, pool), pooled(tok_te, pool))
                     for pool in args.pool for name, (tok_tr, tok_te) in tokens.items()}
            feats["raw_voxels"] = (tr["x"], te["x"])
            scores = {name: probe_scores(f_tr, f_te, t_tr, t_te) for name, (f_tr, f_te) in feats.items()}
            first = scores["raw_voxels"]
            per_subject[s] = {t: {"metric": first[t]["metric"], "chance": first[t]["chance"], "n_test": first[t]["n_test"]}
                              | {f: scores[f][t]["score"] for f in feats} for t in first}
        if not per_subject:
            raise ValueError(f"no subject of {data} has images in {args.truth}")
        columns = list(feats)
        some = next(iter(per_subject.values()))
        overall = {t: {"metric": some[t]["metric"]}
                   | {k: float(np.mean([r[t][k] for r in per_subject.values() if t in r])) for k in ["chance"] + columns}
                   for t in some}
        result["probe"] = {"train_split": args.probe_train_split, "train_size": args.probe_train_size,
                           "test_split": args.probe_test_split, "pools": args.pool,
                           "columns": columns, "truth": str(args.truth), "per_subject": per_subject,
                           "overall_mean_of_subjects": overall}
    return result


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = evaluate(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"pretrain_eval: error: {e}", file=sys.stderr)
        return 2
    table = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        Path(tmp).write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
