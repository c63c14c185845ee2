"""Training-run safety: preemption checkpoints, atomic checkpoint files, choosing a good `last`.

Users train on clusters that preempt jobs. The failures they fear most are losing a day of training
and silently training on duplicated data; this module and the stateful datamodule loader address
the first, the loader the second.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger

from mindsemantix.io import atomic_path

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file and renamed into place, so a job killed while
    saving leaves the previous checkpoint intact instead of a truncated one; loading never
    unpickles arbitrary objects (`weights_only=True`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning passes no map_location: tensors saved from cuda:0 would all land on cuda:0 on every
        # rank of the node (or fail on a machine without that GPU). Lightning moves them afterwards.
        return load_checkpoint_safely(path, map_location="cpu" if map_location is None else map_location)


class CheckpointError(RuntimeError):
    pass


def load_checkpoint_safely(path, map_location: Any | None = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True) with a clear error for missing, truncated or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zipfile/pickle/EOF errors differ by how the file was damaged
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt): {type(e).__name__}: {first_line}") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} holds no Lightning state_dict")
    return checkpoint


def resolve_last_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest readable checkpoint in `checkpoint_dir` (`last*.ckpt` first, then any `*.ckpt`),
    skipping — with a warning — files that are truncated or corrupt. None if there is none."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    by_time = lambda p: p.stat().st_mtime  # noqa: E731
    lasts = sorted(folder.glob("last*.ckpt"), key=by_time, reverse=True)
    others = sorted((p for p in folder.glob("*.ckpt") if p not in lasts), key=by_time, reverse=True)
    for candidate in lasts + others:
        try:
            load_checkpoint_safely(candidate)
        except CheckpointError as e:
            log.warning("skipping a bad checkpoint while resolving 'last': %s", e)
            print(f"warning: {e}; falling back to an older checkpoint")
            continue
        return candidate
    return None


class Preemption(L.Callback):
    """On SIGTERM or SIGUSR1: finish the current step, save `<checkpoints>/last.ckpt` on every rank's
    behalf, and stop cleanly (no export is written for an unfinished run). Under SLURM, a SIGUSR1
    (`#SBATCH --signal=USR1@120`) also requeues the job; the requeued job resumes with
    `--ckpt_path last`.

    All ranks agree on the decision before acting (one all-reduce per step), so a signal delivered
    to a single rank cannot make ranks diverge or hang.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), requeue: bool = True):
        self.signals = tuple(signals)
        self.requeue = requeue
        self._received: int | None = None
        self._previous: dict[int, Any] = {}
        self.preempted = False

    def _handler(self, signum, frame) -> None:
        self._received = signum

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.preempted, self._received = False, None
        for name in self.signals:
            signum = getattr(signal, name)
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not in the main thread (e.g. some notebook runners)
                log.warning("cannot install a %s handler outside the main thread", name)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        flag = torch.tensor(float(self._received or 0), device=pl_module.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return
        signum = int(flag.item())
        path = Path(trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else
                    Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"
        # Tell ModelCheckpoint that `last.ckpt` is its own (kept in the checkpoint's callback state), so
        # the resumed run overwrites it instead of adding `last-v1.ckpt` beside it.
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "save_last", False) and Path(callback.dirpath or "") == path.parent:
                callback.last_model_path = str(path)
        trainer.save_checkpoint(path)  # collective: every rank takes part
        self.preempted = True
        pl_module.preempted = True
        trainer.should_stop = True
        if trainer.is_global_zero:
            print(f"preemption: received {signal.Signals(signum).name} at step {trainer.global_step}; "
                  f"saved {path}; resume with --ckpt_path last")
            job = os.environ.get("SLURM_JOB_ID")
            if self.requeue and job and signum == signal.SIGUSR1:
                array = os.environ.get("SLURM_ARRAY_JOB_ID")
                job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
                result = subprocess.run(["scontrol", "requeue", job], check=False)
                print(f"preemption: scontrol requeue {job} -> exit {result.returncode}")


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run (`resume=True`) keeps the curves logged before
    the interruption: the stock logger deletes `metrics.csv` when its folder is not empty. Rows
    logged after the checkpoint a resumed run restarts from appear twice (the later one wins)."""

    def __init__(self, *args: Any, resume: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._resume = resume

    @property
    def experiment(self):
        if self._experiment is not None or not self._resume:
            return super().experiment
        path = Path(self.log_dir) / "metrics.csv"
        previous = path.read_text() if path.is_file() else None
        writer = super().experiment  # deletes metrics.csv
        if previous:
            path.write_text(previous)
            header = previous.splitlines()[0].split(",") if previous.strip() else []
            writer.metrics_keys = sorted(header)
            if header != writer.metrics_keys:  # the writer appends in sorted column order
                writer._rewrite_with_new_header(writer.metrics_keys)
        return writer
