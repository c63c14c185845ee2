"""Writers for the NSD release layout (see `mindsemantix.data.nsd` for the conventions).

Each function writes one kind of release file exactly as the release has it, so the recipe that
reads the real release reads the simulated study through the same code.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from mindsemantix.data.nsd import TRIALS_PER_SESSION


def write_expdesign(path: Path, masterordering: np.ndarray, subjectim: np.ndarray,
                    sharedix: np.ndarray, n_sessions: int) -> None:
    """nsd_expdesign.mat (MATLAB v5). All indices 1-based, as in the release.

    masterordering: (T,); subjectim: (n_subjects, n_images); sharedix: (n_shared,).
    basiccnt (3 x sessions: per session, how many images are shown for the 1st / 2nd / 3rd time)
    and stimpattern (sessions x 12 runs x 75 slots, 1 = stimulus trial) are stand-ins with the
    release's shapes; nothing downstream reads them.
    """
    first_seen: dict[int, int] = {}
    basiccnt = np.zeros((3, n_sessions), dtype=np.float64)
    for t, image in enumerate(masterordering):
        k = first_seen.get(int(image), 0)
        first_seen[int(image)] = k + 1
        if k < 3:
            basiccnt[k, t // TRIALS_PER_SESSION] += 1
    stimpattern = np.zeros((n_sessions, 12, 75), dtype=np.uint8)
    stimpattern[:, :, :62] = 1  # 62-63 stimulus trials per run, 750 per session
    stimpattern[:, ::2, 62] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {
        "masterordering": masterordering.reshape(1, -1).astype(np.float64),
        "subjectim": subjectim.astype(np.float64),
        "sharedix": sharedix.reshape(1, -1).astype(np.float64),
        "basiccnt": basiccnt,
        "stimpattern": stimpattern,
    }, format="5", do_compression=True)


def write_stim_info(path: Path, coco_id: np.ndarray, coco_split: list[str], shared: np.ndarray,
                    shown: np.ndarray, rep_trials: np.ndarray) -> None:
    """nsd_stim_info_merged.csv, one row per image (row i = nsdId i).

    shown: (n_subjects, n_images) bool; rep_trials: (n_subjects, n_images, 3) 1-based trial numbers
    of the 1st-3rd presentation, 0 where not shown.
    """
    n_subjects, n_images = shown.shape
    header = ["", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000"]
    header += [f"subject{s + 1}" for s in range(n_subjects)]
    header += [f"subject{s + 1}_rep{r}" for s in range(n_subjects) for r in range(3)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(n_images):
            row = [i, int(coco_id[i]), coco_split[i], "(0, 0, 0, 0)", 0.0, i, False, False, bool(shared[i])]
            row += [int(shown[s, i]) for s in range(n_subjects)]
            row += [int(rep_trials[s, i, r]) for s in range(n_subjects) for r in range(3)]
            w.writerow(row)


def write_roi(path: Path, labels: np.ndarray, affine: np.ndarray) -> None:
    """nsdgeneral.nii.gz: int16 -1 (outside the brain) / 0 / 1 (ROI)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(labels.astype(np.int16), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _session_volume(betas_int16: np.ndarray, index: tuple[np.ndarray, ...], shape: tuple[int, ...]) -> np.ndarray:
    """(X, Y, Z, trials) int16 volume with the given voxels' betas and zeros elsewhere (like the
    release's liberal brain mask zeroing). betas_int16: (trials, V)."""
    volume = np.zeros((*shape, betas_int16.shape[0]), dtype=np.int16)
    volume[index] = betas_int16.T
    return volume


def write_betas_nifti(path: Path, betas_int16: np.ndarray, index: tuple[np.ndarray, ...],
                      shape: tuple[int, ...], affine: np.ndarray) -> None:
    """betas_sessionNN.nii.gz: int16 (X, Y, Z, 750), percent signal change x 300."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(_session_volume(betas_int16, index, shape), affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def write_betas_hdf5(path: Path, betas_int16: np.ndarray, index: tuple[np.ndarray, ...],
                     shape: tuple[int, ...]) -> None:
    """betas_sessionNN.hdf5: dataset `betas` as h5py sees the MATLAB-written release file,
    (750, Z, Y, X) int16, chunked one voxel's 750 trials at a time as in the release."""
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = _session_volume(betas_int16, index, shape)  # (X, Y, Z, 750)
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=volume.transpose(3, 2, 1, 0), chunks=(betas_int16.shape[0], 1, 1, 1))


def write_stimuli(path: Path, images: np.ndarray) -> None:
    """nsd_stimuli.hdf5: dataset `imgBrick`, (n_images, H, W, 3) uint8, row = nsdId."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(1, *images.shape[1:]), compression="gzip",
                         compression_opts=4)


def write_coco_captions(folder: Path, coco_id: np.ndarray, coco_split: list[str],
                        captions: list[list[str]], image_size: int) -> None:
    """captions_<split>.json in COCO format (images + annotations), one file per cocoSplit."""
    folder.mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split in sorted(set(coco_split)):
        images, annotations = [], []
        for i in np.flatnonzero(np.array(coco_split) == split):
            images.append({"id": int(coco_id[i]), "file_name": f"{int(coco_id[i]):012d}.jpg",
                           "height": image_size, "width": image_size})
            for c in captions[i]:
                annotations.append({"image_id": int(coco_id[i]), "id": ann_id, "caption": c})
                ann_id += 1
        data = {"info": {"description": "MindSemantix simulated study (toyworld) captions",
                         "version": "1.0"},
                "licenses": [], "images": images, "annotations": annotations}
        (folder / f"captions_{split}.json").write_text(json.dumps(data))
