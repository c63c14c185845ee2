"""BrainDataModule: subject-homogeneous batches, determinism, workers, resume state, and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset

from mindsemantix.data.datamodule import BrainDataModule, SubjectBatchSampler, plan_batches
from mindsemantix.data.shards import ShardError


def keys_of(loader):
    return [batch["key"] for batch in loader]


def test_batches_are_subject_homogeneous_and_complete(tiny_dataset):
    dm = BrainDataModule(str(tiny_dataset), batch_size=4, fields=["captions", "image"], image_size=8)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader()) == 6  # ceil(11/4) per subject
    for b in batches:
        assert {k.rsplit("-", 1)[0] for k in b["key"]} == {b["subject"]}
        n_vox = 40 if b["subject"] == "subj01" else 57
        assert b["fmri"].shape == (len(b["key"]), n_vox) and b["fmri"].dtype.is_floating_point
        assert b["image"].shape == (len(b["key"]), 3, 8, 8) and str(b["image"].dtype) == "torch.uint8"
        assert [c[0] for c in b["captions"]] == [f"image {int(k[-6:])} caption 0" for k in b["key"]]
        assert b["image_id"].tolist() == [int(k[-6:]) for k in b["key"]]
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(f"subj0{s}-{i:06d}" for s in (1, 2) for i in range(11))


def test_repetitions_random_in_training_mean_in_eval(tiny_dataset):
    dm = BrainDataModule(str(tiny_dataset), batch_size=11, train_repetition="random", seed=1)
    # fmri of image i, repetition r, voxel v = i/1000 + v/1e4 + r (see conftest); voxel 0 reveals r
    reps = []
    for epoch in range(4):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for b in loader:
            ids = b["image_id"].numpy()
            reps.append(np.round(b["fmri"][:, 0].numpy() - ids / 1000).astype(int))
    reps = np.concatenate(reps)
    assert set(reps.tolist()) == {0, 1, 2}
    val = next(iter(dm.val_dataloader()))
    ids = val["image_id"].numpy()
    np.testing.assert_allclose(val["fmri"][:, 0].numpy(), ids / 1000 + 1.0, atol=2e-3)  # mean of 0, 1, 2
    dm_mean = BrainDataModule(str(tiny_dataset), batch_size=11, train_repetition="mean")
    b = next(iter(dm_mean.train_dataloader()))
    np.testing.assert_allclose(b["fmri"][:, 0].numpy(), b["image_id"].numpy() / 1000 + 1.0, atol=2e-3)


def test_cross_repetition_target_is_the_mean_of_the_other_repetitions(tiny_dataset, tmp_path):
    dm = BrainDataModule(str(tiny_dataset), batch_size=11, train_repetition="cross", seed=1)
    pairs = set()
    for epoch in range(4):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for b in loader:
            base = b["image_id"].numpy()[:, None] / 1000 + np.arange(b["fmri"].shape[1])[None] / 1e4
            r = np.round(b["fmri"][:, 0].numpy() - base[:, 0]).astype(int)      # the input's repetition
            np.testing.assert_allclose(b["fmri"].numpy(), base + r[:, None], atol=2e-3)
            others = (3 - r) / 2                                                  # mean of {0, 1, 2} minus r
            np.testing.assert_allclose(b["fmri_target"].numpy(), base + others[:, None], atol=2e-3)
            pairs |= set(zip(r.tolist(), others.tolist()))
    assert pairs == {(0, 1.5), (1, 1.0), (2, 0.5)}
    assert "fmri_target" not in next(iter(dm.val_dataloader()))                   # eval: the mean, no target
    one = make_tiny_dataset(tmp_path / "one", reps=1)                              # nothing to cross with
    b = next(iter(BrainDataModule(str(one), batch_size=11, train_repetition="cross").train_dataloader()))
    assert torch.equal(b["fmri_target"], b["fmri"])
    with pytest.raises(ValueError, match="train_repetition must be one of"):
        BrainDataModule(str(tiny_dataset), train_repetition="median")


def test_deterministic_from_seed_and_epoch(tiny_dataset):
    def run(seed, epoch, workers=0):
        dm = BrainDataModule(str(tiny_dataset), batch_size=3, seed=seed, num_workers=workers)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [(b["key"], b["fmri"].numpy().round(3).tolist()) for b in loader]

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1)  # reshuffled each epoch
    assert run(0, 0) != run(1, 0)
    assert run(0, 1) == run(0, 1, workers=2)  # workers change nothing, duplicate nothing


def test_workers_do_not_duplicate(tiny_dataset):
    dm = BrainDataModule(str(tiny_dataset), batch_size=2, num_workers=2)
    keys = [k for b in keys_of(dm.train_dataloader()) for k in b]
    assert len(keys) == len(set(keys)) == 22


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_plan_splits_batches_never_pads(world):
    groups = {"a": np.arange(0, 10), "b": np.arange(10, 17), "c": np.arange(17, 20)}
    ranks = [SubjectBatchSampler(groups, 4, shuffle=True, seed=0, rank=r, world_size=world) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1  # same number of steps on every rank
    seen = Counter(i for r in ranks for batch in r for i, _ in batch)
    assert sorted(seen) == list(range(20)) and set(seen.values()) == {1}  # each sample exactly once
    assert all(len(batch) <= 4 for r in ranks for batch in r)


def test_plan_rejects_more_ranks_than_samples():
    with pytest.raises(ValueError, match="cannot fill"):
        plan_batches({"a": np.arange(3)}, 4, world_size=4, rng=None)


def test_resume_state_continues_with_next_batch(tiny_dataset):
    dm = BrainDataModule(str(tiny_dataset), batch_size=3, seed=5)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    full = keys_of(loader)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == 3
    fresh = BrainDataModule(str(tiny_dataset), batch_size=3, seed=5).train_dataloader()
    fresh.load_state_dict(state)
    assert keys_of(fresh) == full[3:]
    # a state saved at the end of an epoch resumes at the start of the next one
    end = {**state, "batches_consumed": len(loader)}
    fresh.load_state_dict(end)
    loader.sampler.set_epoch(2)
    assert keys_of(fresh) == keys_of(loader)
    with pytest.raises(ValueError, match="does not match this data"):
        BrainDataModule(str(tiny_dataset), batch_size=3, seed=6).train_dataloader().load_state_dict(state)


def test_several_datasets_and_subject_filter(tiny_dataset_factory):
    a = tiny_dataset_factory("a")
    b = tiny_dataset_factory("b", subjects={"hcp-100307": 33}, n_images={"train": 6, "val": 2}, captions=False,
                             image_size=None, dataset="corpus")
    dm = BrainDataModule([str(a), str(b)], batch_size=4)
    info = dm.subject_info()
    assert {s: i.n_voxels for s, i in info.items()} == {"subj01": 40, "subj02": 57, "hcp-100307": 33}
    assert info["hcp-100307"].dataset == "corpus" and info["subj01"].coords_mm.shape == (40, 3)
    assert sum(len(k) for k in keys_of(dm.train_dataloader())) == 28
    assert sum(len(k) for k in keys_of(dm.test_dataloader())) == 8  # the corpus has no test split
    only = BrainDataModule([str(a), str(b)], batch_size=4, subjects=["hcp-100307"])
    assert {k.rsplit("-", 1)[0] for ks in keys_of(only.train_dataloader()) for k in ks} == {"hcp-100307"}
    with pytest.raises(ShardError, match="no fmri|captions.json"):
        BrainDataModule([str(a), str(b)], fields=["captions"]).train_dataloader()
    with pytest.raises(ShardError, match="appears in both"):
        BrainDataModule([str(a), str(a)]).setup()
    with pytest.raises(ShardError, match=r"subjects \['subj09'\]"):
        BrainDataModule(str(a), subjects=["subj09"]).setup()


def test_ddp_two_processes(tiny_dataset_factory, tmp_path):
    """2 CPU processes (gloo), one loader worker each: disjoint training samples covering each epoch,
    equal step counts, val/test scoring each sample exactly once — on shards and subjects that split
    unevenly."""
    ds = tiny_dataset_factory(subjects={"subj01": 30, "subj02": 31, "subj03": 32},
                              n_images={"train": 9, "val": 3, "test": 3}, samples_per_shard=5)
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "ddp_probe.py"), str(out), str(ds), "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    all_train = {f"subj0{s}-{i:06d}" for s in (1, 2, 3) for i in range(9)}
    for epoch in range(2):
        per_rank = [[k for e, _, _, keys in r["seen"]["train"] if e == epoch for k in keys] for r in ranks]
        assert len(per_rank[0]) + len(per_rank[1]) == 27
        assert set(per_rank[0]).isdisjoint(per_rank[1]) and set(per_rank[0]) | set(per_rank[1]) == all_train
        steps = [sum(1 for e, *_ in r["seen"]["train"] if e == epoch) for r in ranks]
        assert steps[0] == steps[1] == 5  # 3 subjects x ceil(9/4) = 9 batches -> split to 10
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 10
    for stage, first, epochs in (("val", 9, (0, 1)), ("test", 12, (2,))):
        expected = sorted(f"subj0{s}-{i:06d}" for s in (1, 2, 3) for i in range(first, first + 3))
        for epoch in epochs:
            keys = [k for r in ranks for e, _, _, ks in r["seen"][stage] if e == epoch for k in ks]
            assert sorted(keys) == expected  # each exactly once across ranks
