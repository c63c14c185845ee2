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


def checkpoint_progress(path: str | os.PathLike) -> tuple[int, int]:
    """(global_step, epoch) recorded in a Lightning checkpoint, read without loading its tensors
    (memory-mapped); raises for a file that is not a readable checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} holds no Lightning state_dict")
    return int(checkpoint.get("global_step", -1)), int(checkpoint.get("epoch", -1))


def resolve_last_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The readable checkpoint in `checkpoint_dir` that is furthest into training, by the step (then
    epoch) recorded in it — not by file time, which `cp -r` or a restore rewrites; at equal steps
    `last*.ckpt` wins. Truncated or corrupt files are skipped with a warning. None when the folder has
    no checkpoint; a CheckpointError naming every file and its fault when none of them is readable
    (a resume must never silently start over)."""
    folder = Path(checkpoint_dir)
    files = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if not files:
        return None
    faults: list[str] = []
    ranked = []
    for path in files:
        try:
            step, epoch = checkpoint_progress(path)
        except Exception as e:  # zipfile/pickle/EOF errors differ by how the file was damaged
            faults.append(f"{path.name}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
            continue
        ranked.append(((step, epoch, path.name.startswith("last"), path.stat().st_mtime), path))
    for _, candidate in sorted(ranked, key=lambda r: r[0], reverse=True):
        try:
            load_checkpoint_safely(candidate)
        except CheckpointError as e:
            faults.append(f"{candidate.name}: {e}")
            continue
        for fault in faults:
            log.warning("skipping a bad checkpoint while resolving 'last': %s", fault)
            print(f"warning: skipping unreadable checkpoint {fault}; falling back to an older checkpoint")
        return candidate
    raise CheckpointError(f"--ckpt_path last: no readable checkpoint in {folder} ({'; '.join(faults)}); "
                          "to start over, move that folder away and run without --ckpt_path")


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


class DataSkipReport(L.Callback):
    """Logs what the datamodule's `on_error: skip` dropped as metrics (`data/skipped_shards`,
    `data/skipped_samples`) after every training and validation epoch, so a run that lost part of
    its data shows it in its curves, not only in one warning line (the datamodule also prints a
    summary at the end of fit/validate/test/predict)."""

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts_of = getattr(trainer.datamodule, "skip_counts", None)
        if counts_of is None:
            return
        from mindsemantix.data.shards import SHARD_SKIPS

        counts = counts_of()
        shards = sum(n for r, n in counts.items() if r in SHARD_SKIPS)
        pl_module.log("data/skipped_shards", float(shards), rank_zero_only=True)
        # index-time skips are the same on every rank; decode-time ones differ: take the largest
        pl_module.log("data/skipped_samples", float(sum(counts.values()) - shards), sync_dist=True, reduce_fx="max")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)


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
