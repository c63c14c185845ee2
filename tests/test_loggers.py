"""Any logger keeps resume working: checkpoints always in <run>/checkpoints, metrics.csv always in <run>."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mindsemantix.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
TINY = {"trainer": {"precision": "32-true", "max_steps": 2, "limit_val_batches": 1, "enable_progress_bar": False,
                    "log_every_n_steps": 1,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True, "every_n_train_steps": 1}}]},
        "model": {"init_args": {"preset": "tiny", "encoder": None, "warmup_steps": 1}},
        "data": {"batch_size": 8, "verify": "size"}}
LOGGERS = {
    "csv": "lightning.pytorch.loggers.CSVLogger",
    "tensorboard": "lightning.pytorch.loggers.TensorBoardLogger",
}


@pytest.mark.parametrize("logger", sorted(LOGGERS))
def test_resume_works_whatever_the_logger(logger, tiny_dataset, tmp_path, capsys):
    if logger == "tensorboard":
        import tensorboard  # noqa: F401 - in the test extra; a user installs the `tensorboard` extra
    overrides = tmp_path / "tiny.yaml"
    overrides.write_text(yaml.safe_dump(TINY))
    run, elsewhere = tmp_path / "run", tmp_path / "logs"
    argv = ["fit", "--config", str(ROOT / "stages/pretrain.yaml"), "--config", str(overrides),
            f"--data.datasets=[{tiny_dataset}]", f"--trainer.default_root_dir={run}",
            f"--trainer.logger={LOGGERS[logger]}", f"--trainer.logger.save_dir={elsewhere}"]
    assert cli_main(argv) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not list(elsewhere.rglob("*.ckpt"))
    assert "train/loss" in (run / "metrics.csv").read_text()  # the CSV beside, for curves.png
    assert list(elsewhere.rglob("events.out.tfevents.*" if logger == "tensorboard" else "metrics.csv"))
    rows_before = len((run / "metrics.csv").read_text().splitlines())
    capsys.readouterr()
    assert cli_main(argv + ["--trainer.max_steps=3", "--ckpt_path=last"]) == 0
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    assert len((run / "metrics.csv").read_text().splitlines()) > rows_before  # curves kept and continued
