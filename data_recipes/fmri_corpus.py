#!/usr/bin/env python
"""Turn 4D BOLD runs (BIDS or HCP folders) into image-less shards for stage-1 pretraining.

    python data_recipes/fmri_corpus.py --root /data/hcp --dataset hcp --out data/shards/hcp \
        --roi mni-visual --window 4

MindSemantix pretrains its brain encoder as a masked autoencoder on a large cross-subject fMRI
corpus without images (MinD-Vis used HCP + GOD). Per subject this recipe

1. finds the runs: BIDS `sub-<label>/[ses-<label>/]func/*_bold.nii[.gz]`, or HCP
   `<subject>/MNINonLinear/Results/<run>/<run>.nii.gz`;
2. builds one ROI mask in the subject's run space with nilearn: `epi` (nilearn's
   compute_multi_epi_mask: whole-brain runs with dark background), `background` (every voxel that
   is not background: partial-coverage runs), `mni-visual` (the simulator's occipito-temporal ROI,
   for MNI-space runs such as HCP MNINonLinear) or a mask file (resampled, nearest; > 0);
3. per run: masks it with nilearn (runs on another grid are first resampled to the subject's first
   run), drops the first `--discard` frames, optionally detrends, z-scores every voxel over time;
4. cuts time windows of `--window` frames every `--stride` frames (MinD-Vis averages windows of
   frames; the datamodule's `mean` of a sample's rows gives that average);
5. writes shards (docs/formats.md): key `<dataset>-<subject>-<6-digit window index>`, fmri (window, V)
   float16 with one row per frame (or `--average`: one row), meta with `image_id` -1, the frames'
   1-based numbers over the subject's runs as `trials`, the run and TR.

Split: the last `--val-fraction` of every run's time is val; windows straddling the boundary are
dropped, so no frame is in both splits. Memory: the ROI time series of one run plus a chunk of
frames (a run on another grid than the subject's first is resampled whole).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

RECIPE_VERSION = "1"


class CorpusError(ValueError):
    """Missing or inconsistent input; the message names the file and the problem."""


def find_runs(root: Path, layout: str = "auto") -> dict[str, list[Path]]:
    """subject label -> sorted run files."""
    if not root.is_dir():
        raise CorpusError(f"{root}: input folder does not exist")
    found: dict[str, list[Path]] = {}
    if layout in ("auto", "bids"):
        for path in sorted(root.glob("sub-*/**/func/*_bold.nii*")):
            if path.name.endswith((".nii", ".nii.gz")):
                label = path.relative_to(root).parts[0][4:]
                found.setdefault(label, []).append(path)
    if layout == "hcp" or (layout == "auto" and not found):
        for path in sorted(root.glob("*/MNINonLinear/Results/*/*.nii.gz")):
            if path.name == f"{path.parent.name}.nii.gz":  # the run itself, not its derivatives
                found.setdefault(path.relative_to(root).parts[0], []).append(path)
    if not found:
        raise CorpusError(f"{root}: no BOLD runs found (BIDS sub-*/func/*_bold.nii[.gz] or "
                          "HCP <subject>/MNINonLinear/Results/<run>/<run>.nii.gz)")
    return found


def subject_mask(runs: list[nib.Nifti1Image], roi: str, where: str) -> nib.Nifti1Image:
    """ROI mask (uint8 0/1) on the grid of the subject's first run."""
    from nilearn import image, masking

    reference = runs[0]
    if roi == "epi":
        mask = masking.compute_multi_epi_mask(runs, target_affine=reference.affine,
                                              target_shape=reference.shape[:3])
    elif roi == "background":
        mask = masking.compute_multi_background_mask(runs, connected=False, opening=False,
                                                     target_affine=reference.affine,
                                                     target_shape=reference.shape[:3])
    else:
        if roi == "mni-visual":
            from mindsemantix.simulate.brain import mni_visual_roi

            source = mni_visual_roi()
        else:
            path = Path(roi)
            if not path.is_file():
                raise CorpusError(f"{path}: ROI mask file is missing")
            source = nib.load(str(path))
            if source.ndim != 3:
                raise CorpusError(f"{path}: ROI mask must be 3-D, got shape {source.shape}")
            source = nib.Nifti1Image((np.asanyarray(source.dataobj) > 0).astype(np.uint8), source.affine)
        mask = image.resample_img(source, target_affine=reference.affine, target_shape=reference.shape[:3],
                                  interpolation="nearest", force_resample=True, copy_header=True)
    data = (np.asanyarray(mask.dataobj) > 0).astype(np.uint8)
    if data.sum() == 0:
        raise CorpusError(f"{where}: the ROI ({roi}) has no voxel inside the runs' field of view")
    return nib.Nifti1Image(data, reference.affine)


def run_timeseries(path: Path, mask: nib.Nifti1Image, discard: int, detrend: bool,
                   chunk: int = 64) -> np.ndarray:
    """(T, V) z-scored ROI time series of one run, V in C-order nonzero of the mask.

    Frames are read `chunk` at a time (the file stays open, so a .nii.gz is decompressed once),
    so memory holds the ROI series plus one chunk, not the whole 4D run. A run on another grid
    than the mask is resampled whole first.
    """
    from nilearn import image, masking, signal

    run = nib.load(str(path), keep_file_open=True)
    if run.shape[:3] != mask.shape or not np.allclose(run.affine, mask.affine, atol=1e-3):
        run = image.resample_to_img(run, mask, interpolation="continuous", force_resample=True,
                                    copy_header=True)
    n_frames = run.shape[3]
    series = np.empty((n_frames, int(np.asanyarray(mask.dataobj).sum())), dtype=np.float64)
    for start in range(0, n_frames, chunk):
        frames = np.asarray(run.dataobj[..., start:start + chunk], dtype=np.float32)
        series[start:start + chunk] = masking.apply_mask(nib.Nifti1Image(frames, run.affine), mask)
    series = series[discard:]
    if detrend:
        series = signal.clean(series, detrend=True, standardize=False)
    mean, sd = series.mean(0), series.std(0)
    constant = sd == 0
    z = (series - mean) / np.where(constant, 1.0, sd)
    z[:, constant] = 0.0
    return z.astype(np.float32)


def windows(n_frames: int, window: int, stride: int, val_fraction: float) -> list[tuple[int, str]]:
    """(first frame, split) of each window; val = windows inside the last val_fraction of the run,
    train = windows ending before it, windows across the boundary are dropped."""
    boundary = n_frames - int(round(val_fraction * n_frames))
    out = []
    for start in range(0, n_frames - window + 1, stride):
        if start + window <= boundary:
            out.append((start, "train"))
        elif start >= boundary:
            out.append((start, "val"))
    return out


def convert(root: str | Path, out: str | Path, dataset: str, layout: str = "auto", roi: str = "epi",
            window: int = 4, stride: int | None = None, average: bool = False, discard: int = 0,
            detrend: bool = False, val_fraction: float = 0.1, samples_per_shard: int = 500,
            subjects: list[str] | None = None, progress: bool = True) -> dict:
    from mindsemantix.data.shards import ShardWriter

    t_start = time.time()
    root = Path(root)
    stride = stride or window
    if not re.fullmatch(r"[A-Za-z0-9_]+", dataset):
        raise CorpusError(f"--dataset {dataset!r} must be letters, digits or '_' (it prefixes subject names)")
    if window < 1 or stride < 1:
        raise CorpusError("--window and --stride must be >= 1")
    runs_by_subject = find_runs(root, layout)
    if subjects:
        missing = sorted(set(subjects) - runs_by_subject.keys())
        if missing:
            raise CorpusError(f"{root}: no runs for subject(s) {missing}")
        runs_by_subject = {s: runs_by_subject[s] for s in subjects}
    extra = {"source": {"recipe": "data_recipes/fmri_corpus.py", "recipe_version": RECIPE_VERSION,
                        "root": str(root.resolve()), "roi": roi},
             "normalisation": {"zscore": "per voxel over time within each run (ddof=0)"
                                         + (", after linear detrending" if detrend else ""),
                               "discarded_frames_per_run": discard},
             "windows": {"frames": window, "stride": stride, "rows": "mean of the window" if average
                         else "one row per frame (the datamodule's mean gives the window average)"},
             "splits_rule": {"val": f"last {val_fraction} of each run's frames; windows across the "
                                    "boundary dropped", "val_fraction": val_fraction},
             "image_id": "-1 (no images)", "skipped_runs": []}
    with ShardWriter(out, dataset=dataset, samples_per_shard=samples_per_shard, extra=extra) as writer:
        for label, paths in tqdm(runs_by_subject.items(), desc="subjects", disable=not progress):
            subject = f"{dataset}-{re.sub(r'[^A-Za-z0-9_]', '_', label)}"
            _convert_subject(writer, subject, paths, roi, window, stride, average, discard, detrend,
                             val_fraction, root, extra)
    extra["seconds"] = round(time.time() - t_start, 1)
    return extra


def _convert_subject(writer, subject: str, paths: list[Path], roi: str, window: int, stride: int,
                     average: bool, discard: int, detrend: bool, val_fraction: float, root: Path,
                     extra: dict) -> None:
    runs = []
    for path in paths:
        try:
            img = nib.load(str(path))
        except Exception as e:
            raise CorpusError(f"{path}: unreadable NIfTI ({e})") from e
        if img.ndim != 4:
            raise CorpusError(f"{path}: a BOLD run must be 4-D, got shape {img.shape}")
        if img.shape[3] - discard < window:
            extra["skipped_runs"].append({"run": str(path.relative_to(root)),
                                          "reason": f"{img.shape[3]} frames, fewer than discard + window"})
            continue
        runs.append((path, img))
    if not runs:
        return
    mask = subject_mask([img for _, img in runs], roi, f"{subject} ({paths[0].parent})")
    writer.add_subject(subject, mask, runs=len(runs))
    frame_offset, index = 0, 0  # frames already counted in earlier runs; windows written
    for path, img in runs:
        series = run_timeseries(path, mask, discard, detrend)  # (T, V)
        tr = float(img.header.get_zooms()[3]) if len(img.header.get_zooms()) > 3 else None
        for start, split in windows(len(series), window, stride, val_fraction):
            frames = np.arange(start, start + window)
            rows = series[frames].mean(0, keepdims=True) if average else series[frames]
            global_frames = [int(frame_offset + discard + f + 1) for f in frames]
            meta = {"subject": subject, "image_id": -1,
                    "trials": global_frames[:1] if average else global_frames,
                    "frames": [int(discard + f + 1) for f in frames],
                    "run": str(path.relative_to(root)), "tr": tr}
            writer.write(split, f"{subject}-{index:06d}", fmri=rows, meta=meta)
            index += 1
        frame_offset += img.shape[3]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, type=Path, help="BIDS or HCP folder of 4D BOLD runs")
    p.add_argument("--out", required=True, type=Path, help="shard dataset folder to write (replaced atomically)")
    p.add_argument("--dataset", required=True, help="dataset name; prefixes subject names (e.g. hcp -> hcp-100307)")
    p.add_argument("--layout", choices=["auto", "bids", "hcp"], default="auto")
    p.add_argument("--subjects", nargs="+", default=None, help="subject labels to convert (default: all)")
    p.add_argument("--roi", default="epi", help="'epi' (nilearn EPI mask), 'background' (all non-background voxels), "
                        "'mni-visual' (MNI-space runs) or a mask file")
    p.add_argument("--window", type=int, default=4, help="frames per sample")
    p.add_argument("--stride", type=int, default=None, help="frames between window starts (default: --window)")
    p.add_argument("--average", action="store_true", help="store the window mean (1 row) instead of its frames")
    p.add_argument("--discard", type=int, default=0, help="initial frames to drop per run (non-steady state)")
    p.add_argument("--detrend", action="store_true", help="remove a linear trend per run before z-scoring")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # nilearn's resampling chatter
            extra = convert(args.root, args.out, args.dataset, args.layout, args.roi, args.window,
                            args.stride, args.average, args.discard, args.detrend, args.val_fraction,
                            args.samples_per_shard, args.subjects, progress=not args.quiet)
    except CorpusError as e:
        sys.exit(f"fmri_corpus: {e}")
    print(f"wrote {args.out} in {extra['seconds']} s")
    return extra


if __name__ == "__main__":
    main()
