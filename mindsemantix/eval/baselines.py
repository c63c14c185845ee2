"""Baselines that the model is compared with in the same evaluation run (`baselines.<name>` in eval.json, docs/formats.md).

Captions:
- `chance`: for every test image, one caption of a random training image (seeded).
- `ridge_retrieval`: per subject, closed-form ridge regression from voxels (mean over repetitions)
  to the all-MiniLM-L6-v2 embedding of the image's training captions (mean of its captions'
  unit embeddings, renormalised); the prediction is the training caption whose embedding is
  nearest (cosine) to the predicted one. The ridge penalty is chosen per subject by exact
  leave-one-out error on the training set, over a log grid.
Images:
- `chance`: the seen images shuffled (a derangement: no image is paired with itself).
- `ridge_latent` (with `--diffusion`): per subject, ridge from voxels to the Stable Diffusion VAE's
  latent of the seen image (the same target as stage 3's head), decoded by the same VAE — the
  classic linear low-level decoder (as in Takagi & Nishimoto's z-path and Ozcelik's VDVAE path).
- `caption_only`, `latent_only` come from stage 3 as image folders.

Everything works on plain arrays (tested alone); `load_split_arrays` and `main` wire it to a
shard dataset: `python -m mindsemantix.eval.baselines --data SHARDS --out DIR` writes
references.jsonl, chance.jsonl, ridge_retrieval.jsonl, seen/ and chance_images/ for the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mindsemantix.data.arrays import SplitArrays, load_split_arrays, mean_repetitions  # noqa: F401 (re-exported)
from mindsemantix.eval.captions import MemoEncoder
from mindsemantix.numerics import DEFAULT_ALPHAS, CentredSVD, RidgeFit, fit_ridge  # noqa: F401 (re-exported)
from mindsemantix.io import atomic_dir, atomic_path, write_json_atomic

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# Chance


def chance_captions(test_keys: Sequence[str], train_captions: Mapping[str, Sequence[str]], seed: int = 0
                    ) -> dict[str, str]:
    """{test key: one caption of a uniformly drawn training image} (seeded, order-independent)."""
    if not train_captions:
        raise ValueError("chance captions need training captions")
    train_keys = sorted(train_captions)
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(test_keys):
        caps = train_captions[train_keys[rng.integers(len(train_keys))]]
        out[key] = caps[rng.integers(len(caps))]
    return out


def derangement(keys: Sequence[str], seed: int = 0) -> dict[str, str]:
    """{key: another key}, a random permutation with no fixed point (for shuffled seen images)."""
    keys = sorted(keys)
    if len(keys) < 2:
        raise ValueError("shuffling needs at least 2 images")
    rng = np.random.default_rng(seed)
    # a random cyclic shift of a random order never maps an element to itself
    order = rng.permutation(len(keys))
    shift = int(rng.integers(1, len(keys)))
    return {keys[order[i]]: keys[order[(i + shift) % len(keys)]] for i in range(len(keys))}


# ---------------------------------------------------------------------------------------------
# Ridge -> nearest training caption


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


def caption_targets(captions: Sequence[Sequence[str]], encoder) -> np.ndarray:
    """Per image: the renormalised mean of its captions' unit embeddings, (N, D)."""
    flat = [c for caps in captions for c in caps]
    emb = _unit(np.asarray(encoder.encode(flat), dtype=np.float64))
    out, start = [], 0
    for caps in captions:
        out.append(emb[start:start + len(caps)].mean(0))
        start += len(caps)
    return _unit(np.stack(out))


def ridge_caption_retrieval(x_train: np.ndarray, captions_train: Sequence[Sequence[str]], x_test: np.ndarray,
                            encoder, *, candidates: Sequence[str] | None = None,
                            alphas: Sequence[float] = DEFAULT_ALPHAS) -> tuple[list[str], RidgeFit]:
    """Predict a sentence embedding from voxels, return the nearest candidate caption per test row.

    x_train (N, V) voxels (mean over repetitions, or their `CentredSVD`), captions_train N lists of
    captions, x_test (M, V).
    candidates: the captions to retrieve from (default: every training caption, deduplicated).
    """
    if len(captions_train) != len(x_train):
        raise ValueError(f"{len(x_train)} training rows but {len(captions_train)} caption lists")
    fit = fit_ridge(x_train, caption_targets(captions_train, encoder), alphas)
    pool = list(dict.fromkeys(candidates if candidates is not None else (c for caps in captions_train for c in caps)))
    pool_emb = _unit(np.asarray(encoder.encode(pool), dtype=np.float64))  # (C, D)
    predicted = _unit(fit.predict(x_test))  # (M, D)
    nearest = np.argmax(predicted @ pool_emb.T, axis=1)
    return [pool[i] for i in nearest], fit


def caption_baselines(train: Mapping[str, SplitArrays], test: Mapping[str, SplitArrays], encoder, seed: int = 0,
                      alphas: Sequence[float] = DEFAULT_ALPHAS) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """{"chance": {key: caption}, "ridge_retrieval": {key: caption}} and fit info per subject."""
    encoder = MemoEncoder(encoder)  # the ridge targets and the retrieval pool are the same captions
    train_captions = {k: caps for arr in train.values() for k, caps in zip(arr.keys, arr.captions)}
    test_keys = [k for arr in test.values() for k in arr.keys]
    baselines = {"chance": chance_captions(test_keys, train_captions, seed), "ridge_retrieval": {}}
    info: dict[str, Any] = {}
    for subject, arr in test.items():
        if subject not in train:
            raise ValueError(f"subject {subject!r} has test samples but no training samples")
        preds, fit = ridge_caption_retrieval(train[subject].svd, train[subject].captions, arr.x, encoder, alphas=alphas)
        baselines["ridge_retrieval"].update(zip(arr.keys, preds))
        info[subject] = {"n_train": len(train[subject].keys), "alpha_relative": fit.alpha}
    return baselines, info


def ridge_latent_images(train: Mapping[str, SplitArrays], test: Mapping[str, SplitArrays], diffusion: str,
                        alphas: Sequence[float] = DEFAULT_ALPHAS, batch_size: int = 64
                        ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """{test key: (H, W, 3) uint8 image decoded from a ridge-predicted VAE latent}, fit info per subject.

    `train` and `test` need images. The VAE is the diffusion model's own (a hub id or diffusers folder).
    """
    import torch

    from mindsemantix.models.diffusion import Reconstructor, load_stable_diffusion

    rec = Reconstructor(load_stable_diffusion(diffusion))

    def encode(images: Sequence[np.ndarray]) -> np.ndarray:  # N x (H, W, 3) -> (N, C*h*w)
        out = []
        for i in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.stack(images[i:i + batch_size])).permute(0, 3, 1, 2)
            out.append(rec.encode_images(batch).flatten(1).float().numpy())
        return np.concatenate(out)

    images: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {}
    for subject, arr in test.items():
        if subject not in train or train[subject].images is None:
            raise ValueError(f"subject {subject!r}: ridge_latent needs its training images")
        fit = fit_ridge(train[subject].svd, encode(train[subject].images), alphas)
        predicted = torch.from_numpy(fit.predict(arr.x)).float().view(len(arr.x), *rec.latent_shape)
        for i in range(0, len(arr.keys), batch_size):
            decoded = rec.decode_latents(predicted[i:i + batch_size]).permute(0, 2, 3, 1).numpy()
            images.update(zip(arr.keys[i:i + batch_size], decoded))
        info[subject] = {"n_train": len(train[subject].keys), "alpha_relative": fit.alpha}
    return images, info


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_image_folder(folder: str | os.PathLike, images: Mapping[str, np.ndarray]) -> None:
    """`<folder>/<key>.png` for each (H, W, 3) uint8 image, the folder replaced as a whole."""
    from PIL import Image

    from mindsemantix.data.shards import checked_key

    with atomic_dir(folder) as tmp:
        for key, image in images.items():  # file names only from keys of the writer's form: never a path
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp / f"{checked_key(key)}.png")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mindsemantix.eval.baselines",
                                description="Caption and image baselines (and the references) from a shard dataset.")
    p.add_argument("--data", required=True, help="shard dataset (needs train and test with captions)")
    p.add_argument("--out", required=True, help="folder for references.jsonl, chance.jsonl, ridge_retrieval.jsonl, "
                                                "seen/, chance_images/")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sentence-encoder", default="offline:all-minilm-l6-v2")
    p.add_argument("--diffusion", help="Stable Diffusion (hub id or diffusers folder) whose VAE decodes the "
                                       "ridge_latent image baseline (written to ridge_latent_images/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mindsemantix.models.pretrained import load_sentence_encoder

    out = Path(args.out)
    try:
        train = load_split_arrays(args.data, "train", images=bool(args.diffusion))
        test = load_split_arrays(args.data, args.split, images=True)
    except ValueError as e:  # ShardError is a ValueError
        print(f"baselines: error: {e}", file=sys.stderr)
        return 2
    baselines, info = caption_baselines(train, test, load_sentence_encoder(args.sentence_encoder), seed=args.seed)
    keys = [k for arr in test.values() for k in arr.keys]
    refs = {k: caps for arr in test.values() for k, caps in zip(arr.keys, arr.captions)}
    write_jsonl(out / "references.jsonl", [{"key": k, "captions": refs[k]} for k in keys])
    for name, preds in baselines.items():
        write_jsonl(out / f"{name}.jsonl", [{"key": k, "caption": preds[k]} for k in keys])
    seen = {k: im for arr in test.values() for k, im in zip(arr.keys, arr.images)}
    write_image_folder(out / "seen", seen)
    write_image_folder(out / "chance_images", {k: seen[src] for k, src in derangement(keys, args.seed).items()})
    meta = {"seed": args.seed, "data": str(args.data), "ridge": info}
    if args.diffusion:
        ridge_images, meta["ridge_latent"] = ridge_latent_images(train, test, args.diffusion)
        write_image_folder(out / "ridge_latent_images", ridge_images)
        meta["diffusion"] = str(args.diffusion)
    write_json_atomic(out / "baselines_info.json", meta)
    print(f"wrote baselines for {len(keys)} test images to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
