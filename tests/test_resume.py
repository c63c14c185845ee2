"""Exact resume, preemption and checkpoint faults (issue: cluster users lose no work, repeat no data).

Stage 1 through the real CLI in subprocesses: a run killed with SIGKILL after its last periodic
checkpoint, or stopped by SIGTERM, and resumed with `--ckpt_path last`, ends with bitwise the same
weights as an uninterrupted run; a corrupt `last.ckpt` falls back to the previous good one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, run_cli
from mindsemantix.callbacks import CheckpointError, load_checkpoint_safely, resolve_last_checkpoint

TINY = """
trainer:
  precision: 32-true
  max_steps: 12
  val_check_interval: 6
  check_val_every_n_epoch: null
  enable_progress_bar: false
  log_every_n_steps: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 4, save_top_k: -1}
model:
  init_args: {preset: tiny, encoder: null, warmup_steps: 2, lr: 0.003}
data:
  batch_size: 8
  num_workers: 0
"""


def fit(run: Path, data: Path, *extra: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    config = run.parent / "tiny.yaml"
    config.write_text(TINY)
    return run_cli("fit", "--config", str(REPO / "stages/pretrain.yaml"), "--config", str(config),
                   f"--data.datasets=[{data}]", f"--trainer.default_root_dir={run}", *extra, expect_rc=expect_rc)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("resume") / "ds", subjects={"subj01": 48, "subj02": 40},
                             n_images={"train": 15, "val": 4}, image_size=None, captions=False)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("plain") / "run"
    fit(run, data)
    return weights(run)


def test_sigkill_after_checkpoint_then_resume_is_bitwise_exact(data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    fit(run, data, "--trainer.callbacks+=probe_callbacks.KillAtStep", "--trainer.callbacks.step=10", expect_rc=-9)
    assert not (run / "export").exists()  # a killed run exports nothing
    assert load_checkpoint_safely(run / "checkpoints" / "last.ckpt")["global_step"] == 8
    fit(run, data, "--ckpt_path=last")
    assert_bitwise_equal(weights(run), uninterrupted)


def test_sigterm_saves_and_exits_cleanly_then_resume_is_bitwise_exact(data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = fit(run, data, "--trainer.callbacks+=probe_callbacks.KillAtStep", "--trainer.callbacks.step=7",
               "--trainer.callbacks.signal_name=SIGTERM")
    assert "preemption: received SIGTERM at step 7" in proc.stdout
    assert load_checkpoint_safely(run / "checkpoints" / "last.ckpt")["global_step"] == 7
    assert not (run / "export").exists()  # no export for a run that did not finish
    fit(run, data, "--ckpt_path=last")
    assert_bitwise_equal(weights(run), uninterrupted)


def test_corrupt_last_checkpoint_falls_back_to_previous_good_one(data, uninterrupted, tmp_path):
    run = tmp_path / "run"
    fit(run, data, "--trainer.callbacks+=probe_callbacks.KillAtStep", "--trainer.callbacks.step=10", expect_rc=-9)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="last.ckpt is unreadable"):
        load_checkpoint_safely(last)
    fallback = resolve_last_checkpoint(run / "checkpoints")
    assert fallback is not None and load_checkpoint_safely(fallback)["global_step"] == 8
    proc = fit(run, data, "--ckpt_path=last")
    assert "falling back" in proc.stdout and "resuming from" in proc.stdout
    assert_bitwise_equal(weights(run), uninterrupted)


def test_explicit_corrupt_checkpoint_is_a_clear_error(data, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    proc = fit(tmp_path / "run", data, f"--ckpt_path={bad}", expect_rc=1)
    assert f"checkpoint {bad} is unreadable" in proc.stderr
