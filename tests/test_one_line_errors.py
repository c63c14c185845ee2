"""Bad input gives one line naming the file/option, not a 40-150-line traceback; --debug shows it."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from conftest_data import copy_tree, load_recipe, toyworld_tree  # noqa: F401  (fixture)
from mindsemantix.cli import main as cli_main
from mindsemantix.data.nsd import NSDLayout

ROOT = Path(__file__).resolve().parent.parent


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    # Lightning's log handlers keep the (since closed) stderr capture of the test that imported it;
    # logging then prints "--- Logging error ---" blocks: a test artefact, not the CLI's output
    err = re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", err, flags=re.S)
    assert "Traceback" not in err and "Union subtypes" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def test_export_error_inside_a_model_is_unwrapped(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config's relative init_from does not exist here
    assert cli_main(["fit", "--config", str(ROOT / "stages/align.yaml"), f"--data.datasets=[{tiny_dataset}]"]) == 1
    assert error_line(capsys).startswith("error: export folder runs/demo/align_representation/export does not exist")


def test_bad_option_value_is_one_line_and_debug_shows_the_traceback(tiny_dataset, tmp_path, monkeypatch, capsys):
    argv = ["fit", "--config", str(ROOT / "stages/pretrain.yaml"), f"--data.datasets=[{tiny_dataset}]",
            f"--trainer.default_root_dir={tmp_path / 'run'}", "--model.init_args.preset=huge"]
    assert cli_main(argv) == 1
    assert "error: ValueError: unknown preset 'huge'" in error_line(capsys)
    with pytest.raises(ValueError, match="Union subtypes"):
        cli_main(argv + ["--debug"])
    monkeypatch.setenv("MINDSEMANTIX_DEBUG", "1")
    with pytest.raises(ValueError):
        cli_main(argv)


def test_resume_with_another_batch_size_is_one_line(tiny_dataset, tmp_path, capsys):
    argv = ["fit", "--config", str(ROOT / "stages/pretrain.yaml"), f"--data.datasets=[{tiny_dataset}]",
            f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_steps=2", "--trainer.precision=32-true",
            "--trainer.limit_val_batches=1", "--model.init_args.encoder=null", "--data.batch_size=8", "--data.verify=size"]
    assert cli_main(argv) == 0
    capsys.readouterr()
    assert cli_main(argv[:-2] + ["--data.batch_size=4", "--data.verify=size", "--trainer.max_steps=4", "--ckpt_path=last"]) == 1
    assert "data position in the checkpoint" in error_line(capsys)


@pytest.mark.parametrize("fmt", ["nii.gz", "hdf5"])
def test_truncated_nsd_betas_name_the_file(toyworld_tree, tmp_path, fmt, capsys):
    tree = copy_tree(toyworld_tree, tmp_path / "tree")
    path = NSDLayout(tree).betas(1, 2, fmt)
    data = path.read_bytes()
    if fmt == "nii.gz":  # keep the header readable, cut the voxel data short
        path.write_bytes(gzip.compress(gzip.decompress(data)[:2000]))
    else:
        path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SystemExit, match=rf"nsd recipe: .*betas_session02\.{fmt}: "):
        load_recipe("nsd").main(["--nsd-root", str(tree), "--out", str(tmp_path / "out"), "--quiet",
                                 "--subjects", "1", "--betas-format", fmt, "--no-images"])


def test_empty_coco_caption_names_the_file(toyworld_tree, tmp_path):
    tree = copy_tree(toyworld_tree, tmp_path / "tree")
    path = NSDLayout(tree).annotations / "captions_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"][3]["caption"] = "  "
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match=r"captions_train2017.json: annotation .* has an empty or non-text caption"):
        load_recipe("nsd").main(["--nsd-root", str(tree), "--out", str(tmp_path / "out"), "--quiet", "--no-images"])
