"""`mindsemantix data inspect --deep` decodes every sample and reports each problem; the default stays fast."""

from __future__ import annotations

import json
import tarfile

import nibabel as nib
import numpy as np

import mindsemantix.data.shards as shards
from mindsemantix.cli import main as cli_main
from mindsemantix.data.shards import ShardWriter, encode_npy
from test_shards import rewrite_shard
from test_untrusted_paths import rename_keys


def test_clean_dataset_passes_and_default_inspect_decodes_nothing(tiny_dataset, capsys, monkeypatch):
    assert cli_main(["data", "inspect", str(tiny_dataset), "--deep"]) == 0
    assert "deep check: 40 samples decoded, 0 problem(s)" in capsys.readouterr().out

    def no_decoding(*args):
        raise AssertionError("the default inspect must not decode samples")

    monkeypatch.setattr(shards.SampleReader, "fmri", no_decoding)
    monkeypatch.setattr(shards.SampleReader, "image", no_decoding)
    assert cli_main(["data", "inspect", str(tiny_dataset)]) == 0


def test_deep_inspect_reports_every_bad_sample(tiny_dataset, capsys):
    nan = np.zeros((3, 40), np.float16)
    nan[0, 3] = np.nan
    seen_in_test = None
    with tarfile.open(tiny_dataset / "test/test-000000.tar") as tar:
        seen_in_test = tar.extractfile("subj01-000017.image.png").read()
    replace = {
        "subj01-000011.fmri.npy": encode_npy(nan),
        "subj01-000012.fmri.npy": encode_npy(np.zeros((0, 40), np.float16)),
        "subj01-000013.image.png": b"not a png",
        "subj01-000014.captions.json": json.dumps("a bare string").encode(),
    }
    rewrite_shard(tiny_dataset, "val/val-000000.tar", lambda n, d: replace.get(n, d))
    rewrite_shard(tiny_dataset, "train/train-000000.tar",  # a training sample shows a test image
                  lambda n, d: seen_in_test if n == "subj01-000000.image.png" else d)
    # a key that breaks the pattern, and one found twice
    rename_keys(tiny_dataset / "train/train-000001.tar",
                {"subj01-000007": "subj01-x7", "subj01-000008": "subj01-000015"})  # 15 is a val key
    assert cli_main(["data", "inspect", str(tiny_dataset), "--deep", "--no-checksums"]) == 1
    out = capsys.readouterr().out
    expected = [r"[subj01-000011]: fmri has 1 NaN/inf", r"[subj01-000012]: fmri.npy has 0 repetitions",
                r"[subj01-000013]: image.png undecodable", r"[subj01-000014]: captions.json must be a non-empty list",
                r"['subj01-x7']: key is not", r"[subj01-000015]: duplicate key",
                r"test-set leak: the same pixels in test (subj01-000017) and in train/val (subj01-000000)"]
    for fragment in expected:
        assert fragment in out, fragment
    assert "7 problem(s)" in out


def test_deep_inspect_finds_a_test_image_in_another_subjects_training_set(tmp_path, capsys):
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[:2] = 1
    with ShardWriter(tmp_path / "ds", dataset="leaky") as w:
        for subject in ("subjA", "subjB"):
            w.add_subject(subject, nib.Nifti1Image(mask, np.eye(4)))
        for subject, split, image_id in [("subjA", "test", 5), ("subjB", "train", 5), ("subjB", "train", 6)]:
            w.write(split, f"{subject}-{image_id:06d}", np.ones((2, 32), np.float32),
                    {"subject": subject, "image_id": image_id, "trials": [1, 2]},
                    captions=["a picture"], image=np.full((4, 4, 3), image_id * 10 + (subject == "subjB"), np.uint8))
    assert cli_main(["data", "inspect", str(tmp_path / "ds"), "--deep"]) == 1
    assert "test-set leak: image_id 5 in test (subjA-000005) and in train/val (subjB-000005)" in capsys.readouterr().out
