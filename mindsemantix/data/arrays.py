"""Whole splits of a shard dataset as numpy arrays per subject (for closed-form fits: the ridge
baselines, stage 2's ridge readout, stage 1's probes)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mindsemantix.numerics import CentredSVD


@dataclass
class SplitArrays:
    """One subject's samples of one split: keys, voxels (mean over repetitions), captions, images,
    and the seen images' ids (meta `image_id`, the simulator's truth index)."""

    keys: list[str]
    x: np.ndarray  # (N, V) float32
    captions: list[list[str]] | None = None
    images: list[np.ndarray] | None = None  # (H, W, 3) uint8 each
    image_ids: np.ndarray | None = None  # (N,) int

    @cached_property
    def svd(self) -> CentredSVD:
        """x for `fit_ridge`, decomposed once for all the baselines fitted on it."""
        return CentredSVD.of(self.x)


def mean_repetitions(fmri: np.ndarray) -> np.ndarray:
    """(R, V) repetitions of one image -> (V,) float32 mean (the test-time input of every stage)."""
    return np.asarray(fmri, dtype=np.float32).mean(0)


def load_split_arrays(root: str | os.PathLike, split: str, *, captions: bool = True, images: bool = False,
                      image_ids: bool = False, verify: str = "sha256") -> dict[str, SplitArrays]:
    """{subject: SplitArrays} of a shard dataset split (docs/formats.md), keys sorted within each subject.
    `verify`: ShardDataset's check of the shards ("none" to skip the checksums)."""
    from mindsemantix.data.shards import ShardDataset, iter_split

    ds = ShardDataset(root, verify=verify)
    fields = ["fmri"] + (["captions"] if captions else []) + (["image"] if images else []) + (["meta"] if image_ids else [])
    rows: dict[str, list[dict[str, Any]]] = {}
    for sample in tqdm(iter_split(ds, split, fields), total=len(ds.samples(split)), unit="sample", leave=False,
                       desc=f"loading {Path(root).name}/{split}"):
        rows.setdefault(sample["subject"], []).append(sample)
    out = {}
    for subject, samples in rows.items():
        samples.sort(key=lambda r: r["key"])
        out[subject] = SplitArrays(
            keys=[r["key"] for r in samples], x=np.stack([mean_repetitions(r["fmri"]) for r in samples]),
            captions=[list(r["captions"]) for r in samples] if captions else None,
            images=[r["image"] for r in samples] if images else None,
            image_ids=np.array([int(r["meta"]["image_id"]) for r in samples]) if image_ids else None)
    if not out:
        raise ValueError(f"{root}: split {split!r} has no samples")
    return out
