"""The scorers refuse inputs that would give a number that is not the metric asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import mindsemantix.eval.captions as C
import mindsemantix.eval.images as I


def image_folders(tmp_path, n_targets, n_predictions):
    rng = np.random.default_rng(0)
    for name in ("pred", "seen"):
        (tmp_path / name).mkdir()
    for k in range(n_targets):
        im = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        im.save(tmp_path / "seen" / f"subj01-{k:06d}.png")
        if k < n_predictions:
            im.save(tmp_path / "pred" / f"subj01-{k:06d}.png")
    return ["--predictions", str(tmp_path / "pred"), "--targets", str(tmp_path / "seen")]


def test_score_images_refuses_missing_predictions(tmp_path, capsys):
    args = image_folders(tmp_path, n_targets=10, n_predictions=3)
    assert I.main(args + ["--out", str(tmp_path / "M.json")]) == 2
    err = capsys.readouterr().err
    assert "no prediction for 7 of the targets" in err and "--allow-missing" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "M.json").exists()


def test_score_images_allow_missing_scores_the_rest_and_says_how_many(tmp_path, capsys):
    args = image_folders(tmp_path, n_targets=5, n_predictions=3)
    assert I.main(args + ["--out", str(tmp_path / "M.json"), "--allow-missing"]) == 0
    assert "2 target(s) have no prediction" in capsys.readouterr().out
    written = json.loads((tmp_path / "M.json").read_text())
    assert written["info"]["n_images"] == 3 and written["info"]["keys_without_prediction"] == 2


def test_non_utf8_jsonl_is_one_line_naming_file_and_line(tmp_path, capsys):
    pred = tmp_path / "P.jsonl"
    pred.write_bytes(b'{"key": "subj01-000001", "caption": "a dog"}\n{"key": "subj01-000002", "caption": "caf\xe9"}\n')
    ref = tmp_path / "R.jsonl"
    ref.write_text(json.dumps({"key": "subj01-000001", "captions": ["a dog"]}) + "\n")
    assert C.main(["--predictions", str(pred), "--references", str(ref), "--out", str(tmp_path / "M.json"),
                   "--sentence-encoder", "none", "--meteor", "off"]) == 2
    err = capsys.readouterr().err
    assert f"{pred}:2: not UTF-8 text" in err and len(err.splitlines()) == 1
