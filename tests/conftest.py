"""Shared fixtures: tiny shard datasets built in a temp folder (no network, no real data)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_dataset(root: Path, subjects: dict[str, int] | None = None, n_images: dict[str, int] | None = None,
                      reps: int = 3, captions: bool = True, image_size: int | None = 16, seed: int = 0,
                      samples_per_shard: int = 7, dataset: str = "tiny") -> Path:
    """Write a small dataset: `subjects` maps name -> voxel count (a cube-ish ROI of that size);
    `n_images` maps split -> images per subject. Values are deterministic from `seed`; the fMRI of
    image i is `i / 1000 + voxel / 1e4 + repetition` so tests can recompute what they expect."""
    from mindsemantix.data.shards import ShardWriter

    subjects = subjects or {"subj01": 40, "subj02": 57}
    n_images = n_images or {"train": 11, "val": 5, "test": 4}
    rng = np.random.default_rng(seed)
    with ShardWriter(root, dataset=dataset, samples_per_shard=samples_per_shard) as w:
        for s_i, (subject, n_vox) in enumerate(subjects.items()):
            mask = np.zeros((8, 9, 10), np.int16)
            mask[mask == 0] = -1
            flat = mask.reshape(-1)
            flat[np.sort(rng.choice(flat.size, n_vox, replace=False))] = 1
            w.add_subject(subject, nib.Nifti1Image(mask, np.diag([2.0, 2.0, 2.0, 1.0])))
            image_id = 0
            for split, n in n_images.items():
                for _ in range(n):
                    trial0 = image_id * reps + 1
                    fmri = (image_id / 1000 + np.arange(n_vox)[None] / 1e4 + np.arange(reps)[:, None]).astype(np.float32)
                    w.write(split, f"{subject}-{image_id:06d}", fmri,
                            {"subject": subject, "image_id": image_id, "trials": list(range(trial0, trial0 + reps))},
                            captions=[f"image {image_id} caption {k}" for k in range(5)] if captions else None,
                            image=np.full((image_size, image_size, 3), image_id % 256, np.uint8) if image_size else None)
                    image_id += 1
    return root


@pytest.fixture
def tiny_dataset(tmp_path):
    return make_tiny_dataset(tmp_path / "tiny")


@pytest.fixture
def tiny_dataset_factory(tmp_path):
    def factory(name="tiny", **kwargs):
        return make_tiny_dataset(tmp_path / name, **kwargs)
    return factory


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a busy machine: a 2-thread OpenMP
    barrier per small op, with the other core taken, made tiny steps ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
