"""Callbacks that write a stage's outputs: the stage modules compute, these save.

- `ReconstructionWriter` (stage 3 `predict`): PNGs per variant and key, `grid.png`,
  `reconstructions.json`, optionally `scores.json`.
- `MAEReconstructionPlot` (stage 1 `fit`): `mae_reconstruction.png`, a few validation samples
  true | visible to the encoder | reconstructed, on the brain.

Every file is written atomically, on rank 0, only under the folder the run names; file names come
from sample keys, which the data reader has checked against the key pattern.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from mindsemantix.io import atomic_path, gather_rows, write_json_atomic
from mindsemantix.models.diffusion import save_png, save_reconstruction_grid

log = logging.getLogger(__name__)


class ReconstructionWriter(Callback):
    """Writes stage-3 `predict` outputs (rows from `BrainReconstruct.predict_step`) under
    `predict_dir` (default: the module's `predict_dir`, `<default_root_dir>/predict`): `seen/`,
    one folder per variant, `grid.png` (first `grid_rows` keys), `reconstructions.json`, and
    `scores.json` when `score` (default: the module's `score`)."""

    writes_reconstructions = True  # BrainReconstruct refuses to predict without such a callback

    def __init__(self, predict_dir: str | None = None, grid_rows: int | None = None, score: bool | None = None):
        self.predict_dir, self.grid_rows, self.score = predict_dir, grid_rows, score
        self._reset()

    def _reset(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.grid: list[dict[str, Any]] = []
        self.seconds: dict[str, float] = {}
        self.n = 0

    def folder(self, pl_module: L.LightningModule) -> Path:
        return Path(self.predict_dir) if self.predict_dir else Path(pl_module.predict_dir)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        out = self.folder(pl_module)
        rows = self.grid_rows if self.grid_rows is not None else pl_module.grid_rows
        for row in outputs:
            if row["seen"] is not None:
                save_png(out / "seen" / f"{row['key']}.png", row["seen"])
            for variant, image in row["images"].items():
                save_png(out / variant / f"{row['key']}.png", image)
                self.seconds[variant] = self.seconds.get(variant, 0.0) + row["seconds"][variant]
            self.n += 1
            record = {"key": row["key"], "decoded": row["decoded"], "reference": row["reference"]}
            self.records.append(record)
            if len(self.grid) < rows:
                self.grid.append({**record, "seen": row["seen"], **row["images"]})

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = gather_rows(self.records)
        if not trainer.is_global_zero:
            return
        out = self.folder(pl_module)
        settings = pl_module.describe()
        title = settings.pop("title")
        write_json_atomic(out / "reconstructions.json", {
            **settings, "seconds_per_image": {v: s / max(1, self.n) for v, s in self.seconds.items()},
            "records": sorted(records, key=lambda r: r["key"])})
        if self.grid:
            save_reconstruction_grid(out / "grid.png", self.grid, title=title)
        if (self.score if self.score is not None else pl_module.score) and (out / "seen").is_dir():
            write_json_atomic(out / "scores.json", score_reconstructions(out, pl_module.variants))
        log.info("reconstructions of %d keys written to %s", len(records), out)


def score_reconstructions(folder: str | Path, variants, feature_nets=None) -> dict[str, Any]:
    """PixCorr / SSIM / 2-way identification of each variant's PNGs against `folder/seen`."""
    from mindsemantix.eval.images import build_feature_nets, score_image_folders

    folder = Path(folder)
    if feature_nets is None:  # built once: the seen images' features are then computed once
        feature_nets, _ = build_feature_nets({})
    return {v: score_image_folders(folder / v, folder / "seen", feature_nets=feature_nets)
            for v in variants if (folder / v).is_dir()}


class MAEReconstructionPlot(Callback):
    """At the end of stage-1 `fit`: `mae_reconstruction.png` in the run's log folder, from the
    validation samples the module kept (`BrainMAE.plot_batch`)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sample = getattr(pl_module, "plot_batch", None)
        if not trainer.is_global_zero or sample is None:
            return
        # not trainer.log_dir: that is a collective (broadcast) and this runs on rank 0 only
        out_dir = Path(trainer.logger.log_dir if trainer.logger else trainer.default_root_dir)
        info = trainer.datamodule.subject_info()[sample["subject"]]
        plot_mae_reconstruction(sample, info.mask_path, out_dir / "mae_reconstruction.png")


def plot_mae_reconstruction(sample: dict[str, Any], mask_path: str | Path, out: str | Path) -> Path:
    """For a few validation samples: true pattern | what the encoder saw (masked) | reconstruction,
    as axial slices of the ROI in the subject's brain space (nilearn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from nilearn import plotting

    mask_img = nib.load(str(mask_path))
    roi = np.asarray(mask_img.dataobj) > 0

    def to_img(values: np.ndarray) -> nib.Nifti1Image:
        vol = np.zeros(roi.shape, np.float32)
        vol[roi] = values  # C-order nonzero == shard voxel order
        return nib.Nifti1Image(vol, mask_img.affine)

    rows = len(sample["key"])
    fig, axes = plt.subplots(rows, 3, figsize=(13, 2.6 * rows), squeeze=False)
    vmax = float(np.percentile(np.abs(sample["fmri"].numpy()), 98)) or 1.0
    for r in range(rows):
        true = sample["fmri"][r].numpy()
        seen = np.where(sample["mask"][r].numpy(), 0.0, true)
        columns = [("true", true), ("visible to the encoder (75% hidden)", seen), ("reconstruction", sample["pred"][r].numpy())]
        for c, (title, values) in enumerate(columns):
            plotting.plot_stat_map(to_img(values), bg_img=None, display_mode="z", cut_coords=4, axes=axes[r, c],
                                   vmax=vmax, colorbar=c == 2, annotate=False, draw_cross=False,
                                   title=f"{sample['key'][r]}: {title}" if c == 0 else title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return out


__all__ = ["ReconstructionWriter", "MAEReconstructionPlot", "plot_mae_reconstruction", "score_reconstructions"]
