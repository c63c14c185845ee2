"""Faults: non-finite losses (skip or stop, never into a checkpoint), interrupted exports."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import mindsemantix.export as export_module
from mindsemantix.data.datamodule import BrainDataModule
from mindsemantix.export import ExportError, load_export, save_export
from mindsemantix.stages.pretrain import BrainMAE


class NaNAtStep(BrainMAE):
    """BrainMAE whose loss turns NaN at one global step (as an exploding step would), or, with
    `every`, on every `every`-th batch."""

    def __init__(self, nan_step: int = 2, every: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.nan_step, self.every = nan_step, every

    def training_step(self, batch, batch_idx):
        out = self.encoder.forward_mae(batch["fmri"], batch["subject"])
        nan = batch_idx % self.every == 0 if self.every else self.global_step == self.nan_step
        return self.guard_loss(out.loss * float("nan") if nan else out.loss, batch)


def make_trainer(tmp_path, max_steps=4):
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])


def test_nonfinite_loss_is_skipped_and_counted(tiny_dataset, tmp_path):
    model = NaNAtStep(nan_step=2, preset="tiny", warmup_steps=1, nonfinite_loss="skip")
    trainer = make_trainer(tmp_path)
    trainer.fit(model, datamodule=BrainDataModule(str(tiny_dataset), batch_size=4))
    assert model.skipped_nonfinite == 1
    # the skipped batch took no optimizer step, but training went on to max_steps
    assert trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nonfinite_loss_stops_with_a_clear_message(tiny_dataset, tmp_path):
    model = NaNAtStep(nan_step=1, preset="tiny", warmup_steps=1, nonfinite_loss="stop")
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at global step 1 on a batch of subj0\d \(subj0"):
        make_trainer(tmp_path).fit(model, datamodule=BrainDataModule(str(tiny_dataset), batch_size=4))


def test_checkpoint_with_nonfinite_weights_is_refused(tiny_dataset, tmp_path):
    model = BrainMAE(preset="tiny", warmup_steps=1)
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(model, datamodule=BrainDataModule(str(tiny_dataset), batch_size=4))
    with torch.no_grad():
        next(model.encoder.blocks[0].parameters()).fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="refusing to write a checkpoint with non-finite weights"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_interrupted_export_leaves_previous_export_valid(tmp_path, monkeypatch):
    folder = tmp_path / "export"
    save_export(folder, "brain_encoder", {"v": 1}, {"w": torch.ones(3)})

    def dies_midway(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(export_module, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_export(folder, "brain_encoder", {"v": 2}, {"w": torch.zeros(3)})
    config, tensors = load_export(folder, "brain_encoder")  # the old, complete export survives
    assert config["v"] == 1 and torch.equal(tensors["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no half-written temp folder left


def test_incomplete_export_folder_is_rejected(tmp_path):
    folder = tmp_path / "copied"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="config.json is missing"):
        load_export(folder)
    (folder / "config.json").write_text('{"format": "mindsemantix-export/1", "kind": "brain_encoder"}')
    with pytest.raises(ExportError, match="model.safetensors is unreadable"):
        load_export(folder, "brain_encoder")
    with pytest.raises(ExportError, match="holds a 'brain_encoder', expected a 'brain_align'"):
        load_export(folder, "brain_align")


def test_checkpoints_load_to_the_cpu_unless_lightning_asks_otherwise(tmp_path, monkeypatch):
    """Lightning calls load_checkpoint without map_location; a GPU checkpoint would then be restored
    onto the device it was saved from on every rank (or fail where that device is missing)."""
    import mindsemantix.callbacks as callbacks

    seen = []
    monkeypatch.setattr(callbacks, "load_checkpoint_safely", lambda path, map_location: seen.append(map_location) or {})
    io = callbacks.AtomicCheckpointIO()
    io.load_checkpoint(tmp_path / "x.ckpt")
    io.load_checkpoint(tmp_path / "x.ckpt", map_location="meta")
    assert seen == ["cpu", "meta"]


def test_a_run_whose_loss_is_always_nonfinite_fails_instead_of_exporting(tiny_dataset, tmp_path):
    model = NaNAtStep(every=1, preset="tiny", warmup_steps=1, max_consecutive_nonfinite=3)
    with pytest.raises(FloatingPointError, match="non-finite loss on 3 consecutive batches"):
        make_trainer(tmp_path, max_steps=20).fit(model, datamodule=BrainDataModule(str(tiny_dataset), batch_size=4))
    assert not (tmp_path / "export").exists()  # no untrained weights presented as a result


def test_too_large_a_share_of_skipped_batches_fails(tiny_dataset, tmp_path):
    # every second batch NaN: never 2 in a row, but half of the window
    model = NaNAtStep(every=2, preset="tiny", warmup_steps=1, max_consecutive_nonfinite=5,
                    max_nonfinite_share=0.4, nonfinite_window=6)
    with pytest.raises(FloatingPointError, match=r"non-finite loss on 1 consecutive batches and 3 of the last"):
        make_trainer(tmp_path, max_steps=20).fit(model, datamodule=BrainDataModule(str(tiny_dataset), batch_size=4))


def test_export_records_how_many_steps_were_skipped(tiny_dataset, tmp_path):
    model = NaNAtStep(nan_step=2, preset="tiny", warmup_steps=1)
    make_trainer(tmp_path).fit(model, datamodule=BrainDataModule(str(tiny_dataset), batch_size=4))
    config, _ = load_export(tmp_path / "export", "brain_encoder")
    assert config["training"]["skipped_nonfinite_steps"] == 1
