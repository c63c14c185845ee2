"""A crafted dataset cannot make the reader look, or the tools write, outside the folders named."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest

from mindsemantix.data.shards import ShardDataset, ShardError
from mindsemantix.eval.baselines import write_image_folder


def rename_keys(path, rename):
    """Rewrite a shard with some keys renamed (sizes change: read it with verify="none")."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            key, _, ext = name.partition(".")
            info = tarfile.TarInfo(f"{rename.get(key, key)}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def edit_manifest(root, change):
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["/tmp/evil", "../evil", "a.b", "subj/01"])
def test_subject_names_are_checked_on_read(tiny_dataset, name):
    edit_manifest(tiny_dataset, lambda m: m["subjects"].update({name: dict(m["subjects"]["subj01"])}))
    with pytest.raises(ShardError, match=r"manifest.json: subject name .* must be letters"):
        ShardDataset(tiny_dataset)


def test_mask_paths_are_confined_to_the_dataset(tiny_dataset):
    shutil.copy(tiny_dataset / "subjects" / "subj01.nii.gz", tiny_dataset.parent / "outside.nii.gz")
    edit_manifest(tiny_dataset, lambda m: m["subjects"]["subj01"].update(mask="../outside.nii.gz"))
    with pytest.raises(ShardError, match=r"mask of subj01 path '../outside.nii.gz' leaves the dataset folder"):
        ShardDataset(tiny_dataset)
    edit_manifest(tiny_dataset, lambda m: m["subjects"]["subj01"].update(mask=str(tiny_dataset.parent / "outside.nii.gz")))
    with pytest.raises(ShardError, match=r"must be relative to the dataset folder"):
        ShardDataset(tiny_dataset)


def test_shard_paths_are_confined_to_the_dataset(tiny_dataset):
    shutil.copy(tiny_dataset / "val" / "val-000000.tar", tiny_dataset.parent / "elsewhere.tar")
    edit_manifest(tiny_dataset, lambda m: m["splits"]["val"]["shards"][0].update(file="../elsewhere.tar"))
    with pytest.raises(ShardError, match=r"shard path '../elsewhere.tar' leaves the dataset folder"):
        ShardDataset(tiny_dataset, on_error="skip").samples("val")


def test_keys_are_checked_on_read(tiny_dataset):
    rename_keys(tiny_dataset / "val" / "val-000000.tar", {"subj01-000012": "/tmp/subj01-000012"})
    with pytest.raises(ShardError, match=r"val-000000.tar \['/tmp/subj01-000012'\]: key is not"):
        ShardDataset(tiny_dataset, verify="none").samples("val")
    ds = ShardDataset(tiny_dataset, verify="none", on_error="skip")
    assert len(ds.samples("val")) == 9 and ds.skipped["bad_key"] == 1


@pytest.mark.parametrize("key", ["<abs>/evil-000001", "../evil-000001", "subj01-00001", "subj01-000001\n"])
def test_output_file_names_come_only_from_valid_keys(tmp_path, key):
    key = key.replace("<abs>", str(tmp_path))  # an absolute path, kept inside the test's folder
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ShardError, match="is not '<subject>-<6 digits>'"):
        write_image_folder(tmp_path / "out" / "seen", {"subj01-000001": image, key: image})
    assert [p.name for p in tmp_path.rglob("*")] == ["out"]  # nothing written, inside or outside
