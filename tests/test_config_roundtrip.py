"""The config a run saves (and --print_config) parses again: Lightning users re-run from it."""

from __future__ import annotations

from pathlib import Path

import yaml

import mindsemantix.callbacks as callbacks
from mindsemantix.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
TINY = {"trainer": {"precision": "32-true", "max_steps": 2, "limit_val_batches": 1, "enable_progress_bar": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True, "every_n_train_steps": 1}}]},
        "model": {"init_args": {"preset": "tiny", "encoder": None, "warmup_steps": 1}},
        "data": {"batch_size": 8, "verify": "size"}}


def test_saved_config_runs_again_with_atomic_checkpoints(tiny_dataset, tmp_path, monkeypatch, capsys):
    saved_with = []
    real_save = callbacks.AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(callbacks.AtomicCheckpointIO, "save_checkpoint",
                        lambda self, c, p, *a, **k: saved_with.append(Path(p).name) or real_save(self, c, p, *a, **k))
    overrides = tmp_path / "tiny.yaml"
    overrides.write_text(yaml.safe_dump(TINY))
    first = tmp_path / "first"
    assert cli_main(["fit", "--config", str(ROOT / "stages/pretrain.yaml"), "--config", str(overrides),
                     f"--data.datasets=[{tiny_dataset}]", f"--trainer.default_root_dir={first}"]) == 0
    text = (first / "config.yaml").read_text()
    assert "Unable to serialize" not in text
    assert saved_with  # checkpoints went through AtomicCheckpointIO

    saved_with.clear()
    second = tmp_path / "second"
    assert cli_main(["fit", "--config", str(first / "config.yaml"), f"--trainer.default_root_dir={second}"]) == 0
    assert (second / "export" / "config.json").is_file() and saved_with

    capsys.readouterr()
    try:
        cli_main(["fit", "--config", str(first / "config.yaml"), "--print_config"])
    except SystemExit:
        pass
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert "Unable to serialize" not in printed.read_text()
    third = tmp_path / "third"
    assert cli_main(["fit", "--config", str(printed), f"--trainer.default_root_dir={third}"]) == 0
