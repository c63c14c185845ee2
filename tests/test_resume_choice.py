"""`--ckpt_path last` never starts over by mistake, and picks the checkpoint furthest into training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mindsemantix.callbacks import CheckpointError, resolve_last_checkpoint
from mindsemantix.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


def fake_checkpoint(path: Path, step: int, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": step, "epoch": 0}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_fallback_orders_by_the_step_recorded_in_the_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    # as after `cp -r`: file times no longer follow training order
    fake_checkpoint(folder / "epoch=0-step=12.ckpt", 12, mtime=1_000)
    fake_checkpoint(folder / "epoch=0-step=8.ckpt", 8, mtime=3_000)
    last = fake_checkpoint(folder / "last.ckpt", 16, mtime=2_000)
    last.write_bytes(last.read_bytes()[:100])  # the newest is truncated
    assert resolve_last_checkpoint(folder).name == "epoch=0-step=12.ckpt"


def test_at_equal_steps_last_wins(tmp_path):
    folder = tmp_path / "checkpoints"
    fake_checkpoint(folder / "last.ckpt", 12, mtime=1_000)
    fake_checkpoint(folder / "epoch=0-step=12.ckpt", 12, mtime=2_000)
    assert resolve_last_checkpoint(folder).name == "last.ckpt"


def test_only_a_corrupt_checkpoint_is_refused_naming_file_and_reason(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder).mkdir()
    (folder / "last.ckpt").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*checkpoints \(last.ckpt: .*\); to start over"):
        resolve_last_checkpoint(folder)
    assert resolve_last_checkpoint(tmp_path / "empty") is None  # a first start of a requeued job: fresh is right


def test_cli_refuses_to_restart_when_the_only_checkpoint_is_corrupt(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"truncated")
    (run / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    rc = cli_main(["fit", "--config", str(ROOT / "stages/pretrain.yaml"), f"--data.datasets=[{tiny_dataset}]",
                   f"--trainer.default_root_dir={run}", "--trainer.max_steps=1", "--ckpt_path=last"])
    err = capsys.readouterr().err
    assert rc == 1 and "last.ckpt" in err and "no readable checkpoint" in err
    assert (run / "metrics.csv").read_text() == "step,train/loss\n0,1.0\n"  # the run's curves are untouched
