"""BrainDataModule: the one LightningDataModule of all three stages, over shard datasets (docs/formats.md).

Batches are **subject-homogeneous**: subjects have different voxel counts, and every model keeps a
small input layer per subject, so a batch holds one subject's samples (the choice MindEye2 made
for its per-subject ridge layers). Batch dict, per docs/architecture.md:

    subject: str   fmri: (B, V_subject) float32   key: list[str]   image_id: (B,) long
    captions: list[list[str]] (if requested)       image: (B, 3, H, W) uint8 (if requested)
    fmri_target: (B, V_subject) float32 (training with train_repetition "cross" only)

Distributed guarantees (the WebDataset-under-DDP pitfalls of earlier brain-decoding code — duplicated or dropped samples per rank — cannot happen here):
- the whole epoch is planned from (seed, epoch) alone, identically on every rank: every sample
  lands in exactly one batch, and the batch list is then dealt out round-robin;
- the number of batches is made a multiple of the world size by splitting the largest batches
  (never by padding or duplicating), so every rank runs the same number of steps and val/test
  score each sample exactly once;
- `len()` is exact for this rank (an over-count silently skips validation in Lightning);
- the loader is stateful: its position is saved in Lightning checkpoints and a resumed run
  continues with the next unseen batch; the repetition drawn for a sample depends only on
  (seed, epoch, sample), so resumed and uninterrupted runs see identical data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mindsemantix.data.shards import FIELD_EXT, SHARD_SKIPS, SampleReader, SampleRef, ShardDataset, ShardError

TRIALS_PER_SESSION = 750  # NSD: global 1-based trial t lies in session (t - 1) // 750 + 1

log = logging.getLogger(__name__)

FIELDS = ("fmri", "captions", "image")
REPETITIONS = ("random", "mean", "cross")


@dataclass
class SubjectInfo:
    name: str
    n_voxels: int
    coords_mm: np.ndarray  # (V, 3) float32, shard voxel order
    dataset: str
    mask_path: Path        # the subject's ROI mask (NIfTI) in the dataset


# ---------------------------------------------------------------------------------------------
# Epoch planning


def plan_batches(groups: dict[str, np.ndarray], batch_size: int, world_size: int,
                 rng: np.random.Generator | None) -> list[np.ndarray]:
    """Cut each subject's sample indices into batches of <= batch_size; return the whole epoch's list.

    The count is rounded up to a multiple of `world_size` by splitting the subjects' batches more
    finely (never by repeating samples). `rng` shuffles samples and batch order; None keeps order.
    """
    subjects = sorted(groups)
    n = {s: len(groups[s]) for s in subjects}
    k = {s: -(-n[s] // batch_size) for s in subjects if n[s] > 0}  # ceil
    total = sum(k.values())
    target = -(-total // world_size) * world_size
    if sum(n.values()) < target:
        raise ValueError(f"{sum(n.values())} samples cannot fill {target} batches for {world_size} ranks "
                         f"(need at least one sample per batch); use fewer ranks or more data")
    for _ in range(target - total):  # split where batches are largest
        s = max((s for s in k if k[s] < n[s]), key=lambda s: (n[s] / k[s], s))
        k[s] += 1
    batches = []
    for s in subjects:
        if s not in k:
            continue
        idx = groups[s].copy()
        if rng is not None:
            rng.shuffle(idx)
        batches.extend(np.array_split(idx, k[s]))
    if rng is not None:
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
    return batches


class SubjectBatchSampler:
    """This rank's subject-homogeneous batches of one epoch (see plan_batches).

    Yields lists of `(sample index, epoch)` so the dataset can draw a repetition that depends on
    the epoch without shared state.
    """

    def __init__(self, groups: dict[str, np.ndarray], batch_size: int, *, shuffle: bool, seed: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.groups, self.batch_size, self.shuffle, self.seed = groups, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self._len = len(self.epoch_batches(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        return plan_batches(self.groups, self.batch_size, self.world_size, rng)[self.rank::self.world_size]

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self.iter_from(self.epoch, 0)

    def iter_from(self, epoch: int, start: int) -> Iterator[list[tuple[int, int]]]:
        for batch in self.epoch_batches(epoch)[start:]:
            yield [(int(i), epoch) for i in batch]


# ---------------------------------------------------------------------------------------------
# Samples


class SampleSet(Dataset):
    """Decodes the requested fields of indexed samples. Item = (index, epoch)."""

    def __init__(self, refs: list[SampleRef], fields: Sequence[str], repetition: str, seed: int,
                 image_size: int | None, on_error: str, kept: dict[str, np.ndarray] | None = None):
        if repetition not in REPETITIONS:
            raise ValueError(f"repetition must be one of {REPETITIONS}, got {repetition!r}")
        self.refs, self.fields, self.repetition, self.seed = refs, tuple(fields), repetition, seed
        self.kept = kept or {}  # key -> the repetitions (rows of fmri) to use; absent: all of them
        self.image_size, self.on_error = image_size, on_error
        self.reader = SampleReader()

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        """The sample's fields, or `{"skipped": key}` for a bad sample under on_error "skip"."""
        index, epoch = item
        ref = self.refs[index]
        try:
            repetitions = self.reader.fmri(ref)  # (R, V)
            if ref.key in self.kept:
                repetitions = repetitions[self.kept[ref.key]]  # (R', V): only the allowed sessions' trials
            target = None
            if self.repetition == "mean":
                fmri = repetitions.mean(0)
            else:  # one repetition, drawn from (seed, epoch, sample) only: identical after a resume
                r = np.random.default_rng([self.seed, epoch, index]).integers(len(repetitions))
                fmri = repetitions[r]
                if self.repetition == "cross":  # the other repetitions' mean: same stimulus, other noise
                    target = np.delete(repetitions, r, axis=0).mean(0) if len(repetitions) > 1 else fmri
            sample = {"key": ref.key, "subject": ref.subject, "image_id": ref.image_id, "fmri": fmri}
            if target is not None:
                sample["fmri_target"] = target
            if "captions" in self.fields:
                sample["captions"] = self.reader.captions(ref)
            if "image" in self.fields:
                image = self.reader.image(ref)
                if self.image_size and image.shape[:2] != (self.image_size, self.image_size):
                    image = np.asarray(Image.fromarray(image).resize((self.image_size,) * 2, Image.BICUBIC))
                sample["image"] = image
            return sample
        except ShardError as e:
            if self.on_error == "raise":
                raise
            log.warning("skipping sample: %s", e)
            return {"skipped": ref.key}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if "skipped" not in s]
    skipped = [s["skipped"] for s in samples if "skipped" in s]
    if not good:
        raise ShardError(f"every sample of a batch was bad ({', '.join(skipped[:4])}...); see the warnings above")
    batch: dict[str, Any] = {
        "subject": good[0]["subject"],
        "key": [s["key"] for s in good],
        "image_id": torch.tensor([s["image_id"] for s in good], dtype=torch.long),
        "fmri": torch.from_numpy(np.stack([s["fmri"] for s in good])),  # (B, V)
        "n_skipped": len(skipped),
        "skipped_keys": skipped,
    }
    if "fmri_target" in good[0]:
        batch["fmri_target"] = torch.from_numpy(np.stack([s["fmri_target"] for s in good]))  # (B, V)
    if "captions" in good[0]:
        batch["captions"] = [s["captions"] for s in good]
    if "image" in good[0]:
        batch["image"] = torch.from_numpy(np.stack([s["image"] for s in good])).permute(0, 3, 1, 2).contiguous()
    return batch


class ShardLoader:
    """Iterable over this rank's batches; Lightning uses it as is (it is not a torch DataLoader, so
    Lightning never swaps in a DistributedSampler) and saves/restores its position in checkpoints."""

    def __init__(self, dataset: SampleSet, batch_sampler: SubjectBatchSampler, num_workers: int,
                 datamodule: "BrainDataModule | None" = None):
        self.dataset, self.batch_sampler, self.num_workers = dataset, batch_sampler, num_workers
        self.sampler = batch_sampler  # Lightning: `_set_sampler_epoch` finds `.sampler.set_epoch`
        self.datamodule = datamodule
        self.n_skipped = 0
        self._resume: tuple[int, int] | None = None
        self._yielded = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = self.batch_sampler.epoch, 0
        if self._resume is not None:
            epoch, start = self._resume
            self._resume = None
            self.batch_sampler.set_epoch(epoch)
        self._yielded = start
        loader = DataLoader(self.dataset, batch_sampler=list(self.batch_sampler.iter_from(epoch, start)),
                            num_workers=self.num_workers, collate_fn=collate,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        for batch in loader:
            self.n_skipped += batch["n_skipped"]
            if batch["skipped_keys"] and self.datamodule is not None:
                self.datamodule.undecodable.update(batch["skipped_keys"])
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        consumed = self._yielded
        trainer = getattr(self.datamodule, "trainer", None) if self.datamodule is not None else None
        if trainer is not None and trainer.state.fn == "fit":
            # Lightning prefetches a batch ahead; what was trained on is what counts.
            consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(self.batch_sampler.epoch), "batches_consumed": int(consumed), "seed": self.batch_sampler.seed,
                "n_batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed") != self.batch_sampler.seed or state.get("n_batches") != len(self):
            raise ValueError(f"data position in the checkpoint (seed {state.get('seed')}, {state.get('n_batches')} "
                             f"batches/epoch) does not match this data (seed {self.batch_sampler.seed}, {len(self)} "
                             "batches/epoch): resuming would repeat or skip samples")
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if consumed >= len(self):  # saved at the end of an epoch: continue with the next one
            epoch, consumed = epoch + 1, 0
        self._resume = (epoch, consumed)
        self.batch_sampler.set_epoch(epoch)


# ---------------------------------------------------------------------------------------------
# The DataModule


class BrainDataModule(L.LightningDataModule):
    """Serves one or several shard datasets (e.g. NSD + an image-less pretraining corpus).

    Args:
        datasets: shard dataset folder(s). Subject names must be unique across them.
        batch_size: training batch size (batches are per subject; see plan_batches).
        eval_batch_size: val/test/predict batch size (default: batch_size).
        fields: what each sample carries beyond fmri: "captions" (stage 2), "image" (stages 2-3).
        train_repetition: "random" (one repetition, redrawn each epoch), "mean" of repetitions, or
            "cross": one random repetition as `fmri` and the mean of the image's *other* repetitions
            as `fmri_target` (Noise2Noise: same stimulus, independent noise; a sample with one
            repetition is its own target). val/test/predict always use the mean.
        subjects: use only these subjects (default: all).
        max_sessions: train and val keep only the repetitions whose trial lies in the subject's first
            this many sessions (meta `sessions`, else from the global 1-based `trials`, 750 per
            session as in NSD), and drop samples left with none; test and predict keep everything.
            "1 session" then means what it means in NSD (the new-subject setting of `adapt`).
        image_size: resize images to this square size (default: as stored).
        num_workers: DataLoader worker processes per rank.
        seed: shuffling and repetition draws; the epoch plan depends on (seed, epoch) only.
        verify: "sha256" checks shard checksums once in prepare_data (rank 0 per node); "size" or
            "none" skip it. Every rank always checks tar structure and npy headers when indexing.
        on_error: "raise" (default) stops at the first bad shard/sample with a message naming the
            file and key; "skip" drops it, counts and logs it.
        predict_split: split served by predict_dataloader.
    """

    def __init__(self, datasets: str | list[str], batch_size: int = 32, eval_batch_size: int | None = None,
                 fields: list[str] | None = None, train_repetition: str = "random",
                 subjects: list[str] | None = None, max_sessions: int | None = None, image_size: int | None = None,
                 num_workers: int = 0, seed: int = 0, verify: str = "sha256", on_error: str = "raise",
                 predict_split: str = "test"):
        super().__init__()
        self.save_hyperparameters()
        self.roots = [Path(d) for d in ([datasets] if isinstance(datasets, (str, Path)) else datasets)]
        if not self.roots:
            raise ValueError("datasets: give at least one shard dataset folder")
        self.fields = list(fields or [])
        unknown = [f for f in self.fields if f not in FIELDS]
        if unknown:
            raise ValueError(f"fields: unknown {unknown}; choose from {FIELDS}")
        if train_repetition not in REPETITIONS:
            raise ValueError(f"train_repetition must be one of {REPETITIONS}, got {train_repetition!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        if max_sessions is not None and max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1 (or null for all), got {max_sessions}")
        self.train_repetition, self.subjects_filter, self.max_sessions = train_repetition, subjects, max_sessions
        self.kept: dict[str, np.ndarray] = {}  # key -> repetitions within max_sessions (train/val samples)
        self.image_size, self.num_workers, self.seed = image_size, num_workers, seed
        self.verify, self.on_error, self.predict_split = verify, on_error, predict_split
        self._datasets: list[ShardDataset] | None = None
        self._reader = SampleReader()  # meta of train/val samples, for max_sessions
        self._subject_info: dict[str, SubjectInfo] = {}
        self.undecodable: set[str] = set()  # keys skipped while decoding (on_error "skip"), this rank

    # -- loading
    def prepare_data(self) -> None:
        if self.verify == "sha256":  # hash once per node (not per rank); verdicts land in the VerifyCache
            for root in self.roots:
                ds = ShardDataset(root, verify="sha256", on_error=self.on_error)
                for split in ds.splits:
                    ds.samples(split)

    def setup(self, stage: str | None = None) -> None:
        if self._datasets is not None:
            return
        # With "sha256", every rank reads prepare_data's verdicts from the VerifyCache (hashing only
        # what it lacks), so a shard that failed its checksum is skipped here too, not served.
        self._datasets = [ShardDataset(r, verify=self.verify, on_error=self.on_error) for r in self.roots]
        seen: dict[str, str] = {}
        for ds in self._datasets:
            for s in ds.subjects:
                if s in seen:
                    raise ShardError(f"subject {s!r} appears in both {seen[s]} and {ds.root}; subject names must be "
                                     "unique across the datasets of a run")
                seen[s] = str(ds.root)
        if self.subjects_filter:
            missing = sorted(set(self.subjects_filter) - set(seen))
            if missing:
                raise ShardError(f"subjects {missing} are in none of {[str(r) for r in self.roots]}")

    def _datasets_ready(self) -> list[ShardDataset]:
        if self._datasets is None:
            self.setup()
        return self._datasets  # type: ignore[return-value]

    def subject_info(self) -> dict[str, SubjectInfo]:
        """Per-subject voxel count and voxel coordinates (mm) for building subject layers."""
        if not self._subject_info:
            for ds in self._datasets_ready():
                for s, entry in ds.subjects.items():
                    if self.subjects_filter and s not in self.subjects_filter:
                        continue
                    self._subject_info[s] = SubjectInfo(s, entry.n_voxels, entry.coords_mm(), ds.name, entry.mask_path)
        return self._subject_info

    def split_refs(self, split: str) -> list[SampleRef]:
        """Indexed samples of `split` over all datasets (in dataset, shard, key order)."""
        refs: list[SampleRef] = []
        for ds in self._datasets_ready():
            if split not in ds.splits:
                continue
            for ref in ds.samples(split):
                if self.subjects_filter and ref.subject not in self.subjects_filter:
                    continue
                missing = [f for f in self.fields if FIELD_EXT[f] not in ref.members]
                if missing:
                    msg = f"{ref.shard} [{ref.key}]: no {', '.join(FIELD_EXT[f] for f in missing)} (requested by fields)"
                    if self.on_error == "raise":
                        raise ShardError(msg)
                    ds.skipped["missing_member"] = ds.skipped.get("missing_member", 0) + 1
                    log.warning("skipping: %s", msg)
                    continue
                if self.max_sessions is not None and split in ("train", "val") and not self._keep_sessions(ref):
                    continue
                refs.append(ref)
        return refs

    def _keep_sessions(self, ref: SampleRef) -> bool:
        """Note which repetitions of `ref` lie in the first `max_sessions` sessions (in `kept`);
        False when none does (the sample is dropped)."""
        meta = self._reader.json(ref, "meta")
        sessions = meta.get("sessions") or [(int(t) - 1) // TRIALS_PER_SESSION + 1 for t in meta["trials"]]
        if len(sessions) != len(meta["trials"]):
            raise ShardError(f"{ref.shard} [{ref.key}]: meta has {len(sessions)} sessions for {len(meta['trials'])} trials")
        keep = np.flatnonzero(np.asarray(sessions) <= self.max_sessions)
        if len(keep) == 0:
            return False
        if len(keep) < len(sessions):
            self.kept[ref.key] = keep
        return True

    def n_skipped(self) -> int:
        return sum(self.skip_counts().values())

    def skip_counts(self) -> dict[str, int]:
        """What on_error "skip" dropped so far: {reason: count}. Shard reasons count shards, the
        others samples; "undecodable" is this rank's samples that failed to decode."""
        counts: dict[str, int] = {}
        for ds in self._datasets or []:
            for reason, n in ds.skipped.items():
                counts[reason] = counts.get(reason, 0) + n
        if self.undecodable:
            counts["undecodable"] = len(self.undecodable)
        return counts

    def skip_summary(self) -> str | None:
        """One line for the end of fit/validate/test/predict, or None when nothing was skipped."""
        counts = self.skip_counts()
        if not counts:
            return None
        shards = sum(n for r, n in counts.items() if r in SHARD_SKIPS)
        samples = sum(n for r, n in counts.items() if r not in SHARD_SKIPS)
        listed = sum(ds.manifest["splits"][s]["n_samples"] for ds in self._datasets or [] for s in ds.splits)
        detail = ", ".join(f"{r} {n}" for r, n in sorted(counts.items()))
        return (f"data: on_error=skip dropped {shards} shard(s) and {samples} sample(s) of the {listed} the "
                f"manifests list ({detail}); see the warnings above")

    def teardown(self, stage: str) -> None:
        summary = self.skip_summary()
        if summary and (self.trainer is None or self.trainer.is_global_zero):
            print(summary)

    def _loader(self, split: str, train: bool) -> ShardLoader:
        refs = self.split_refs(split)
        if not refs:
            raise ShardError(f"no {split!r} samples in {[str(r) for r in self.roots]}"
                             + (f" for subjects {self.subjects_filter}" if self.subjects_filter else ""))
        groups: dict[str, list[int]] = {}
        for i, ref in enumerate(refs):
            groups.setdefault(ref.subject, []).append(i)
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        sampler = SubjectBatchSampler({s: np.asarray(v) for s, v in groups.items()},
                                      self.batch_size if train else self.eval_batch_size,
                                      shuffle=train, seed=self.seed, rank=rank, world_size=world)
        dataset = SampleSet(refs, self.fields, self.train_repetition if train else "mean", self.seed,
                            self.image_size, self.on_error, kept=self.kept)
        return ShardLoader(dataset, sampler, self.num_workers, datamodule=self)

    def train_dataloader(self) -> ShardLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> ShardLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> ShardLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> ShardLoader:
        return self._loader(self.predict_split, train=False)
