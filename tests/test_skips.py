"""on_error: skip really skips, is counted and reported; checksums are verified once per dataset version."""

from __future__ import annotations

import os

import lightning as L
import pytest

import mindsemantix.data.shards as shards
from mindsemantix.callbacks import DataSkipReport
from mindsemantix.data.datamodule import BrainDataModule
from mindsemantix.stages.pretrain import BrainMAE


def corrupt_same_size(path):
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # same size, different content: only the sha256 catches it
    path.write_bytes(bytes(data))


def shard_keys(path):
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name.split(".")[0] for m in tar}


def test_a_shard_failing_its_checksum_is_not_served(tiny_dataset):
    bad = tiny_dataset / "train" / "train-000001.tar"
    corrupt_same_size(bad)
    dm = BrainDataModule(str(tiny_dataset), batch_size=4, on_error="skip", verify="sha256")
    dm.prepare_data()
    dm.setup("fit")
    served = {r.key for r in dm.split_refs("train")}
    assert served and not served & shard_keys(bad)
    assert dm.skip_counts() == {"bad_shard": 1}


def test_skips_are_logged_as_metrics_and_summarised(tiny_dataset, tmp_path, capsys):
    corrupt_same_size(tiny_dataset / "train" / "train-000001.tar")
    dm = BrainDataModule(str(tiny_dataset), batch_size=4, on_error="skip")
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="", version="")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                        enable_checkpointing=False, callbacks=[DataSkipReport()])
    trainer.fit(BrainMAE(preset="tiny", warmup_steps=1), datamodule=dm)
    out = capsys.readouterr().out
    assert "on_error=skip dropped 1 shard(s) and 0 sample(s) of the 40 the manifests list (bad_shard 1)" in out
    metrics = (tmp_path / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    col = header.index("data/skipped_shards")
    assert [row.split(",")[col] for row in metrics[1:] if row.split(",")[col]] and \
        all(float(row.split(",")[col]) == 1.0 for row in metrics[1:] if row.split(",")[col])


def test_checksums_are_verified_once_per_dataset_version(tiny_dataset, monkeypatch):
    calls = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p, *a: calls.append(str(p)) or real(p, *a))
    first = BrainDataModule(str(tiny_dataset), verify="sha256")
    first.prepare_data()
    first.setup("fit")
    n_shards = sum(1 for _ in tiny_dataset.glob("*/*.tar"))
    assert sum(p.endswith(".tar") for p in calls) == n_shards  # hashed once, by prepare_data; setup used the verdicts
    calls.clear()
    restarted = BrainDataModule(str(tiny_dataset), verify="sha256")
    restarted.prepare_data()
    restarted.setup("fit")
    assert not [p for p in calls if p.endswith(".tar")]  # a restart re-hashes nothing
    shard = tiny_dataset / "val" / "val-000000.tar"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hash that one again
    shards.ShardDataset(tiny_dataset, verify="sha256").samples("val")
    assert [p for p in calls if p.endswith(".tar")] == [str(shard)]


def test_a_changed_manifest_invalidates_the_verdicts(tiny_dataset):
    bad = tiny_dataset / "val" / "val-000000.tar"
    shards.ShardDataset(tiny_dataset).samples("val")
    corrupt_same_size(bad)
    st = bad.stat()
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with size and mtime kept ...
    cache = shards.VerifyCache(tiny_dataset)
    entry = cache.entries["val/val-000000.tar"]
    os.utime(bad, ns=(st.st_atime_ns, entry["mtime_ns"]))  # ... exactly as recorded, the verdict holds
    assert len(shards.ShardDataset(tiny_dataset).samples("val")) == 10
    manifest = tiny_dataset / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")  # a new dataset version: verdicts are dropped
    with pytest.raises(shards.ShardError, match="val-000000.tar: sha256 does not match"):
        shards.ShardDataset(tiny_dataset).samples("val")


def test_inspect_always_rehashes(tiny_dataset, monkeypatch):
    shards.ShardDataset(tiny_dataset).samples("val")  # verdicts cached
    calls = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p, *a: calls.append(str(p)) or real(p, *a))
    shards.inspect(tiny_dataset)
    assert sum(p.endswith(".tar") for p in calls) == sum(1 for _ in tiny_dataset.glob("*/*.tar"))
