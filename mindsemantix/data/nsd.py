"""The Natural Scenes Dataset release layout (Allen et al. 2022): paths and checked readers.

Used by `data_recipes/nsd.py` (reading the real release or the simulated one) and by the simulator
(`mindsemantix.simulate.nsd_layout`, writing the same paths). Conventions of the release:

* `nsddata/experiments/nsd/nsd_expdesign.mat` (MATLAB v5): `masterordering` (1 x 30000, 1-based
  indices into a subject's 10000 images), `subjectim` (8 x 10000, 1-based 73k ids), `sharedix`
  (1 x 1000, 1-based 73k ids of the images every subject saw). Trial t (1-based) of subject s shows
  the 73k id `subjectim[s-1, masterordering[t-1]-1]`; the 0-based nsdId is that minus 1.
* `nsddata/experiments/nsd/nsd_stim_info_merged.csv`: one row per 73k image; columns (after an
  unnamed index) cocoId, cocoSplit, cropBox, loss, nsdId, flagged, BOLD5000, shared1000,
  subject1..subject8, subjectK_rep0..rep2 (1-based trial numbers, 0 if not shown).
* `nsddata_betas/ppdata/subjAA/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionNN.nii.gz`:
  int16, X x Y x Z x 750 trials, percent signal change x 300. The `.hdf5` variant holds dataset
  `betas`, written from MATLAB as X x Y x Z x 750, so h5py (C order) sees (750, Z, Y, X).
* `nsddata/ppdata/subjAA/func1pt8mm/roi/nsdgeneral.nii.gz`: -1 / 0 / 1, ROI = 1.
* `nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5`: dataset `imgBrick`, (73000, 425, 425, 3) uint8.
* COCO caption annotations (not part of the release; from cocodataset.org, 2017 splits), by
  convention in `nsddata_stimuli/stimuli/nsd/annotations/captions_{train,val}2017.json`, matched
  to images by cocoId.

Every reader checks what it reads and raises `NSDError` naming the file and the problem.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import zlib
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

TRIALS_PER_SESSION = 750
BETA_SCALE = 300.0  # stored int16 betas = percent signal change x 300


class NSDError(ValueError):
    """Missing or inconsistent NSD input; the message names the file and the problem."""


def subject_name(subject: int) -> str:
    return f"subj{subject:02d}"


@dataclasses.dataclass(frozen=True)
class NSDLayout:
    """Paths of one NSD-layout tree (the real release or the simulated study)."""

    root: Path
    space: str = "func1pt8mm"
    betas_type: str = "betas_fithrf_GLMdenoise_RR"

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def expdesign(self) -> Path:
        return self.root / "nsddata/experiments/nsd/nsd_expdesign.mat"

    @property
    def stim_info(self) -> Path:
        return self.root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv"

    @property
    def stimuli(self) -> Path:
        return self.root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"

    @property
    def annotations(self) -> Path:
        return self.root / "nsddata_stimuli/stimuli/nsd/annotations"

    def ppdata(self, subject: int) -> Path:
        return self.root / "nsddata/ppdata" / subject_name(subject) / self.space

    def roi(self, subject: int, name: str = "nsdgeneral") -> Path:
        return self.ppdata(subject) / "roi" / f"{name}.nii.gz"

    def betas_dir(self, subject: int) -> Path:
        return self.root / "nsddata_betas/ppdata" / subject_name(subject) / self.space / self.betas_type

    def betas(self, subject: int, session: int, ext: str = "nii.gz") -> Path:
        return self.betas_dir(subject) / f"betas_session{session:02d}.{ext}"

    def subjects_with_betas(self) -> list[int]:
        found = []
        for d in sorted((self.root / "nsddata_betas/ppdata").glob("subj[0-9][0-9]")):
            if (d / self.space / self.betas_type).is_dir():
                found.append(int(d.name[4:]))
        return found


# ----------------------------------------------------------------------------------------------
# Experimental design


@dataclasses.dataclass
class Design:
    masterordering: np.ndarray  # (T,) 1-based indices into a subject's images
    subjectim: np.ndarray  # (n_subjects, n_images) 1-based 73k ids
    sharedix: np.ndarray  # (n_shared,) 1-based 73k ids
    path: Path

    def trial_nsd_ids(self, subject: int) -> np.ndarray:
        """(T,) 0-based 73k id shown on each trial (trial t is element t-1) of subject (1-based)."""
        if not 1 <= subject <= self.subjectim.shape[0]:
            raise NSDError(f"{self.path}: subject {subject} is not in subjectim "
                           f"({self.subjectim.shape[0]} subjects)")
        return self.subjectim[subject - 1, self.masterordering - 1] - 1

    @property
    def shared_nsd_ids(self) -> np.ndarray:
        """0-based 73k ids of the shared images (the test images)."""
        return self.sharedix - 1


def load_design(path: str | Path) -> Design:
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise NSDError(f"{path}: experimental design file is missing")
    if h5py.is_hdf5(str(path)):  # MATLAB v7.3 files are HDF5, with MATLAB's axes reversed
        with h5py.File(path, "r") as f:
            mat = {k: np.asarray(f[k]).T for k in ("masterordering", "subjectim", "sharedix") if k in f}
    else:
        try:
            mat = scipy.io.loadmat(str(path))
        except Exception as e:  # scipy raises several types for a bad .mat
            raise NSDError(f"{path}: not a readable MATLAB file ({e})") from e
    missing = [k for k in ("masterordering", "subjectim", "sharedix") if k not in mat]
    if missing:
        raise NSDError(f"{path}: lacks {missing}")
    order = np.asarray(mat["masterordering"]).astype(np.int64).ravel()
    subjectim = np.asarray(mat["subjectim"]).astype(np.int64)
    shared = np.asarray(mat["sharedix"]).astype(np.int64).ravel()
    if subjectim.ndim != 2:
        raise NSDError(f"{path}: subjectim must be 2-D (subjects x images), got {subjectim.shape}")
    if order.min() < 1 or order.max() > subjectim.shape[1]:
        raise NSDError(f"{path}: masterordering values must be 1..{subjectim.shape[1]} (1-based), "
                       f"got {order.min()}..{order.max()}")
    if subjectim.min() < 1 or shared.min() < 1:
        raise NSDError(f"{path}: subjectim and sharedix hold 1-based 73k ids; found values < 1")
    return Design(order, subjectim, shared, path)


# ----------------------------------------------------------------------------------------------
# Stimulus information and captions


@dataclasses.dataclass
class StimInfo:
    coco_id: np.ndarray  # (n_images,) indexed by 0-based nsdId
    coco_split: list[str]
    rep_trials: dict[int, np.ndarray]  # subject -> (n_images, 3) 1-based trials, 0 = not shown
    path: Path


def load_stim_info(path: str | Path) -> StimInfo:
    """nsd_stim_info_merged.csv, rows placed by nsdId."""
    path = Path(path)
    if not path.is_file():
        raise NSDError(f"{path}: stimulus information file is missing")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise NSDError(f"{path}: empty file")
        col = {name: i for i, name in enumerate(header)}
        missing = [c for c in ("cocoId", "cocoSplit", "nsdId") if c not in col]
        if missing:
            raise NSDError(f"{path}: lacks columns {missing} (has {header[:12]}...)")
        rep_cols = {}
        for name in header:
            m = re.fullmatch(r"subject(\d+)_rep([0-2])", name)
            if m:
                rep_cols.setdefault(int(m.group(1)), {})[int(m.group(2))] = col[name]
        rows = list(reader)
    try:
        nsd_id = np.array([int(r[col["nsdId"]]) for r in rows])
        coco_id = np.array([int(r[col["cocoId"]]) for r in rows])
        reps = {s: np.array([[int(float(r[c[k]])) for k in range(3)] for r in rows])
                for s, c in rep_cols.items() if len(c) == 3}
    except (ValueError, IndexError) as e:
        raise NSDError(f"{path}: malformed row ({e})") from e
    n = int(nsd_id.max()) + 1 if len(nsd_id) else 0
    if len(np.unique(nsd_id)) != len(nsd_id) or nsd_id.min() < 0:
        raise NSDError(f"{path}: nsdId values must be unique and >= 0")
    place = np.full(n, -1, dtype=np.int64)
    place[nsd_id] = np.arange(len(rows))
    coco = np.full(n, -1, dtype=np.int64)
    coco[nsd_id] = coco_id
    split = [""] * n
    for i, r in zip(nsd_id, rows):
        split[i] = r[col["cocoSplit"]]
    rep_trials = {}
    for s, arr in reps.items():
        full = np.zeros((n, 3), dtype=np.int64)
        full[nsd_id] = arr
        rep_trials[s] = full
    return StimInfo(coco, split, rep_trials, path)


def load_coco_captions(folder: str | Path) -> dict[int, list[str]]:
    """cocoId -> captions (in annotation-id order) from every `captions_*.json` in `folder`."""
    folder = Path(folder)
    files = sorted(folder.glob("captions_*.json"))
    if not files:
        raise NSDError(f"{folder}: no COCO caption files (captions_train2017.json, "
                       "captions_val2017.json) found; pass --coco-annotations DIR or --no-captions")
    by_image: dict[int, list[tuple[int, str]]] = {}
    for path in files:
        try:
            data = json.loads(path.read_text())
            annotations = data["annotations"]
            for a in annotations:
                caption = a["caption"]
                if not isinstance(caption, str) or not caption.strip():
                    raise NSDError(f"{path}: annotation {a.get('id')} of image {a.get('image_id')} has an empty "
                                   f"or non-text caption ({caption!r})")
                by_image.setdefault(int(a["image_id"]), []).append((int(a.get("id", 0)), caption.strip()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise NSDError(f"{path}: not a COCO caption annotation file ({e})") from e
    return {k: [c for _, c in sorted(v)] for k, v in by_image.items()}


# ----------------------------------------------------------------------------------------------
# ROI and betas


def load_roi(path: str | Path) -> tuple[nib.Nifti1Image, tuple[np.ndarray, ...]]:
    """The ROI image and its voxel index (C-order np.nonzero of `== 1`, the shard voxel order)."""
    path = Path(path)
    if not path.is_file():
        raise NSDError(f"{path}: ROI file is missing")
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise NSDError(f"{path}: ROI must be a 3-D volume, got shape {data.shape}")
    index = np.nonzero(data == 1)
    if len(index[0]) == 0:
        raise NSDError(f"{path}: ROI has no voxel == 1")
    return img, index


@dataclasses.dataclass(frozen=True)
class SessionFile:
    session: int
    path: Path
    fmt: str  # "nii.gz" | "hdf5"


def find_sessions(layout: NSDLayout, subject: int, betas_format: str = "auto") -> list[SessionFile]:
    """Sessions 1..N present for a subject. Trailing sessions may be absent (the release holds
    back some); a gap (session k missing while a later one exists) is an error."""
    folder = layout.betas_dir(subject)
    if not folder.is_dir():
        raise NSDError(f"{folder}: betas folder of {subject_name(subject)} is missing")
    formats = {"auto": ("hdf5", "nii.gz"), "hdf5": ("hdf5",), "nii.gz": ("nii.gz",)}[betas_format]
    found: dict[int, SessionFile] = {}
    for path in folder.iterdir():
        m = re.fullmatch(r"betas_session(\d{2})\.(nii\.gz|hdf5)", path.name)
        if m and m.group(2) in formats:
            n = int(m.group(1))
            # auto: prefer .hdf5 (reads only the ROI's bounding box) over .nii.gz
            if n not in found or formats.index(m.group(2)) < formats.index(found[n].fmt):
                found[n] = SessionFile(n, path, m.group(2))
    if not found:
        raise NSDError(f"{folder}: no betas_sessionNN.{'/'.join(formats)} files")
    numbers = sorted(found)
    gaps = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
    if gaps:
        raise NSDError(f"{folder}: session(s) {gaps} missing before session {numbers[-1]} "
                       "(only trailing sessions may be absent)")
    return [found[n] for n in numbers]


def check_session(sf: SessionFile, roi_img: nib.Nifti1Image) -> None:
    """Cheap header check of one session file against the ROI (shape, trials, affine)."""
    shape = roi_img.shape
    if sf.fmt == "nii.gz":
        try:
            img = nib.load(str(sf.path))
        except Exception as e:
            raise NSDError(f"{sf.path}: unreadable NIfTI ({e})") from e
        if img.ndim != 4 or img.shape[:3] != shape:
            raise NSDError(f"{sf.path}: betas have shape {img.shape}, the ROI {shape} "
                           f"(expected {shape} x {TRIALS_PER_SESSION})")
        if img.shape[3] != TRIALS_PER_SESSION:
            raise NSDError(f"{sf.path}: {img.shape[3]} trials, expected {TRIALS_PER_SESSION}")
        if not np.allclose(img.affine, roi_img.affine, atol=1e-3):
            raise NSDError(f"{sf.path}: affine differs from the ROI's; betas and mask are not in "
                           "the same space")
    else:
        try:
            with h5py.File(sf.path, "r") as f:
                if "betas" not in f:
                    raise NSDError(f"{sf.path}: no dataset 'betas'")
                h5shape = f["betas"].shape
        except OSError as e:
            raise NSDError(f"{sf.path}: unreadable HDF5 ({e})") from e
        expected = (TRIALS_PER_SESSION, *shape[::-1])
        if h5shape != expected:
            raise NSDError(f"{sf.path}: betas have shape {h5shape}; with the ROI's shape {shape} "
                           f"the release layout is {expected} (trials, Z, Y, X)")


def read_session_betas(sf: SessionFile, roi_index: tuple[np.ndarray, ...]) -> np.ndarray:
    """ROI betas of one session in percent signal change, (750, V) float32, V in ROI order.

    Memory: the .nii.gz variant must be decompressed whole (one session); the .hdf5 variant is
    read only over the ROI's bounding box.
    """
    try:
        if sf.fmt == "nii.gz":
            data = np.asanyarray(nib.load(str(sf.path)).dataobj)  # (X, Y, Z, 750), scaled if slope set
            roi = data[roi_index]  # (V, 750)
            del data
            return (roi.T / BETA_SCALE).astype(np.float32)
        x, y, z = roi_index
        lo = [int(a.min()) for a in (x, y, z)]
        hi = [int(a.max()) + 1 for a in (x, y, z)]
        with h5py.File(sf.path, "r") as f:
            box = f["betas"][:, lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]  # (750, z, y, x)
        roi = box[:, z - lo[2], y - lo[1], x - lo[0]]  # (750, V)
        return (roi / BETA_SCALE).astype(np.float32)
    except (OSError, EOFError, ValueError, KeyError, zlib.error) as e:  # headers passed check_session; the data did not
        raise NSDError(f"{sf.path}: unreadable betas, truncated or corrupt ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# Normalisation (the recipe's, and `mindsemantix decode`'s for new scans)


def zscore_session(betas: np.ndarray, is_test: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """Z-score each voxel with the mean and SD (ddof=0) of the non-test trials; applied to all.

    betas: (trials, V); is_test: (trials,) bool. Voxels constant over the non-test trials get 0.
    Returns the z-scored betas (float32) and the number of constant voxels.
    """
    train = betas[~is_test].astype(np.float64)
    if len(train) < 2:
        raise NSDError(f"{where}: fewer than 2 non-test trials; cannot compute z-score statistics")
    mean, sd = train.mean(0), train.std(0)
    constant = sd == 0
    z = (betas - mean) / np.where(constant, 1.0, sd)
    z[:, constant] = 0.0
    return z.astype(np.float32), int(constant.sum())


def read_volumes(path: str | Path, roi_img: nib.Nifti1Image, roi_index: tuple[np.ndarray, ...]) -> np.ndarray:
    """ROI betas of a 4-D file of any number of trials, in percent signal change: (T, V) float32.

    `.nii.gz` / `.nii`: (X, Y, Z, T) in the ROI's space (shape and affine must match); `.hdf5`: the
    NSD release layout (T, Z, Y, X) under `betas`; `.npy`: (T, V) already in ROI voxel order. Values
    are in the release's units (betas x 300) and divided by `BETA_SCALE`, as the recipe does."""
    path = Path(path)
    if not path.is_file():
        raise NSDError(f"{path}: file does not exist")
    name = path.name
    V = len(roi_index[0])
    try:
        if name.endswith(".npy"):
            data = np.load(path, allow_pickle=False)
            if data.ndim != 2 or data.shape[1] != V:
                raise NSDError(f"{path}: expected (trials, {V}) voxels in the mask's order, got shape {data.shape}")
            out = data.astype(np.float32) / BETA_SCALE
        elif name.endswith((".nii.gz", ".nii")):
            img = nib.load(str(path))
            if img.ndim != 4 or img.shape[:3] != roi_img.shape:
                raise NSDError(f"{path}: expected a 4-D volume of shape {roi_img.shape} x trials (the mask's), "
                               f"got {img.shape}")
            if not np.allclose(img.affine, roi_img.affine, atol=1e-3):
                raise NSDError(f"{path}: affine differs from the mask's; betas and mask are not in the same space")
            out = (np.asanyarray(img.dataobj)[roi_index].T / BETA_SCALE).astype(np.float32)
        elif name.endswith((".hdf5", ".h5")):
            with h5py.File(path, "r") as f:
                if "betas" not in f:
                    raise NSDError(f"{path}: no dataset 'betas'")
                if f["betas"].ndim != 4 or f["betas"].shape[1:] != roi_img.shape[::-1]:
                    raise NSDError(f"{path}: betas have shape {f['betas'].shape}; with the mask's shape "
                                   f"{roi_img.shape} the layout is (trials, {', '.join(map(str, roi_img.shape[::-1]))})")
            out = read_session_betas(SessionFile(0, path, "hdf5"), roi_index)
        else:
            raise NSDError(f"{path}: unknown file type (expected .nii.gz, .nii, .hdf5 or .npy)")
    except (OSError, EOFError, ValueError, zlib.error) as e:
        if isinstance(e, NSDError):
            raise
        raise NSDError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if not np.isfinite(out).all():
        raise NSDError(f"{path}: {int((~np.isfinite(out)).sum())} NaN/inf values inside the mask")
    return out
