"""Shard datasets (docs/formats.md): writer, index and sample decoding.

```
OUT/manifest.json                   written last: a folder without it is not a dataset
OUT/subjects/<subject>.nii.gz       ROI mask (uint8 0/1) in the subject's volume space
OUT/<split>/<split>-NNNNNN.tar      WebDataset tars: <key>.fmri.npy, .meta.json, .captions.json, .image.png
```

The shards are plain WebDataset tars (`webdataset.WebDataset` reads them). Our reader indexes the tar
members instead of streaming them, so the datamodule can give every DDP rank the same number of
steps, see every sample exactly once per epoch, and resume mid-epoch (see datamodule.py).

Only npy / json / png / txt are ever decoded; `np.load(..., allow_pickle=False)` — nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import nibabel as nib
import numpy as np
from PIL import Image

from mindsemantix.io import atomic_dir

log = logging.getLogger(__name__)

FORMAT = "mindsemantix-shards/1"
SPLITS = ("train", "val", "test")
SUBJECT_RE = re.compile(r"[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*")  # letters, digits, '_', inner '-'; no dots or slashes
KEY_RE = re.compile(SUBJECT_RE.pattern + r"-\d{6}")  # <subject>-<6 digits>; always used with fullmatch
FIELD_EXT = {"fmri": "fmri.npy", "meta": "meta.json", "captions": "captions.json", "image": "image.png"}
REQUIRED_META = ("subject", "image_id", "trials", "split")
MAX_IMAGE_PIXELS = 4096 * 4096  # larger "stimuli" are refused before decoding (decompression bombs)
SHARD_SKIPS = ("missing_shard", "bad_shard")  # skip reasons that count shards; the others count samples


class ShardError(ValueError):
    """Bad input in a shard dataset; the message names the file (and key) and the problem."""


# ---------------------------------------------------------------------------------------------
# Writing


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata -> reproducible sha256
    tar.addfile(info, io.BytesIO(data))


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Write a shard dataset (docs/formats.md) atomically.

    ```
    with ShardWriter(out, dataset="nsd", samples_per_shard=500) as w:
        w.add_subject("subj01", nib.load("nsdgeneral.nii.gz"))     # ROI = voxels == 1
        w.write("train", "subj01-000123", fmri=(R, V) array, meta={...}, captions=[...], image=HxWx3 uint8)
    ```
    The dataset is built in a hidden sibling folder and moved to `out` only when the `with` block
    ends without an exception, after `manifest.json` is written: a killed writer never leaves a
    folder that reads as complete, and an older complete dataset at `out` stays until replaced.
    """

    def __init__(self, out: str | os.PathLike, dataset: str, *, samples_per_shard: int = 500,
                 extra: dict[str, Any] | None = None, overwrite: bool = True):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out, self.dataset, self.samples_per_shard = Path(out), dataset, samples_per_shard
        self.extra = dict(extra or {})
        self._stack = contextlib.ExitStack()
        self._root = self._stack.enter_context(atomic_dir(self.out, overwrite=overwrite))
        self._subjects: dict[str, dict[str, Any]] = {}
        self._splits: dict[str, dict[str, Any]] = {}
        self._open: dict[str, tuple[tarfile.TarFile, Path, int]] = {}  # split -> (tar, path, n in it)
        self._keys: set[str] = set()
        self._closed = False

    @property
    def building_in(self) -> Path:
        """The hidden temporary folder the dataset is built in until `close()` moves it to `out`."""
        return self._root

    # -- subjects
    def add_subject(self, subject: str, mask: nib.spatialimages.SpatialImage | str | os.PathLike,
                    roi_value: int = 1, **info: Any) -> int:
        """Register a subject with its ROI (`mask == roi_value`); returns its voxel count."""
        if not SUBJECT_RE.fullmatch(subject):
            raise ShardError(f"subject name {subject!r} must be letters, digits, '_' or '-' (no dots)")
        if subject in self._subjects:
            raise ShardError(f"subject {subject!r} added twice")
        img = nib.load(str(mask)) if isinstance(mask, (str, os.PathLike)) else mask
        data = np.asarray(img.dataobj)
        if data.ndim != 3:
            raise ShardError(f"mask of {subject!r} must be 3-D, got shape {data.shape}")
        roi = (data == roi_value).astype(np.uint8)
        n_voxels = int(roi.sum())
        if n_voxels == 0:
            raise ShardError(f"mask of {subject!r} has no voxel == {roi_value}")
        rel = f"subjects/{subject}.nii.gz"
        (self._root / "subjects").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(roi, img.affine), str(self._root / rel))
        self._subjects[subject] = {"n_voxels": n_voxels, "mask": rel, "shape": list(roi.shape), **info}
        return n_voxels

    # -- samples
    def write(self, split: str, key: str, fmri: np.ndarray, meta: dict[str, Any],
              captions: list[str] | None = None, image: np.ndarray | None = None) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if split not in SPLITS:
            raise ShardError(f"{key}: split must be one of {SPLITS}, got {split!r}")
        if not KEY_RE.fullmatch(key):
            raise ShardError(f"key {key!r} must be '<subject>-<6 digits>' with no dots")
        if key in self._keys:
            raise ShardError(f"key {key!r} written twice")
        meta = {**meta, "split": split}
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise ShardError(f"{key}: meta lacks {missing}")
        subject = meta["subject"]
        if subject not in self._subjects:
            raise ShardError(f"{key}: subject {subject!r} was not added (add_subject first)")
        if not key.startswith(subject + "-"):
            raise ShardError(f"{key}: key must start with its subject {subject!r}")
        fmri = np.asarray(fmri)
        n_voxels = self._subjects[subject]["n_voxels"]
        if fmri.ndim != 2 or fmri.shape[1] != n_voxels or fmri.shape[0] < 1:
            raise ShardError(f"{key}: fmri must have shape (R, {n_voxels}) for {subject}, got {fmri.shape}")
        if len(meta["trials"]) != fmri.shape[0]:
            raise ShardError(f"{key}: {fmri.shape[0]} repetitions but {len(meta['trials'])} trials in meta")
        fmri16 = fmri.astype(np.float16)
        if not np.isfinite(fmri16).all():
            raise ShardError(f"{key}: fmri has NaN/inf values (or values beyond float16 range)")
        members = {FIELD_EXT["fmri"]: encode_npy(fmri16), FIELD_EXT["meta"]: json.dumps(meta).encode()}
        if captions is not None:
            if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
                raise ShardError(f"{key}: captions must be a non-empty list of non-empty strings")
            members[FIELD_EXT["captions"]] = json.dumps(list(captions)).encode()
        if image is not None:
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ShardError(f"{key}: image must be HxWx3 uint8, got {image.dtype} {image.shape}")
            members[FIELD_EXT["image"]] = encode_png(image)

        tar = self._shard_for(split)
        for ext, data in members.items():
            _tar_member(tar, f"{key}.{ext}", data)
        self._keys.add(key)
        t, path, n = self._open[split]
        self._open[split] = (t, path, n + 1)
        if n + 1 >= self.samples_per_shard:
            self._finish_shard(split)

    def _shard_for(self, split: str) -> tarfile.TarFile:
        if split not in self._open:
            info = self._splits.setdefault(split, {"n_samples": 0, "shards": []})
            rel = f"{split}/{split}-{len(info['shards']):06d}.tar"
            (self._root / split).mkdir(exist_ok=True)
            self._open[split] = (tarfile.open(self._root / rel, "w", format=tarfile.USTAR_FORMAT), Path(rel), 0)
        return self._open[split][0]

    def _finish_shard(self, split: str) -> None:
        tar, rel, n = self._open.pop(split)
        tar.close()
        path = self._root / rel
        info = self._splits[split]
        info["shards"].append({"file": str(rel), "n_samples": n, "sha256": sha256_file(path),
                               "bytes": path.stat().st_size})
        info["n_samples"] += n

    def close(self) -> Path:
        """Finish open shards, write manifest.json, move the dataset into place."""
        if self._closed:
            return self.out
        for split in list(self._open):
            self._finish_shard(split)
        if not self._keys:
            raise ShardError(f"{self.out}: no samples were written")
        manifest = {"format": FORMAT, "dataset": self.dataset, "subjects": self._subjects,
                    "splits": {s: self._splits[s] for s in SPLITS if s in self._splits}, **self.extra}
        (self._root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        self._closed = True
        self._stack.close()  # atomic rename into place
        return self.out

    def abort(self) -> None:
        for tar, _, _ in self._open.values():
            tar.close()
        self._open.clear()
        self._closed = True
        self._stack.__exit__(ShardError, ShardError("aborted"), None)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class SampleRef:
    """Where one sample's members lie: (offset, size) in the shard file, per extension."""

    key: str
    shard: str  # absolute path of the tar file
    members: dict[str, tuple[int, int]]
    subject: str = ""
    image_id: int = -1


@dataclass
class SubjectEntry:
    name: str
    n_voxels: int
    mask_path: Path
    dataset: str
    info: dict[str, Any] = field(default_factory=dict)

    def coords_mm(self) -> np.ndarray:
        """(V, 3) float32 voxel centres in millimetres, in shard voxel order (C-order nonzero)."""
        img = nib.load(str(self.mask_path))
        ijk = np.stack(np.nonzero(np.asarray(img.dataobj) > 0), axis=1)  # (V, 3)
        if len(ijk) != self.n_voxels:
            raise ShardError(f"{self.mask_path}: mask has {len(ijk)} voxels, manifest says {self.n_voxels}")
        return nib.affines.apply_affine(img.affine, ijk).astype(np.float32)


def checked_key(key: str) -> str:
    """`key` if it has the writer's form ('<subject>-<6 digits>', nothing that makes a path), else ShardError.
    Output file names built from keys (`<key>.png`) use only keys that passed this."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ShardError(f"key {key!r} is not '<subject>-<6 digits>' (letters, digits, '_', '-'; no dots or slashes)")
    return key


def confined(root: Path, rel: Any, what: str) -> Path:
    """root / rel, refusing anything that leaves the dataset folder (absolute paths, '..', symlinks out)."""
    where = root / "manifest.json"
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise ShardError(f"{where}: {what} path {rel!r} must be relative to the dataset folder")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise ShardError(f"{where}: {what} path {rel!r} leaves the dataset folder {root}")
    return path


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    root = Path(root)
    path = root / "manifest.json"
    if not root.is_dir():
        raise ShardError(f"{root}: dataset folder does not exist")
    if not path.is_file():
        raise ShardError(f"{path} is missing: {root} is not a complete shard dataset "
                         "(an interrupted recipe leaves no manifest; re-run it)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    for k in ("dataset", "subjects", "splits"):
        if k not in manifest:
            raise ShardError(f"{path}: no {k!r} entry")
    for subject in manifest["subjects"]:
        if not SUBJECT_RE.fullmatch(subject):
            raise ShardError(f"{path}: subject name {subject!r} must be letters, digits, '_' or '-' (no dots or slashes)")
    for split in manifest["splits"]:
        if split not in SPLITS:
            raise ShardError(f"{path}: split {split!r} is not one of {SPLITS}")
    return manifest


VERIFY_CACHE = ".mindsemantix-verified.json"


class VerifyCache:
    """Remembers which shards' sha256 matched the manifest, so a restarted run does not re-hash
    terabytes. A verdict holds while the manifest (by its sha256) and the shard's size and mtime are
    unchanged; anything else is hashed again. Kept in the dataset folder (`.mindsemantix-verified.json`),
    or, where that is read-only, under `$XDG_CACHE_HOME/mindsemantix/verified/` (or ~/.cache)."""

    def __init__(self, root: Path, fresh: bool = False):
        self.root = root
        self.manifest_sha256 = sha256_file(root / "manifest.json")
        self.path = self._location()
        self.entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if fresh:  # hash everything again (and record the new verdicts)
            return
        with contextlib.suppress(OSError, ValueError, AttributeError):
            saved = json.loads(self.path.read_text())
            if saved.get("manifest_sha256") == self.manifest_sha256:
                self.entries = dict(saved["shards"])

    def _location(self) -> Path:
        if os.access(self.root, os.W_OK):
            return self.root / VERIFY_CACHE
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        name = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:20]
        return base / "mindsemantix" / "verified" / f"{name}.json"

    @staticmethod
    def _stamp(path: Path, expected: str) -> dict[str, Any]:
        st = path.stat()
        return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected}

    def verdict(self, rel: str, path: Path, expected: str) -> bool | None:
        entry = self.entries.get(rel)
        if entry and {k: entry.get(k) for k in ("bytes", "mtime_ns", "sha256")} == self._stamp(path, expected):
            return bool(entry["ok"])
        return None

    def record(self, rel: str, path: Path, expected: str, ok: bool) -> None:
        self.entries[rel] = {**self._stamp(path, expected), "ok": ok}
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        from mindsemantix.io import write_json_atomic

        try:
            write_json_atomic(self.path, {"manifest_sha256": self.manifest_sha256, "shards": self.entries})
            self._dirty = False
        except OSError as e:  # a cache: failing to keep it costs time, not correctness
            log.warning("could not save the checksum cache %s (%s); shards will be hashed again next time", self.path, e)


class ShardDataset:
    """One shard dataset: manifest, subjects, and an index of every sample's tar members.

    `on_error="raise"` (default) turns any bad shard or sample into a ShardError naming the file and
    key; `"skip"` drops it, counts it in `self.skipped` and logs a warning. `verify="sha256"` checks
    each shard's checksum once per dataset version (see VerifyCache; `rehash=True` ignores earlier
    verdicts); "size" checks sizes only.
    """

    def __init__(self, root: str | os.PathLike, *, verify: str = "sha256", on_error: str = "raise",
                 rehash: bool = False):
        if verify not in ("sha256", "size", "none"):
            raise ValueError(f"verify must be 'sha256', 'size' or 'none', got {verify!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root, self.verify, self.on_error = Path(root), verify, on_error
        self.manifest = read_manifest(self.root)
        self.name = self.manifest["dataset"]
        self.skipped: dict[str, int] = {}
        self.problems: list[str] = []  # the messages of what was skipped, in order
        self.subjects = {
            s: SubjectEntry(s, int(info["n_voxels"]), confined(self.root, info.get("mask"), f"mask of {s}"), self.name, info)
            for s, info in self.manifest["subjects"].items()
        }
        for entry in self.subjects.values():
            if not entry.mask_path.is_file():
                raise ShardError(f"{entry.mask_path}: mask of subject {entry.name} is missing")
        self._index: dict[str, list[SampleRef]] = {}
        self._verify_cache = VerifyCache(self.root, fresh=rehash) if verify == "sha256" else None

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def _skip(self, reason: str, message: str) -> None:
        if self.on_error == "raise":
            raise ShardError(message)
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.problems.append(message)
        log.warning("skipping: %s", message)

    def samples(self, split: str) -> list[SampleRef]:
        """Index of `split` (built once): shards checked, members located, npy headers checked."""
        if split not in self._index:
            refs: list[SampleRef] = []
            for shard in self.manifest["splits"].get(split, {}).get("shards", []):
                refs.extend(self._index_shard(shard))
            self._index[split] = refs
            if self._verify_cache is not None:
                self._verify_cache.save()
        return self._index[split]

    def _index_shard(self, shard: dict[str, Any]) -> list[SampleRef]:
        path = confined(self.root, shard.get("file"), "shard")
        if not path.is_file():
            self._skip("missing_shard", f"{path}: shard listed in the manifest is missing")
            return []
        size = path.stat().st_size
        if self.verify in ("sha256", "size") and "bytes" in shard and size != shard["bytes"]:
            self._skip("bad_shard", f"{path}: {size} bytes, manifest says {shard['bytes']} (truncated or replaced)")
            return []
        if self.verify == "sha256" and not self._checksum_ok(shard["file"], path, shard["sha256"]):
            self._skip("bad_shard", f"{path}: sha256 does not match the manifest (corrupt or modified)")
            return []
        grouped: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > size:
                        raise tarfile.ReadError(f"member {member.name} runs past the end of the file")
                    key, _, ext = member.name.partition(".")
                    if ext in grouped.get(key, {}):
                        raise tarfile.ReadError(f"member {member.name} appears twice (duplicate key {key!r})")
                    grouped.setdefault(key, {})[ext] = (member.offset_data, member.size)
        except (tarfile.TarError, OSError, EOFError) as e:
            self._skip("bad_shard", f"{path}: unreadable or truncated tar ({e})")
            return []
        if len(grouped) != shard["n_samples"]:
            # in skip mode the readable samples are kept; each is checked below
            self._skip("bad_shard", f"{path}: holds {len(grouped)} samples, manifest says {shard['n_samples']}")
        refs = []
        with open(path, "rb") as f:
            for key, members in grouped.items():
                ref = self._check_sample(f, path, key, members)
                if ref is not None:
                    refs.append(ref)
        return refs

    def _checksum_ok(self, rel: str, path: Path, expected: str) -> bool:
        assert self._verify_cache is not None
        ok = self._verify_cache.verdict(rel, path, expected)
        if ok is None:
            ok = sha256_file(path) == expected
            self._verify_cache.record(rel, path, expected, ok)
        return ok

    def _check_sample(self, f, path: Path, key: str, members: dict[str, tuple[int, int]]) -> SampleRef | None:
        where = f"{path} [{key!r}]"
        if not KEY_RE.fullmatch(key):
            self._skip("bad_key", f"{where}: key is not '<subject>-<6 digits>' (letters, digits, '_', '-'; no dots or slashes)")
            return None
        where = f"{path} [{key}]"
        for ext in (FIELD_EXT["fmri"], FIELD_EXT["meta"]):
            if ext not in members:
                self._skip("missing_member", f"{where}: no {ext}")
                return None
        subject = key.rsplit("-", 1)[0]
        if subject not in self.subjects:
            self._skip("unknown_subject", f"{where}: subject {subject!r} is not in the manifest")
            return None
        # The npy header (first bytes) gives dtype and shape without reading the voxels.
        off, n = members[FIELD_EXT["fmri"]]
        f.seek(off)
        try:
            header = io.BytesIO(f.read(min(n, 4096)))
            version = np.lib.format.read_magic(header)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(header)
        except (ValueError, OSError, EOFError, SyntaxError) as e:
            self._skip("bad_fmri", f"{where}: fmri.npy is not a valid npy array ({e})")
            return None
        expected = self.subjects[subject].n_voxels
        if len(shape) != 2 or shape[1] != expected or dtype.kind != "f":
            self._skip("bad_fmri", f"{where}: fmri.npy has shape {shape} dtype {dtype}, expected (R, {expected}) float "
                                   f"for {subject} per the manifest")
            return None
        if shape[0] < 1:  # a mean over no repetitions is NaN
            self._skip("bad_fmri", f"{where}: fmri.npy has 0 repetitions (shape {shape})")
            return None
        # the header must describe exactly the bytes that follow (an absurd row count would be a MemoryError later)
        if header.tell() + shape[0] * shape[1] * dtype.itemsize != n:
            self._skip("bad_fmri", f"{where}: fmri.npy header declares shape {shape} {dtype} but the member holds {n} bytes")
            return None
        return SampleRef(key=key, shard=str(path), members=members, subject=subject,
                         image_id=int(key.rsplit("-", 1)[1]))


class SampleReader:
    """Random access to samples by SampleRef; keeps one open file per shard, per process."""

    def __init__(self):
        self._files: dict[str, Any] = {}
        self._pid = os.getpid()

    def _file(self, path: str):
        if os.getpid() != self._pid:  # after a fork (DataLoader workers) reopen everything
            self._files, self._pid = {}, os.getpid()
        if path not in self._files:
            self._files[path] = open(path, "rb")
        return self._files[path]

    def read(self, ref: SampleRef, ext: str) -> bytes:
        if ext not in ref.members:
            raise ShardError(f"{ref.shard} [{ref.key}]: no {ext}")
        off, n = ref.members[ext]
        f = self._file(ref.shard)
        f.seek(off)
        data = f.read(n)
        if len(data) != n:
            raise ShardError(f"{ref.shard} [{ref.key}]: {ext} is truncated")
        return data

    def fmri(self, ref: SampleRef) -> np.ndarray:
        """(R, V) float32; raises ShardError on undecodable or non-finite data."""
        try:
            arr = np.load(io.BytesIO(self.read(ref, FIELD_EXT["fmri"])), allow_pickle=False)
        except (ValueError, OSError, EOFError, SyntaxError) as e:
            raise ShardError(f"{ref.shard} [{ref.key}]: fmri.npy undecodable ({e})") from e
        if arr.ndim != 2 or arr.shape[0] < 1:
            raise ShardError(f"{ref.shard} [{ref.key}]: fmri.npy has shape {arr.shape}, expected (R >= 1, V)")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ShardError(f"{ref.shard} [{ref.key}]: fmri has {bad} NaN/inf values")
        return arr

    def json(self, ref: SampleRef, field_name: str) -> Any:
        if field_name == "captions":
            return self.captions(ref)
        return self._json(ref, field_name)

    def _json(self, ref: SampleRef, field_name: str) -> Any:
        try:
            return json.loads(self.read(ref, FIELD_EXT[field_name]))
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; absurdly deep nesting
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise ShardError(f"{ref.shard} [{ref.key}]: {FIELD_EXT[field_name]} is not valid JSON ({reason})") from None

    def captions(self, ref: SampleRef) -> list[str]:
        """The sample's captions: a non-empty list of non-empty strings, or ShardError."""
        captions = self._json(ref, "captions")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ShardError(f"{ref.shard} [{ref.key}]: captions.json must be a non-empty list of non-empty strings, "
                             f"got {str(captions)[:60]!r}")
        return captions

    def image(self, ref: SampleRef) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(self.read(ref, FIELD_EXT["image"]))) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:  # checked before decoding anything
                    raise ShardError(f"{ref.shard} [{ref.key}]: image.png is {im.width}x{im.height} pixels, "
                                     f"more than the {MAX_IMAGE_PIXELS} a stimulus may have")
                return np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
        except ShardError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ShardError(f"{ref.shard} [{ref.key}]: image.png undecodable ({e})") from e

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def inspect(root: str | os.PathLike, checksums: bool = True) -> list[str]:
    """Human-readable summary of a dataset; raises ShardError on any inconsistency."""
    ds = ShardDataset(root, verify="sha256" if checksums else "size", rehash=True)
    lines = [f"dataset {ds.name} at {ds.root} ({FORMAT})", "subjects:"]
    for s in ds.subjects.values():
        lines.append(f"  {s.name}: {s.n_voxels} voxels, mask {s.mask_path.relative_to(ds.root)}")
    lines.append("splits:")
    for split in ds.splits:
        refs = ds.samples(split)
        per_subject: dict[str, int] = {}
        for r in refs:
            per_subject[r.subject] = per_subject.get(r.subject, 0) + 1
        n_shards = len(ds.manifest["splits"][split]["shards"])
        expected = ds.manifest["splits"][split]["n_samples"]
        if len(refs) != expected:
            raise ShardError(f"{ds.root}: split {split} indexes {len(refs)} samples, manifest says {expected}")
        lines.append(f"  {split}: {len(refs)} samples in {n_shards} shards ("
                     + ", ".join(f"{k} {v}" for k, v in sorted(per_subject.items())) + ")")
    lines.append("checks: manifest counts OK" + (", sha256 OK" if checksums else ", sizes OK (checksums skipped)"))
    return lines


def deep_inspect(root: str | os.PathLike, checksums: bool = True) -> tuple[int, list[str]]:
    """Decode every sample of every split: (samples decoded, problems). Problems are one line each:
    unreadable shards, bad keys, NaN/inf voxels, zero repetitions, undecodable PNGs, bad captions or
    meta, keys found twice, and test-set leaks: an image (by image_id or by its decoded pixels) in the
    test split of one subject and in train/val of any subject."""
    quiet = log.level
    log.setLevel(logging.ERROR)  # what is skipped comes back in the problems, not as warnings too
    try:
        ds = ShardDataset(root, verify="sha256" if checksums else "size", on_error="skip", rehash=True)
        for split in ds.splits:
            ds.samples(split)
    finally:
        log.setLevel(quiet)
    reader = SampleReader()
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    images: dict[str, dict[Any, str]] = {"test": {}, "train/val": {}}  # image_id or pixel digest -> key
    n = 0
    try:
        for split in ds.splits:
            group = images["test" if split == "test" else "train/val"]
            for ref in ds.samples(split):
                where = f"{ref.shard} [{ref.key}]"
                if ref.key in first_seen:
                    problems.append(f"{where}: duplicate key, also in {first_seen[ref.key]}")
                first_seen.setdefault(ref.key, ref.shard)
                n += 1
                try:
                    reader.fmri(ref)
                    meta = reader.json(ref, "meta")
                    if not isinstance(meta, dict) or meta.get("subject") != ref.subject or meta.get("split") != split:
                        problems.append(f"{where}: meta.json subject/split {str(meta)[:80]!r} disagree with the key and split {split}")
                    if FIELD_EXT["captions"] in ref.members:
                        reader.captions(ref)
                    group.setdefault(("id", ref.image_id), ref.key)
                    if FIELD_EXT["image"] in ref.members:
                        pixels = reader.image(ref)
                        digest = hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
                        group.setdefault(("pixels", digest), ref.key)
                except ShardError as e:
                    problems.append(str(e))
    finally:
        reader.close()
    for what, key in images["test"].items():
        other = images["train/val"].get(what)
        if other is not None:
            kind = f"image_id {what[1]}" if what[0] == "id" else "the same pixels"
            problems.append(f"{ds.root}: test-set leak: {kind} in test ({key}) and in train/val ({other})")
    return n, ds.problems + problems


def iter_split(ds: ShardDataset, split: str, fields: Iterable[str] = ("fmri", "meta")):
    """Plain sequential iteration over a split (recipes, baselines, tests)."""
    reader = SampleReader()
    try:
        for ref in ds.samples(split):
            out: dict[str, Any] = {"key": ref.key, "subject": ref.subject}
            for name in fields:
                if name == "fmri":
                    out["fmri"] = reader.fmri(ref)
                elif name == "image":
                    out["image"] = reader.image(ref)
                else:
                    out[name] = reader.json(ref, name)
            yield out
    finally:
        reader.close()
