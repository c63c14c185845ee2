"""`mindsemantix bundle` (a run -> a bundle folder) and `mindsemantix decode` (new fMRI -> captions, images).

    mindsemantix bundle --run runs/demo --out bundles/demo
    mindsemantix decode --model bundles/demo --subject subj01 --betas betas_session01.nii.gz --out decoded/

decode reads NSD-style session files (`betas_sessionNN.nii.gz` 4-D, one volume per trial, or the
`.hdf5`), any 4-D NIfTI in the subject's space (`--mask` when its ROI file is not the bundle's), or a
`.npy` (trials, voxels) in the bundle's voxel order, in the release's units (betas x 300). Each file
is one session: z-scored per voxel as in training (`mindsemantix.data.nsd.zscore_session`), over
its trials except those of the model's held-out test images when `--average-by` says which image
each trial showed (exactly what training did), else over all its trials. Writes `captions.jsonl`,
`images/<name>.png` and `grid.png` under `--out`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

from mindsemantix.io import write_bytes_atomic

DEBUG_ENV = "MINDSEMANTIX_DEBUG"


def parse_trials(spec: str, n: int) -> list[int]:
    """'1-750' / '3,5,10-12' -> sorted 1-based trial numbers, each in 1..n."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--trials: {part!r} is not a number or a range like 1-750") from None
        if not 1 <= a <= b <= n:
            raise ValueError(f"--trials: {part!r} is outside 1-{n} (the inputs hold {n} trials)")
        out.update(range(a, b + 1))
    return sorted(out)


def read_image_ids(path: str | Path, n: int) -> np.ndarray:
    """CSV with columns `trial,image_id` (trial: 1-based over the inputs in order) -> (n,) ids, -1 unknown."""
    ids = np.full(n, -1, dtype=np.int64)
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                t = int(row["trial"])
                if not 1 <= t <= n:
                    raise ValueError(f"trial {t} is outside 1-{n}")
                ids[t - 1] = int(row["image_id"])
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: expected a CSV with columns trial,image_id ({type(e).__name__}: {e})") from None
    return ids


def expand_betas(paths: list[str]) -> list[str]:
    """A folder stands for its NSD session files `betas_sessionNN.hdf5` / `.nii.gz` (one per session,
    the .hdf5 where both exist), in session order."""
    import re

    out: list[str] = []
    for p in paths:
        if not Path(p).is_dir():
            out.append(p)
            continue
        found: dict[int, Path] = {}
        for f in Path(p).iterdir():
            m = re.fullmatch(r"betas_session(\d+)\.(nii\.gz|hdf5)", f.name)
            if m and (int(m.group(1)) not in found or m.group(2) == "hdf5"):
                found[int(m.group(1))] = f
        if not found:
            raise ValueError(f"{p}: a folder given to --betas must hold betas_sessionNN.nii.gz / .hdf5 files")
        out += [str(found[n]) for n in sorted(found)]
    return out


def design_image_ids(design_path: str | Path, subject: str, files: list[str], lengths: list[int]) -> np.ndarray:
    """Image id (0-based NSD id) of every trial of NSD session files `betas_sessionNN.*`, from the
    release's `nsd_expdesign.mat`: session NN of subject `subjXX` holds its trials (NN-1)*750+1 ..."""
    import re

    from mindsemantix.data.nsd import TRIALS_PER_SESSION, load_design

    m = re.search(r"subj(\d+)$", subject)
    if not m:
        raise ValueError(f"--nsd-design: subject {subject!r} is not named subjXX as in NSD")
    trial_ids = load_design(design_path).trial_nsd_ids(int(m.group(1)))
    out = []
    for f, n in zip(files, lengths):
        session = re.search(r"betas_session(\d+)\.", Path(f).name)
        if not session:
            raise ValueError(f"{f}: --nsd-design needs NSD session files named betas_sessionNN (use --average-by otherwise)")
        start = (int(session.group(1)) - 1) * TRIALS_PER_SESSION
        if start + n > len(trial_ids):
            raise ValueError(f"{f}: {n} trials from trial {start + 1} on, but {design_path} orders {len(trial_ids)}")
        out.append(trial_ids[start:start + n])
    return np.concatenate(out).astype(np.int64)


def load_inputs(spec, root: Path, subject: str, files: list[str], mask: str | None, image_ids_csv: str | None,
                nsd_design: str | None = None):
    """-> (z (T, V) float32 as the shards store it, image ids (T,) or None): every file read in the
    subject's ROI and z-scored as one session."""
    import nibabel as nib

    from mindsemantix.data.nsd import NSDError, load_roi, read_volumes, zscore_session
    from mindsemantix.pipeline import BundleError

    roi_img, roi_index = load_roi(mask or root / spec.mask)
    if len(roi_index[0]) != spec.n_voxels:
        raise BundleError(f"{mask}: mask selects {len(roi_index[0])} voxels, {subject} has {spec.n_voxels} "
                          "(mask mismatch: use the subject's ROI in the space of the betas)")
    if mask:  # the same ROI in another file: same voxels, in the same order
        ours = np.asarray(nib.load(str(root / spec.mask)).dataobj) == 1
        if ours.shape == roi_img.shape and not np.array_equal(ours, np.asarray(roi_img.dataobj) == 1):
            raise BundleError(f"{mask}: not the ROI {subject} was trained on (mask mismatch: other voxels)")
    sessions = [read_volumes(f, roi_img, roi_index) for f in files]  # each (T_i, V) percent signal change
    total = sum(len(s) for s in sessions)
    ids = (read_image_ids(image_ids_csv, total) if image_ids_csv else
           design_image_ids(nsd_design, subject, files, [len(x) for x in sessions]) if nsd_design else None)
    held_out = np.asarray(spec.held_out_image_ids, dtype=np.int64)
    parts, start = [], 0
    for f, betas in zip(files, sessions):
        is_test = np.isin(ids[start:start + len(betas)], held_out) if ids is not None else np.zeros(len(betas), bool)
        try:
            z, _ = zscore_session(betas, is_test, f)
        except NSDError as e:
            raise BundleError(str(e)) from None
        parts.append(z.astype(np.float16).astype(np.float32))  # the shards' storage precision: same inputs as training
        start += len(betas)
    return np.concatenate(parts), ids


def group_trials(z: np.ndarray, trials: list[int], ids: np.ndarray | None, subject: str, average: bool):
    """-> (x (N, V), keys, rows for captions.jsonl): one row per trial, or per image with `average`."""
    if not average:
        x = z[[t - 1 for t in trials]]
        return x, [f"{subject}-trial{t:06d}" for t in trials], [{"trial": t} for t in trials]
    groups: dict[int, list[int]] = {}
    for t in trials:
        if ids[t - 1] >= 0:
            groups.setdefault(int(ids[t - 1]), []).append(t)
    order = sorted(groups)
    x = np.stack([z[[t - 1 for t in groups[i]]].mean(0) for i in order]) if order else np.zeros((0, z.shape[1]), np.float32)
    return x, [f"{subject}-{i:06d}" for i in order], [{"image_id": i, "trials": groups[i]} for i in order]


def save_grid(path: Path, images: list, captions: list[str], keys: list[str], limit: int = 16) -> None:
    """Up to `limit` reconstructions, 4 a row, each with its key and caption, shown at >= 160 px."""
    import textwrap
    from io import BytesIO

    from PIL import Image, ImageDraw

    n = min(limit, len(images))
    if n == 0:
        return
    size = max(160, images[0].width)
    text_h, cols = 44, min(4, n)
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cols * size, rows * (size + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x, y = (i % cols) * size, (i // cols) * (size + text_h)
        canvas.paste(images[i].resize((size, size), Image.Resampling.NEAREST), (x, y))
        lines = [keys[i]] + textwrap.wrap(captions[i], width=size // 6)[:2]
        for k, line in enumerate(lines):
            draw.text((x + 3, y + size + 2 + 13 * k), line, fill="black")
    buf = BytesIO()
    canvas.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def decode(args: argparse.Namespace) -> Path:
    from mindsemantix.pipeline import BundleError, MindSemantixPipeline, SubjectSpec, locate_bundle, read_index

    root = locate_bundle(args.model)
    subjects = read_index(root)["subjects"]
    if args.subject not in subjects:  # every input is checked before the models load
        raise BundleError(f"subject {args.subject!r} is not in {args.model} (it decodes "
                          f"{', '.join(sorted(subjects))}); each subject has input layers trained on its own scans")
    if args.average_by and args.nsd_design:
        raise BundleError("give either --average-by or --nsd-design, not both")
    spec = SubjectSpec(**subjects[args.subject])
    args.betas = expand_betas(args.betas)
    z, ids = load_inputs(spec, root, args.subject, args.betas, args.mask, args.average_by, args.nsd_design)
    trials = parse_trials(args.trials, len(z)) if args.trials else list(range(1, len(z) + 1))
    if args.held_out_only:
        if ids is None:
            raise BundleError("--held-out-only needs the image of each trial (--average-by or --nsd-design)")
        held_out = set(spec.held_out_image_ids)
        trials = [t for t in trials if int(ids[t - 1]) in held_out]
    x, keys, rows = group_trials(z, trials, ids, args.subject, average=ids is not None)
    if not len(x):
        raise BundleError("no trial to decode (with --average-by: none of the selected trials has an image id)")
    pipe = MindSemantixPipeline.from_pretrained(root, load_diffusion=args.images)
    out = pipe(x, args.subject, keys=keys, images=args.images, batch_size=args.batch_size, progress=True)
    folder = Path(args.out)
    text = "".join(json.dumps({**row, "key": k, "caption": c}) + "\n" for row, k, c in zip(rows, keys, out.captions))
    write_bytes_atomic(folder / "captions.jsonl", text.encode())
    if out.images is not None:
        from io import BytesIO

        for key, image in zip(keys, out.images):
            buf = BytesIO()
            image.save(buf, format="PNG")
            write_bytes_atomic(folder / "images" / f"{key}.png", buf.getvalue())
        save_grid(folder / "grid.png", out.images, out.captions, keys)
    print(f"decode: {len(keys)} {'images' if ids is not None else 'trials'} of {args.subject} -> {folder}")
    return folder


def decode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mindsemantix decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="bundle folder (mindsemantix bundle) or hub id")
    p.add_argument("--subject", required=True, help="a subject the bundle decodes, e.g. subj01")
    p.add_argument("--betas", required=True, action="append", metavar="FILE",
                   help="a session file (.nii.gz / .nii / .hdf5 / .npy), or a folder of NSD session files; "
                        "repeat for several sessions")
    p.add_argument("--mask", default=None, help="the subject's ROI as a NIfTI in the betas' space (default: the bundle's)")
    p.add_argument("--trials", default=None, help="1-based trials over the inputs in order, e.g. 1-750 or 3,5,10-12")
    p.add_argument("--average-by", default=None, metavar="IMAGE_IDS.csv",
                   help="CSV trial,image_id: average the repetitions of each image (and keep the model's test "
                        "images out of the z-score statistics, as training did)")
    p.add_argument("--nsd-design", default=None, metavar="nsd_expdesign.mat",
                   help="NSD's experimental design: the image of each trial of betas_sessionNN files (as --average-by)")
    p.add_argument("--held-out-only", action="store_true",
                   help="decode only the trials of the model's held-out test images (needs --average-by or --nsd-design)")
    p.add_argument("--out", required=True, help="output folder: captions.jsonl, images/, grid.png")
    p.add_argument("--images", action=argparse.BooleanOptionalAction, default=True, help="reconstruct images too")
    p.add_argument("--batch-size", type=int, default=32)
    return p


def bundle_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mindsemantix bundle", description="Write a run's trained stages as one "
                                "self-contained model folder (MindSemantixPipeline.save_pretrained).")
    p.add_argument("--run", required=True, help="run folder with align/export and reconstruct/export, e.g. runs/demo")
    p.add_argument("--out", required=True, help="bundle folder to write (replaced atomically)")
    p.add_argument("--data", default=None, help="the shard dataset the run trained on (default: from its config)")
    return p


def _run(fn, argv: list[str] | None) -> int:
    from mindsemantix.data.nsd import NSDError
    from mindsemantix.data.shards import ShardError
    from mindsemantix.export import ExportError
    from mindsemantix.pipeline import BundleError

    try:
        fn(argv)
    except (BundleError, NSDError, ShardError, ExportError, ValueError, FileNotFoundError) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return _run(lambda a: decode(decode_parser().parse_args(a)), argv)


def bundle_main(argv: list[str] | None = None) -> int:
    def run(a):
        from mindsemantix.pipeline import MindSemantixPipeline

        args = bundle_parser().parse_args(a)
        pipe = MindSemantixPipeline.from_run(args.run, data=args.data, load_diffusion=False)
        folder = pipe.save_pretrained(args.out)
        size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
        print(f"bundle: wrote {folder} ({size / 1e6:.1f} MB; subjects {', '.join(sorted(pipe.subjects))})")

    return _run(run, argv)


ADAPT_CONFIG = Path(__file__).resolve().parents[1] / "stages" / "adapt.yaml"


def adapt_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mindsemantix adapt", description="Add a new subject to a trained bundle: train "
                                "its input layers on its first sessions, everything shared frozen (docs/transfer.md). "
                                "Runs `mindsemantix fit --config stages/adapt.yaml`; further --trainer.* / --model.* / "
                                "--data.* / --ckpt_path flags go to it.")
    p.add_argument("--model", required=True, help="the trained bundle folder")
    p.add_argument("--data", required=True, help="shard dataset holding the new subject")
    p.add_argument("--subject", required=True, help="the new subject's name in the dataset")
    p.add_argument("--sessions", type=int, default=None, help="use the subject's first N sessions (default: all)")
    p.add_argument("--out", required=True, help="the adapted bundle to write (a new folder)")
    p.add_argument("--run", default=None, help="checkpoints and logs (default: runs/adapt/<subject>)")
    p.add_argument("--config", action="append", default=[], help="further config files, after stages/adapt.yaml")
    return p


def adapt_main(argv: list[str] | None = None) -> int:
    """`mindsemantix adapt` = `mindsemantix fit --config stages/adapt.yaml` with the flags as config keys."""
    from mindsemantix.cli import main as cli_main

    args, rest = adapt_parser().parse_known_args(argv)
    fit = ["fit", "--config", str(ADAPT_CONFIG), *[a for c in args.config for a in ("--config", c)],
           f"--model.init_args.bundle={args.model}", f"--model.init_args.subject={args.subject}",
           f"--model.init_args.export_dir={args.out}", f"--data.datasets=[{args.data}]",
           f"--data.subjects=[{args.subject}]", f"--data.max_sessions={args.sessions if args.sessions else 'null'}",
           f"--trainer.default_root_dir={args.run or Path('runs') / 'adapt' / args.subject}", *rest]
    return cli_main(fit)


if __name__ == "__main__":
    sys.exit(main())
