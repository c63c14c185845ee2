"""Shard datasets: round trip, atomic writes, and every kind of bad input."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
import textwrap

import nibabel as nib
import numpy as np
import pytest

from mindsemantix.cli import main as cli_main
from mindsemantix.data.shards import (ShardDataset, ShardError, ShardWriter, SampleReader, encode_npy, iter_split, sha256_file)


def rewrite_shard(root, rel, transform):
    """Rebuild one shard with `transform(member_name, bytes) -> bytes | None (drop)` and fix the manifest
    (sha256, size, count), so that only the content check can catch the change."""
    path = root / rel
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            data = transform(m.name, tar.extractfile(m).read())
            if data is not None:
                members.append((m.name, data))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = json.loads((root / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["file"] == rel:
                shard["sha256"], shard["bytes"] = sha256_file(path), path.stat().st_size
                shard["n_samples"] = len({n.split(".")[0] for n, _ in members})
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip(tiny_dataset):
    ds = ShardDataset(tiny_dataset)
    manifest = ds.manifest
    assert manifest["format"] == "mindsemantix-shards/1"
    assert manifest["subjects"]["subj02"]["n_voxels"] == 57
    assert manifest["splits"]["train"]["n_samples"] == 22  # 11 images x 2 subjects
    assert [s["n_samples"] for s in manifest["splits"]["train"]["shards"]] == [7, 7, 7, 1]
    assert (tiny_dataset / "subjects" / "subj01.nii.gz").is_file()

    samples = {s["key"]: s for s in iter_split(ds, "test", ["fmri", "meta", "captions", "image"])}
    assert sorted(samples) == [f"subj0{s}-{i:06d}" for s in (1, 2) for i in range(16, 20)]
    s = samples["subj02-000017"]
    expected = (17 / 1000 + np.arange(57)[None] / 1e4 + np.arange(3)[:, None]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(s["fmri"], expected)
    assert s["meta"] == {"subject": "subj02", "image_id": 17, "trials": [52, 53, 54], "split": "test"}
    assert s["captions"][3] == "image 17 caption 3"
    assert s["image"].shape == (16, 16, 3) and s["image"].dtype == np.uint8 and (s["image"] == 17).all()


def test_voxel_order_and_coordinates(tiny_dataset):
    ds = ShardDataset(tiny_dataset)
    mask = np.asarray(nib.load(str(tiny_dataset / "subjects" / "subj01.nii.gz")).dataobj)
    coords = ds.subjects["subj01"].coords_mm()
    assert coords.shape == (40, 3)
    # C-order nonzero, times the 2 mm affine
    np.testing.assert_array_equal(coords, np.stack(np.nonzero(mask), 1) * 2.0)


def test_webdataset_reads_our_shards(tiny_dataset):
    import webdataset as wds

    shards = sorted(str(p) for p in (tiny_dataset / "val").glob("*.tar"))
    keys = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)]
    assert len(keys) == 10 and keys[0] == "subj01-000011"


def test_inspect_command(tiny_dataset, capsys):
    assert cli_main(["data", "inspect", str(tiny_dataset)]) == 0
    out = capsys.readouterr().out
    assert "subj02: 57 voxels" in out and "train: 22 samples in 4 shards" in out and "sha256 OK" in out


def test_writer_is_atomic_on_error(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(out, "x") as w:
            w.add_subject("s1", nib.Nifti1Image(np.ones((2, 2, 2), np.int16), np.eye(4)))
            w.write("train", "s1-000001", np.zeros((1, 8)), {"subject": "s1", "image_id": 1, "trials": [1]})
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp folder left behind either


def test_killed_writer_leaves_nothing_that_reads_as_complete(tmp_path):
    out = tmp_path / "ds"
    script = textwrap.dedent(f"""
        import os, signal, numpy as np, nibabel as nib
        from mindsemantix.data.shards import ShardWriter
        w = ShardWriter({str(out)!r}, "x", samples_per_shard=2)
        w.add_subject("s1", nib.Nifti1Image(np.ones((2, 2, 2), np.int16), np.eye(4)))
        for i in range(5):
            w.write("train", f"s1-{{i:06d}}", np.zeros((1, 8)), {{"subject": "s1", "image_id": i, "trials": [i + 1]}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    assert not out.exists()
    with pytest.raises(ShardError, match="does not exist"):
        ShardDataset(out)


def test_writer_rejects_bad_samples(tmp_path):
    with pytest.raises(ShardError) as excinfo:
        with ShardWriter(tmp_path / "ds", "x") as w:
            w.add_subject("s1", nib.Nifti1Image(np.ones((2, 2, 2), np.int16), np.eye(4)))
            meta = {"subject": "s1", "image_id": 1, "trials": [1]}
            for bad, match in [
                (dict(key="s1-000001", fmri=np.full((1, 8), np.nan)), "NaN/inf"),
                (dict(key="s1-000001", fmri=np.zeros((1, 7))), r"shape \(R, 8\)"),
                (dict(key="s1.x-000001", fmri=np.zeros((1, 8))), "no dots"),
                (dict(key="s1-000001", fmri=np.zeros((2, 8))), "2 repetitions but 1 trials"),
            ]:
                with pytest.raises(ShardError, match=match):
                    w.write("train", bad["key"], bad["fmri"], meta)
            raise ShardError("done")
    assert "done" in str(excinfo.value)


def test_missing_manifest(tiny_dataset):
    (tiny_dataset / "manifest.json").unlink()
    with pytest.raises(ShardError, match=r"manifest.json is missing"):
        ShardDataset(tiny_dataset)


def test_checksum_mismatch(tiny_dataset):
    shard = tiny_dataset / "train" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000001.tar: sha256 does not match"):
        ShardDataset(tiny_dataset).samples("train")
    assert len(ShardDataset(tiny_dataset, verify="size").samples("val")) == 10  # other splits unaffected


def test_truncated_tar(tiny_dataset, caplog):
    shard = tiny_dataset / "train" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ShardError, match=r"train-000000.tar: .*(truncated|bytes)"):
        ShardDataset(tiny_dataset, verify="none").samples("train")
    with caplog.at_level(logging.WARNING):
        ds = ShardDataset(tiny_dataset, verify="none", on_error="skip")
        refs = ds.samples("train")
    assert len(refs) == 22 - 7 and ds.skipped == {"bad_shard": 1}
    assert "train-000000.tar" in caplog.text


def test_missing_fmri_member(tiny_dataset):
    rel = "val/val-000000.tar"
    rewrite_shard(tiny_dataset, rel, lambda n, d: None if n == "subj01-000012.fmri.npy" else d)
    with pytest.raises(ShardError, match=r"val-000000.tar \[subj01-000012\]: no fmri.npy"):
        ShardDataset(tiny_dataset).samples("val")
    ds = ShardDataset(tiny_dataset, on_error="skip")
    assert len(ds.samples("val")) == 9 and ds.skipped == {"missing_member": 1}


def test_voxel_count_disagrees_with_manifest(tiny_dataset):
    rel = "test/test-000000.tar"
    rewrite_shard(tiny_dataset, rel, lambda n, d: encode_npy(np.zeros((3, 41), np.float16))
                  if n == "subj01-000018.fmri.npy" else d)
    with pytest.raises(ShardError, match=r"\[subj01-000018\]: fmri.npy has shape \(3, 41\).*\(R, 40\)"):
        ShardDataset(tiny_dataset).samples("test")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_voxels(tiny_dataset, value):
    rel = "test/test-000000.tar"
    bad = np.zeros((3, 40), np.float16)
    bad[1, 5] = value
    rewrite_shard(tiny_dataset, rel, lambda n, d: encode_npy(bad) if n == "subj01-000017.fmri.npy" else d)
    ds = ShardDataset(tiny_dataset)
    ref = next(r for r in ds.samples("test") if r.key == "subj01-000017")
    with pytest.raises(ShardError, match=r"test-000000.tar \[subj01-000017\]: fmri has 1 NaN/inf"):
        SampleReader().fmri(ref)
