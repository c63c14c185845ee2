#!/usr/bin/env python
"""Convert a Natural Scenes Dataset release tree (real, or simulated by toyworld.py) into shards.

    python data_recipes/nsd.py --nsd-root /data/nsd --out data/shards/nsd --subjects 1 2 5 7

Reads the betas (`betas_sessionNN.nii.gz`, or the `.hdf5` variant where present), the
`nsdgeneral` ROI (== 1), the experimental design, the stimulus information, the stimuli HDF5 and
COCO captions, and writes shard datasets (docs/formats.md): one sample per (subject, image) holding
every repetition in trial order. Normalisation: betas / 300 (percent signal change), then each
voxel is z-scored within each session with the mean and SD (ddof=0) of that session's non-test
trials only. Test = the shared images (`sharedix`); val = a fixed part of the other images
(chosen by a hash of the image id, so it never depends on which subjects are converted).

Memory stays near one session's betas: z-scored ROI rows are spilled to a scratch file on disk
(one subject at a time, freed when the subject is done) and gathered per image. The shards appear
only when everything succeeded. SIGTERM cleans up like Ctrl-C; scratch and half-written datasets of
an earlier run that was killed outright (SIGKILL, power loss) are removed on the next start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from mindsemantix.data.nsd import (
    TRIALS_PER_SESSION, NSDError, NSDLayout, check_session, find_sessions, load_coco_captions,
    load_design, load_roi, load_stim_info, read_session_betas, subject_name, zscore_session,
)
from mindsemantix.data.shards import ShardError

RECIPE_VERSION = "1"


def is_val(nsd_id: int, fraction: float) -> bool:
    """Deterministic val membership of a non-test image, from a hash of its id."""
    h = int.from_bytes(hashlib.sha256(f"nsd-image-{nsd_id}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def _resize(image: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def plan_subject(layout: NSDLayout, design, stim, captions, subject: int, betas_format: str,
                 roi_name: str, n_stimuli: int | None) -> dict:
    """Every check of one subject's inputs, before anything is written."""
    name = subject_name(subject)
    sessions = find_sessions(layout, subject, betas_format)
    roi_img, roi_index = load_roi(layout.roi(subject, roi_name))
    for sf in sessions:
        check_session(sf, roi_img)
    n_trials = len(sessions) * TRIALS_PER_SESSION
    all_ids = design.trial_nsd_ids(subject)
    if n_trials > len(all_ids):
        raise NSDError(f"{layout.betas_dir(subject)}: {len(sessions)} sessions ({n_trials} trials) but "
                       f"{design.path} orders only {len(all_ids)} trials")
    trial_ids = all_ids[:n_trials]  # (T,) 0-based nsdId per trial
    if trial_ids.max() >= len(stim.coco_id) or (stim.coco_id[np.unique(trial_ids)] < 0).any():
        raise NSDError(f"{stim.path}: has no row for some images {name} saw (nsdId up to {trial_ids.max()})")
    if subject in stim.rep_trials:  # the CSV's 1-based trial numbers must agree with the design
        trial_numbers = np.arange(1, n_trials + 1)
        agree = (stim.rep_trials[subject][trial_ids] == trial_numbers[:, None]).any(1)
        if not agree.all():
            t = int(np.flatnonzero(~agree)[0])
            raise NSDError(f"{stim.path}: subject{subject}_rep0..2 disagree with {design.path} "
                           f"(trial {t + 1} shows nsdId {trial_ids[t]} per the design) for "
                           f"{int((~agree).sum())} trials")
    if captions is not None:
        unknown = sorted({int(stim.coco_id[i]) for i in np.unique(trial_ids)} - captions.keys())
        if unknown:
            raise NSDError(f"unknown cocoId {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: "
                           f"{len(unknown)} images {name} saw have no captions in the COCO annotation files")
    if n_stimuli is not None and trial_ids.max() >= n_stimuli:
        raise NSDError(f"{layout.stimuli}: imgBrick holds {n_stimuli} images; {name} saw nsdId {trial_ids.max()}")
    return {"name": name, "sessions": sessions, "roi_img": roi_img, "roi_index": roi_index,
            "trial_ids": trial_ids}


def convert(nsd_root: str | Path, out: str | Path, subjects: list[int] | None = None,
            image_size: int | None = None, coco_annotations: str | Path | None = None,
            with_captions: bool = True, with_images: bool = True, val_fraction: float = 0.1,
            samples_per_shard: int = 500, betas_format: str = "auto", roi_name: str = "nsdgeneral",
            dataset: str = "nsd", subject_prefix: str = "", progress: bool = True) -> dict:
    """Convert; returns the manifest's extra information. Raises NSDError on bad inputs."""
    from mindsemantix.data.shards import ShardWriter

    t_start = time.time()
    layout = NSDLayout(nsd_root)
    if not layout.root.is_dir():
        raise NSDError(f"{layout.root}: NSD root folder does not exist")
    subjects = subjects or layout.subjects_with_betas()
    if not subjects:
        raise NSDError(f"{layout.root / 'nsddata_betas/ppdata'}: no subjXX/{layout.space}/{layout.betas_type} folders")
    design = load_design(layout.expdesign)
    stim = load_stim_info(layout.stim_info)
    annotations = Path(coco_annotations or layout.annotations)
    captions = load_coco_captions(annotations) if with_captions else None
    if with_images and not layout.stimuli.is_file():
        raise NSDError(f"{layout.stimuli}: stimulus images file is missing (or pass --no-images)")
    stimuli = h5py.File(layout.stimuli, "r") if with_images else None
    try:
        n_stimuli = None
        if stimuli is not None:
            if "imgBrick" not in stimuli:
                raise NSDError(f"{layout.stimuli}: no dataset 'imgBrick'")
            brick = stimuli["imgBrick"]
            if brick.ndim != 4 or brick.shape[3] != 3 or brick.dtype != np.uint8:
                raise NSDError(f"{layout.stimuli}: imgBrick must be (images, H, W, 3) uint8, got "
                               f"{brick.shape} {brick.dtype}")
            n_stimuli = brick.shape[0]
        plans = [plan_subject(layout, design, stim, captions, s, betas_format, roi_name, n_stimuli)
                 for s in subjects]
        shared = set(design.shared_nsd_ids.tolist())
        extra = {
            "source": {"recipe": "data_recipes/nsd.py", "recipe_version": RECIPE_VERSION,
                       "nsd_root": str(layout.root.resolve()), "space": layout.space,
                       "betas_type": layout.betas_type, "roi": f"{roi_name} == 1",
                       "coco_annotations": None if captions is None else str(annotations.resolve())},
            "normalisation": {"scale": "int16 betas / 300 = percent signal change",
                              "zscore": "per voxel within each session; mean and SD (ddof=0) over the "
                                        "session's non-test trials only; applied to all its trials",
                              "constant_voxels": {}},
            "splits_rule": {"test": "shared images (sharedix) seen by the subject",
                            "val": "other images with sha256('nsd-image-<id>') < val_fraction",
                            "val_fraction": val_fraction},
            "image_id": "0-based NSD 73k id (nsdId)",
            "image_size": image_size or (None if stimuli is None else int(stimuli["imgBrick"].shape[1])),
            "fmri": "(repetitions, voxels) float16 in trial order",
        }
        Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
        remove_stale_leftovers(Path(out))
        with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=Path(out).resolve().parent) as scratch, \
                ShardWriter(out, dataset=dataset, samples_per_shard=samples_per_shard, extra=extra) as writer:
            mark_owner(Path(scratch), Path(out), writer.building_in)
            for plan in plans:
                _convert_subject(plan, writer, Path(scratch), shared, stim, captions,
                                 stimuli["imgBrick"] if stimuli is not None else None,
                                 image_size, val_fraction, subject_prefix, extra, progress)
    finally:
        if stimuli is not None:
            stimuli.close()
    extra["seconds"] = round(time.time() - t_start, 1)
    return extra


def _convert_subject(plan: dict, writer, scratch: Path, shared: set[int], stim, captions, brick,
                     image_size: int | None, val_fraction: float, prefix: str, extra: dict,
                     progress: bool) -> None:
    name, trial_ids = plan["name"], plan["trial_ids"]
    subject = prefix + name
    n_voxels = writer.add_subject(subject, plan["roi_img"], sessions=len(plan["sessions"]),
                                  trials=len(trial_ids))
    # z-scored ROI rows of every trial, (T, V) float32, on disk so memory holds one session only
    rows = np.lib.format.open_memmap(scratch / f"{name}.npy", mode="w+", dtype=np.float32,
                                     shape=(len(trial_ids), n_voxels))
    is_test_trial = np.isin(trial_ids, list(shared))
    constant = 0
    for sf in tqdm(plan["sessions"], desc=f"{name} sessions", disable=not progress):
        span = slice((sf.session - 1) * TRIALS_PER_SESSION, sf.session * TRIALS_PER_SESSION)
        betas = read_session_betas(sf, plan["roi_index"])  # (750, V) percent signal change
        rows[span], n_constant = zscore_session(betas, is_test_trial[span], str(sf.path))
        constant = max(constant, n_constant)
    rows.flush()
    extra["normalisation"]["constant_voxels"][subject] = constant

    order = np.argsort(trial_ids, kind="stable")  # trials grouped by image, in trial order
    images, first = np.unique(trial_ids[order], return_index=True)
    bounds = list(first) + [len(order)]
    for k in tqdm(range(len(images)), desc=f"{name} samples", disable=not progress):
        nsd_id = int(images[k])
        trials = order[bounds[k]:bounds[k + 1]]  # 0-based trial indices, ascending
        split = "test" if nsd_id in shared else ("val" if is_val(nsd_id, val_fraction) else "train")
        coco_id = int(stim.coco_id[nsd_id])
        meta = {"subject": subject, "image_id": nsd_id, "trials": [int(t) + 1 for t in trials],
                "sessions": [int(t) // TRIALS_PER_SESSION + 1 for t in trials], "coco_id": coco_id}
        writer.write(split, f"{subject}-{nsd_id:06d}", fmri=np.asarray(rows[trials]), meta=meta,
                     captions=captions[coco_id] if captions is not None else None,
                     image=_resize(brick[nsd_id], image_size) if brick is not None else None)
    del rows
    (scratch / f"{name}.npy").unlink()  # free this subject's scratch (T x V float32) before the next one


# ----------------------------------------------------------------------------------------------
# Leftovers of killed runs

SCRATCH_PREFIX = ".nsd-recipe-"
OWNER_FILE = "owner.json"


def mark_owner(scratch: Path, out: Path, dataset_tmp: Path) -> None:
    """Record, in the scratch folder, which process made it and its hidden temporary dataset, so a
    later run can tell a dead run's leftovers from a live run's folders."""
    (scratch / OWNER_FILE).write_text(json.dumps({"recipe": "nsd", "host": socket.gethostname(), "pid": os.getpid(),
                                                  "out": str(out.resolve()), "dataset_tmp": str(dataset_tmp.resolve())}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale_leftovers(out: Path) -> list[Path]:
    """Remove the scratch folders and hidden temporary datasets that earlier runs of this recipe for
    `out` left when killed outright. Only folders with this recipe's owner record, for the same `out`,
    made on this host by a process that no longer exists, are touched (a live run is never)."""
    out = out.resolve()
    removed = []
    for scratch in out.parent.glob(f"{SCRATCH_PREFIX}*"):
        try:
            owner = json.loads((scratch / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge (or still being set up)
        if (owner.get("recipe") != "nsd" or owner.get("out") != str(out) or owner.get("host") != socket.gethostname()
                or _alive(int(owner.get("pid", 0)))):
            continue
        dataset_tmp = Path(owner.get("dataset_tmp", ""))
        # only the writer's hidden sibling of `out` (".<name>.<random>.tmp"), never anything else
        if dataset_tmp.parent == out.parent and dataset_tmp.name.startswith(f".{out.name}.") and dataset_tmp.name.endswith(".tmp"):
            shutil.rmtree(dataset_tmp, ignore_errors=True)
            removed.append(dataset_tmp)
        shutil.rmtree(scratch, ignore_errors=True)
        removed.append(scratch)
    for path in removed:
        print(f"nsd recipe: removed {path.name}, left by an earlier run that was killed")
    return removed


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: scratch and the half-written dataset are removed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsd-root", required=True, type=Path,
                   help="folder holding nsddata/, nsddata_betas/, nsddata_stimuli/")
    p.add_argument("--out", required=True, type=Path, help="shard dataset folder to write (replaced atomically)")
    p.add_argument("--subjects", type=int, nargs="+", default=None, metavar="N",
                   help="subject numbers (default: every subject with a betas folder)")
    p.add_argument("--image-size", type=int, default=None, help="resize stimuli to N x N (default: keep, 425 for NSD)")
    p.add_argument("--coco-annotations", type=Path, default=None, metavar="DIR",
                   help="folder with captions_train2017.json / captions_val2017.json "
                        "(default: NSD_ROOT/nsddata_stimuli/stimuli/nsd/annotations)")
    p.add_argument("--no-captions", action="store_true", help="write no captions (no COCO files needed)")
    p.add_argument("--no-images", action="store_true", help="write no stimulus images")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of non-test images for val")
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--betas-format", choices=["auto", "nii.gz", "hdf5"], default="auto",
                   help="auto: per session the .hdf5 file where present, else .nii.gz")
    p.add_argument("--roi", default="nsdgeneral", help="ROI file name under roi/ (voxels == 1 are kept)")
    p.add_argument("--dataset", default="nsd", help="dataset name in the manifest")
    p.add_argument("--subject-prefix", default="", help="prefix for subject names (keep names unique across datasets)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        sys.exit("nsd recipe: --val-fraction must be in [0, 1)")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        extra = convert(args.nsd_root, args.out, args.subjects, args.image_size, args.coco_annotations,
                        not args.no_captions, not args.no_images, args.val_fraction,
                        args.samples_per_shard, args.betas_format, args.roi, args.dataset,
                        args.subject_prefix, progress=not args.quiet)
    except (NSDError, ShardError) as e:
        sys.exit(f"nsd recipe: {e}")
    print(f"wrote {args.out} in {extra['seconds']} s")
    return extra


if __name__ == "__main__":
    main()
