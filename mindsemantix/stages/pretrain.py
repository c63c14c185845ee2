"""Stage 1: BrainMAE — masked brain modelling over many subjects (`stages/pretrain.yaml`).

The model is `mindsemantix.models.brain_encoder.BrainEncoder`; this module holds the loss
bookkeeping, metrics, the picture and the export. Subjects' input layers are built in `setup()`
from the datamodule (their voxel coordinates are data, not hyper-parameters).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric

from mindsemantix.models.brain_encoder import BrainEncoder, BrainEncoderConfig, BrainEncoderOverrides
from mindsemantix.numerics import masked_pearson  # noqa: F401 (re-exported)
from mindsemantix.stages.base import StageModule, as_dict, settings


class BrainMAE(StageModule):
    """Pretrains the brain encoder as a masked autoencoder.

    Args:
        preset: size preset of BrainEncoderConfig ("tiny", "base", "large").
        encoder: changes to the preset's fields (e.g. {depth: 8, mask_ratio: 0.75}; fields below).
        init_from: a stage-1 export to start from (continue pretraining, or add subjects to it).
        train_only_new_subjects: with `init_from`, freeze everything except the input layers and
            output heads of subjects the export does not have (fitting a new subject).
        val_mask_seed: validation masks come from this seed, so val losses are comparable.
        subject_lr_scale: learning-rate multiplier of the subject-specific layers (tokenizers and
            output heads). A batch holds one subject, so each subject's per-patch maps get a gradient
            in only ~1/n_subjects of the steps, and Adam moves a weight by about lr per update: at the
            shared lr they barely leave their (shared) start in a short run. They carry what is
            specific to a subject's voxels (e.g. its low-rank noise and response covariance).
        n_plot_samples: validation samples kept in `plot_batch` for `mae_reconstruction.png`
            (written by the `mindsemantix.writers.MAEReconstructionPlot` callback).
        lr: AdamW's learning rate.
        weight_decay: AdamW's weight decay.
        **kwargs: the other optimisation / export settings of StageModule (warmup_steps, export_dir, ...).
    """

    def __init__(self, preset: str = "tiny", encoder: BrainEncoderOverrides = BrainEncoderOverrides(), init_from: str | None = None,
                 train_only_new_subjects: bool = False, val_mask_seed: int = 1234, n_plot_samples: int = 3,
                 subject_lr_scale: float = 1.0, lr: float = 2.5e-4, weight_decay: float = 0.05, **kwargs: Any):
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        overrides = settings(BrainEncoderOverrides, encoder, "encoder") or BrainEncoderOverrides()
        encoder = as_dict(encoder)  # hyper-parameters stay plain
        self.save_hyperparameters()
        if train_only_new_subjects and not init_from:
            raise ValueError("train_only_new_subjects needs init_from: the export whose shared part stays frozen")
        self.config = BrainEncoderConfig.preset(preset, **overrides.changes())
        self.encoder = BrainEncoder.from_pretrained(init_from, with_decoder=True) if init_from else BrainEncoder(self.config)
        if init_from:
            self.config = self.encoder.config
        self.val_corr: dict[str, MeanMetric] = {}
        self.plot_batch: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if datamodule is None:
            return
        pretrained_subjects = set(self.encoder.subjects)
        for name, info in datamodule.subject_info().items():
            self.encoder.add_subject(name, info.coords_mm)
        if self.hparams.train_only_new_subjects:
            new = [s for s in self.encoder.subjects if s not in pretrained_subjects]
            if not new:
                raise ValueError(f"train_only_new_subjects: every subject of the data is already in {self.hparams.init_from}")
            self.encoder.freeze_except_subjects(new)
        # One metric per subject, registered so Lightning syncs it across ranks.
        for name in self.encoder.subjects:
            if name not in self.val_corr:
                self.val_corr[name] = MeanMetric().to(self.device)
                self.add_module(f"val_corr_{name.replace('-', '_')}", self.val_corr[name])

    def lr_scales(self) -> dict[int, float]:
        """Subject layers train at lr * subject_lr_scale (each sees only its subject's batches)."""
        return {id(p): self.hparams.subject_lr_scale for s in self.encoder.subjects for p in self.encoder.subject_parameters(s)}

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        # fmri_target: the mean of the image's other repetitions (data.train_repetition: cross)
        out = self.encoder.forward_mae(batch["fmri"], batch["subject"], target=batch.get("fmri_target"))
        loss = self.guard_loss(out.loss, batch)
        if loss is not None:
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["key"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.val_mask_seed + batch_idx)
        out = self.encoder.forward_mae(batch["fmri"], batch["subject"], generator=generator)
        n = len(batch["key"])
        self.log("val/loss", out.loss, prog_bar=True, batch_size=n, sync_dist=True)
        corr = masked_pearson(out.pred, batch["fmri"].float(), out.mask)
        self.val_corr[batch["subject"]].update(corr)
        if self.plot_batch is None and self.trainer.is_global_zero:
            k = self.hparams.n_plot_samples
            self.plot_batch = {"subject": batch["subject"], "key": batch["key"][:k], "fmri": batch["fmri"][:k].float().cpu(),
                                "pred": out.pred[:k].float().cpu(), "mask": out.mask[:k].cpu()}

    def on_validation_epoch_end(self) -> None:
        # Under DDP a subject's val batches reach only some ranks, but compute() and a synced log are
        # collectives: every rank must issue the same ones in the same order (else values of different
        # subjects mix, or ranks hang). So: the subjects seen on any rank, in name order, on all ranks.
        names = sorted(self.val_corr)
        seen = torch.tensor([float(self.val_corr[n].update_count) for n in names], device=self.device)
        seen = self.trainer.strategy.reduce(seen, reduce_op="sum") if names else seen
        values = []
        for name, count in zip(names, seen.tolist()):
            metric = self.val_corr[name]
            if count > 0:
                with warnings.catch_warnings():  # a rank without this subject's batches adds nothing: fine
                    warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                    value = metric.compute()  # torchmetrics reduces it over ranks
                self.log(f"val/masked_corr/{name}", value, sync_dist=True)
                values.append(value)
            metric.reset()
        if values:
            self.log("val/masked_corr", torch.stack(values).mean(), prog_bar=True, sync_dist=True)

    def on_validation_start(self) -> None:
        self.plot_batch = None

    def export(self, folder: str | Path) -> Path:
        return self.encoder.save_pretrained(folder)

