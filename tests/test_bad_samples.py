"""Every bad sample is either one error naming its shard and key, or a counted skip (on_error: skip)."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from mindsemantix.data.datamodule import BrainDataModule
from mindsemantix.data.shards import SampleReader, ShardDataset, ShardError, encode_npy
from test_shards import rewrite_shard
from test_untrusted_paths import rename_keys

SHARD, KEY = "val/val-000000.tar", "subj01-000012"  # val-000000 holds subj01-000011..17 (40 voxels)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _with_header(rows: int) -> bytes:
    header = f"{{'descr': '<f2', 'fortran_order': False, 'shape': ({rows}, 40), }}".encode()
    header = header + b" " * (118 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


# name -> (member it replaces, new bytes, message expected in "raise" mode)
INDEX_TIME = {
    "zero_repetitions": ("fmri.npy", encode_npy(np.zeros((0, 40), np.float16)), r"fmri.npy has 0 repetitions"),
    "absurd_rows": ("fmri.npy", _with_header(10**12) + encode_npy(np.zeros((1, 40), np.float16))[128:],
                    r"fmri.npy header declares shape \(1000000000000, 40\)"),
}
DECODE_TIME = {
    "nested_captions": ("captions.json", b"[" * 200_000 + b"]" * 200_000, r"captions.json is not valid JSON \(nested too deeply\)"),
    "bare_string_captions": ("captions.json", json.dumps("a dog on a sofa").encode(), r"captions.json must be a non-empty list"),
    "empty_caption": ("captions.json", json.dumps(["a dog", " "]).encode(), r"captions.json must be a non-empty list of non-empty"),
    "no_captions": ("captions.json", b"[]", r"captions.json must be a non-empty list"),
    "decompression_bomb": ("image.png", png_declaring(100_000, 100_000), r"image.png (is 100000x100000 pixels|undecodable)"),
    "non_utf8_captions": ("captions.json", b'["\xff\xfe"]', r"captions.json is not valid JSON"),
}


def replace_member(root, member, data):
    rewrite_shard(root, SHARD, lambda n, d: data if n == f"{KEY}.{member}" else d)


@pytest.mark.parametrize("case", sorted(INDEX_TIME))
def test_bad_fmri_is_refused_at_indexing(tiny_dataset, case):
    member, data, message = INDEX_TIME[case]
    replace_member(tiny_dataset, member, data)
    with pytest.raises(ShardError, match=rf"val-000000.tar \[{KEY}\]: {message}"):
        ShardDataset(tiny_dataset).samples("val")
    ds = ShardDataset(tiny_dataset, on_error="skip")
    assert KEY not in {r.key for r in ds.samples("val")} and ds.skipped == {"bad_fmri": 1}


@pytest.mark.parametrize("case", sorted(DECODE_TIME))
def test_bad_sample_is_one_error_or_a_counted_skip(tiny_dataset, case):
    member, data, message = DECODE_TIME[case]
    replace_member(tiny_dataset, member, data)
    ref = next(r for r in ShardDataset(tiny_dataset).samples("val") if r.key == KEY)
    read = SampleReader().image if member == "image.png" else SampleReader().captions
    with pytest.raises(ShardError, match=rf"val-000000.tar \[{KEY}\]: {message}"):
        read(ref)
    dm = BrainDataModule(str(tiny_dataset), batch_size=4, fields=["captions", "image"], on_error="skip")
    served = [k for batch in dm.val_dataloader() for k in batch["key"]]
    assert KEY not in served and len(served) == 9
    assert dm.skip_counts() == {"undecodable": 1}


def test_non_numeric_key_is_a_counted_skip(tiny_dataset):
    rename_keys(tiny_dataset / SHARD, {KEY: "subj01-abcdef"})
    with pytest.raises(ShardError, match=r"val-000000.tar \['subj01-abcdef'\]: key is not"):
        ShardDataset(tiny_dataset, verify="none").samples("val")
    ds = ShardDataset(tiny_dataset, verify="none", on_error="skip")
    assert len(ds.samples("val")) == 9 and ds.skipped == {"bad_key": 1}
