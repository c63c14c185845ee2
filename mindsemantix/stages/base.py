"""What the three stage LightningModules share: optimisation, exports, frozen weights kept out of
checkpoints, and a policy for non-finite losses. Losses and logging stay in each stage's module."""

from __future__ import annotations

import collections
import json
import os
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
import torch.distributed as dist

from mindsemantix.io import write_json_atomic
from mindsemantix.numerics import warmup_cosine


S = TypeVar("S")


def settings(cls: type[S], value: S | dict[str, Any] | None, name: str) -> S | None:
    """A stage's typed setting from what it was given: the dataclass itself (LightningCLI builds it
    from the config, where a misspelt key already fails), a dict of its fields (the Python API,
    exports' config.json), or None. A dict with a key the dataclass lacks fails here, naming it."""
    if value is None or isinstance(value, cls):
        return value
    if is_dataclass(value):
        value = asdict(value)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown setting(s) {unknown}; known: {known}")
    return cls(**value)


def as_dict(value: Any) -> Any:
    """A dataclass setting as a plain dict (checkpoints' hyper-parameters stay loadable with
    weights_only=True, exports' config.json stays JSON); anything else unchanged."""
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


def fused_adamw_ok(params) -> bool | None:
    """Fused AdamW (one kernel over all tensors; on a CPU several times faster than the per-tensor
    loop for many small tensors) where every parameter is a float tensor on a CPU or CUDA device."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None


class StageModule(L.LightningModule):
    """Base of BrainMAE, BrainAlign and BrainReconstruct.

    Args:
        lr: AdamW's learning rate (the parameters that require gradients; a stage may scale groups).
        weight_decay: AdamW's weight decay (matrices only; not biases, norms, scales).
        betas: AdamW's betas.
        warmup_steps: steps of linear warm-up, then cosine decay to `lr * min_lr_ratio` at the last step.
        min_lr_ratio: the learning rate at the last step, relative to `lr`.
        export_dir: where the stage's export (docs/formats.md) is written at the end of `fit` (rank 0);
            default `<trainer.default_root_dir>/export`.
        nonfinite_loss: "skip" drops a batch whose loss is NaN/inf on any rank (all ranks skip it
            together, so DDP stays in step) and counts it; "stop" raises with the batch's keys.
        max_consecutive_nonfinite: with "skip", stop the run (FloatingPointError) once this many
            steps in a row were skipped: a diverged run must not export its weights as trained.
        max_nonfinite_share: with "skip", also stop once more than this share of the last
            `nonfinite_window` training batches was skipped. The export's config.json records the
            count under `training.skipped_nonfinite_steps`.
        nonfinite_window: the number of recent batches `max_nonfinite_share` looks at.
    Subclasses set `frozen_prefixes` (state-dict key prefixes of frozen pretrained parts, e.g.
    ("llm.",)): those weights are never written into checkpoints and need not be in them to load.
    """

    frozen_prefixes: tuple[str, ...] = ()

    def __init__(self, lr: float = 1e-4, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, export_dir: str | None = None,
                 nonfinite_loss: str = "skip", max_consecutive_nonfinite: int = 10,
                 max_nonfinite_share: float = 0.1, nonfinite_window: int = 200):
        super().__init__()
        if nonfinite_loss not in ("skip", "stop"):
            raise ValueError(f"nonfinite_loss must be 'skip' or 'stop', got {nonfinite_loss!r}")
        if max_consecutive_nonfinite < 1 or not 0 <= max_nonfinite_share < 1 or nonfinite_window < 1:
            raise ValueError("max_consecutive_nonfinite and nonfinite_window must be >= 1, max_nonfinite_share in [0, 1)")
        self.max_consecutive_nonfinite, self.max_nonfinite_share = max_consecutive_nonfinite, max_nonfinite_share
        self.nonfinite_window = nonfinite_window
        self._recent_skips: collections.deque[bool] = collections.deque(maxlen=nonfinite_window)
        self._consecutive_skips = 0
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.export_dir, self.nonfinite_loss = export_dir, nonfinite_loss
        self.skipped_nonfinite = 0
        self.preempted = False  # set by mindsemantix.callbacks.Preemption: no export for a cut-short run

    # -- randomness that survives a resume
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reseed torch's RNG from (seed, global step, rank) before every step: masks, dropout and
        negatives then depend on nothing a checkpoint does not hold, so a resumed run draws exactly
        what an uninterrupted one would (Lightning does not checkpoint RNG states)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed((seed * 1_000_003 + self.global_step * 7919 + self.global_rank) % (2**63 - 1))

    # -- non-finite losses
    def guard_loss(self, loss: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor | None:
        """Return `loss`, or None (Lightning then skips the batch) when it is not finite on any rank."""
        bad = torch.tensor(0.0 if torch.isfinite(loss).all() else 1.0, device=loss.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad)  # every rank must take the same decision, or DDP hangs
        self._recent_skips.append(bad.item() != 0)
        if bad.item() == 0:
            self._consecutive_skips = 0
            return loss
        keys = batch.get("key", [])
        if self.nonfinite_loss == "stop":
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at global step {self.global_step} on a batch "
                                     f"of {batch.get('subject')} ({', '.join(keys[:4])}...); lower the learning "
                                     "rate, or set model.init_args.nonfinite_loss: skip")
        self.skipped_nonfinite += 1
        self._consecutive_skips += 1
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), rank_zero_only=True)
        share = sum(self._recent_skips) / self.nonfinite_window  # over a full window, not the steps so far
        if self._consecutive_skips >= self.max_consecutive_nonfinite or share > self.max_nonfinite_share:
            # every rank holds the same counts (the decision above is all-reduced): all stop together
            raise FloatingPointError(
                f"non-finite loss on {self._consecutive_skips} consecutive batches and {sum(self._recent_skips)} of the "
                f"last {len(self._recent_skips)} (limits: model.init_args.max_consecutive_nonfinite="
                f"{self.max_consecutive_nonfinite}, max_nonfinite_share={self.max_nonfinite_share} of "
                f"nonfinite_window={self.nonfinite_window}) at global step {self.global_step}; the run diverged: "
                "lower the learning rate or check the data")
        return None

    def export_metadata(self) -> dict[str, Any]:
        """What the export's config.json records about how it was trained (merged in by on_train_end)."""
        return {"training": {"skipped_nonfinite_steps": int(self.skipped_nonfinite),
                             "global_steps": int(self.global_step) if self._trainer is not None else 0}}

    # -- optimisation
    def lr_scales(self) -> dict[int, float]:
        """{id(parameter): factor}: parameters that train at `lr * factor` (default: none)."""
        return {}

    def decays(self, name: str, param: torch.nn.Parameter) -> bool:
        """Whether weight decay applies: to matrices, not to biases, norms and scales."""
        return param.ndim >= 2

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW's groups: the parameters that require gradients, one group per (lr, weight decay)."""
        scales = self.lr_scales()
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                key = (scales.get(id(p), 1.0), self.weight_decay if self.decays(name, p) else 0.0)
                groups.setdefault(key, []).append(p)
        return [{"params": ps, "lr": self.lr * scale, "weight_decay": wd} for (scale, wd), ps in groups.items()]

    def configure_optimizers(self):
        groups = self.param_groups()
        # Lightning refuses to clip the gradients of a fused optimizer under mixed precision (bf16 on
        # GPUs and fast-bf16 CPUs): the fused step would unscale them itself. The foreach one then.
        mixed = self._trainer is not None and "mixed" in str(self.trainer.precision)
        fused = None if mixed else fused_adamw_ok([p for g in groups for p in g["params"]])
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, fused=fused)
        return self.with_schedule(optimizer)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's FSDP precision plugin refuses to clip by norm (Lightning issue 19235): under
        FSDP the norm over all shards must come from the root FSDP module, so it is asked here. Every
        other strategy clips as Lightning does."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        if gradient_clip_val and isinstance(root, FullyShardedDataParallel) and gradient_clip_algorithm in (None, "norm"):
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def with_schedule(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Lightning's optimizer dict: `optimizer` under warm-up + cosine, stepped every batch."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        lr_factor = warmup_cosine(min(self.warmup_steps, total // 2), total, self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- frozen weights stay out of checkpoints
    def _is_frozen_key(self, key: str) -> bool:
        return bool(self.frozen_prefixes) and key.startswith(self.frozen_prefixes)

    def _frozen_parameters(self) -> set[str]:
        """Parameters nothing trains in this run (e.g. the Q-Former's text side in phase 2): rebuilt at
        construction from where they came from (hub id, path, init export), so kept out of checkpoints."""
        return {n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the skip count survives a resume, so the export's record covers the whole run
        checkpoint["nonfinite_loss"] = {"skipped": int(self.skipped_nonfinite),
                                        "recent": [bool(b) for b in self._recent_skips],
                                        "consecutive": int(self._consecutive_skips)}
        state = checkpoint.get("state_dict", {})
        frozen = self._frozen_parameters()
        for key in [k for k in state if self._is_frozen_key(k) or k in frozen]:
            del state[key]
        bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"refusing to write a checkpoint with non-finite weights: {bad[:5]}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("nonfinite_loss", {})
        self.skipped_nonfinite = int(saved.get("skipped", 0))
        self._recent_skips.clear()
        self._recent_skips.extend(saved.get("recent", []))
        self._consecutive_skips = int(saved.get("consecutive", 0))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # Frozen parts are rebuilt from their pretrained source, not from the checkpoint.
        frozen = self._frozen_parameters()
        merged = {k: v for k, v in super().state_dict().items() if self._is_frozen_key(k) or k in frozen}
        merged.update(state_dict)
        return super().load_state_dict(merged, strict=strict, assign=assign)

    # -- exports
    def export(self, folder: str | Path) -> Path:  # pragma: no cover - each stage implements it
        raise NotImplementedError

    def resolved_export_dir(self) -> Path:
        return Path(self.export_dir) if self.export_dir else Path(self.trainer.default_root_dir) / "export"

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero and not self.preempted:
            folder = self.export(self.resolved_export_dir())
            record_in_export(folder, self.export_metadata())
            print(f"export: wrote {folder} (rank {self.global_rank})"
                  + (f"; {self.skipped_nonfinite} steps skipped for a non-finite loss" if self.skipped_nonfinite else ""))


def record_in_export(folder: str | Path, metadata: dict[str, Any]) -> None:
    """Merge `metadata` into an export's config.json (atomic file replace: the export stays complete).
    Stages that already put these keys in their config keep theirs."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    write_json_atomic(path, {**metadata, **config})


class WeightedLossStage(StageModule):
    """A stage whose loss is a weighted sum of named terms (stage 2 and adapt): a subclass sets
    `self.weights` ({name: weight}) and gives `compute_losses(batch, train) -> (losses, metrics)`;
    every step logs `<split>/loss` and each term, and training skips non-finite losses (`guard_loss`)."""

    weights: dict[str, float]

    def compute_losses(self, batch: dict[str, Any], train: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise NotImplementedError  # pragma: no cover - each stage implements it

    @staticmethod
    def pick_captions(captions: list[list[str]], train: bool) -> list[str]:
        """One reference caption per sample: a fresh random one per step in training, else the first."""
        if not train:
            return [c[0] for c in captions]
        picks = torch.randint(0, 1 << 30, (len(captions),)).tolist()
        return [c[p % len(c)] for c, p in zip(captions, picks)]

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        losses, metrics = self.compute_losses(batch, train=stage == "train")
        total = sum(self.weights[k] * v for k, v in losses.items())
        B = len(batch["key"])
        self.log(f"{stage}/loss", total, prog_bar=True, batch_size=B, sync_dist=stage != "train")
        self.log_dict({f"{stage}/{k}": v for k, v in {**losses, **metrics}.items()}, batch_size=B,
                      sync_dist=stage != "train")
        return total

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self.guard_loss(self._step(batch, "train"), batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")
