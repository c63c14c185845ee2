"""Stage 1 through the real CLI and config: fit, export, resume, the picture, adding a subject."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mindsemantix.cli import main
from mindsemantix.data.datamodule import BrainDataModule
from mindsemantix.models.brain_encoder import BrainEncoder
from mindsemantix.stages.pretrain import masked_pearson

ROOT = Path(__file__).resolve().parent.parent


TINY_OVERRIDES = """
trainer:
  precision: 32-true
  val_check_interval: 6
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 6, save_top_k: -1}
    - class_path: mindsemantix.writers.MAEReconstructionPlot
model:
  init_args: {preset: tiny, encoder: null, warmup_steps: 2}
data:
  batch_size: 8
  num_workers: 0
"""


def tiny_args(run: Path, datasets: list[Path], max_steps: int = 12) -> list[str]:
    """The demo config, shrunk by a second config file (as a user would) and moved to `run`."""
    overrides = run.parent / f"{run.name}-tiny.yaml"
    overrides.write_text(TINY_OVERRIDES)
    return ["fit", "--config", str(ROOT / "stages/pretrain.yaml"), "--config", str(overrides),
            f"--data.datasets={json.dumps([str(d) for d in datasets])}", f"--trainer.max_steps={max_steps}",
            f"--trainer.default_root_dir={run}"]


def test_masked_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 50)), rng.normal(size=(2, 50))
    mask = rng.random((2, 50)) < 0.6
    got = masked_pearson(torch.tensor(pred), torch.tensor(target), torch.tensor(mask))
    want = [np.corrcoef(pred[i][mask[i]], target[i][mask[i]])[0, 1] for i in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_fit_exports_and_plots(tiny_dataset_factory, tmp_path):
    data = tiny_dataset_factory(subjects={"subj01": 60, "subj02": 75}, n_images={"train": 16, "val": 4, "test": 4})
    run = tmp_path / "run"
    assert main(tiny_args(run, [data])) == 0
    encoder = BrainEncoder.from_pretrained(run / "export")
    assert encoder.subjects == ["subj01", "subj02"] and encoder.has_decoder
    metrics = (run / "metrics.csv").read_text()
    assert "val/masked_corr/subj02" in metrics and "train/loss" in metrics
    assert (run / "mae_reconstruction.png").stat().st_size > 10_000
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # the export reproduces the trained encoder's features
    dm = BrainDataModule(str(data), batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    state = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    fresh = BrainEncoder(encoder.config)
    for s in encoder.subjects:
        fresh.add_subject(s, encoder.tokenizers[s].coords_mm)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_features(batch["fmri"], batch["subject"]),
                                   encoder.forward_features(batch["fmri"], batch["subject"]))


def test_add_subject_trains_only_its_layers(tiny_dataset_factory, tmp_path):
    first = tiny_dataset_factory("first", subjects={"subj01": 60}, n_images={"train": 12, "val": 4})
    run = tmp_path / "run"
    assert main(tiny_args(run, [first], max_steps=4)) == 0
    new = tiny_dataset_factory("new", subjects={"subj05": 50}, n_images={"train": 12, "val": 4}, seed=5)
    run2 = tmp_path / "run2"
    args = tiny_args(run2, [new], max_steps=4) + [f"--model.init_args.init_from={run}/export",
                                                    "--model.init_args.train_only_new_subjects=true"]
    assert main(args) == 0
    before, after = BrainEncoder.from_pretrained(run / "export"), BrainEncoder.from_pretrained(run2 / "export")
    assert after.subjects == ["subj01", "subj05"]
    changed = {k for k, v in after.state_dict().items()
               if k in before.state_dict() and not torch.equal(v, before.state_dict()[k])}
    assert changed == set()  # shared backbone and the old subject untouched
    assert any("subj05" in k for k in after.state_dict())


def test_param_groups_scale_subject_layers_and_spare_biases_from_decay():
    from mindsemantix.stages.pretrain import BrainMAE

    rng = np.random.default_rng(0)
    model = BrainMAE(preset="tiny", subject_lr_scale=30.0, lr=1e-3, weight_decay=0.05)
    for name in ("subj01", "subj02"):
        model.encoder.add_subject(name, rng.uniform(-30, 30, (40, 3)))
    subject = {id(p) for s in ("subj01", "subj02") for p in model.encoder.subject_parameters(s)}
    groups = model.param_groups()
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each once
    for g in groups:
        for p in g["params"]:
            assert g["lr"] == pytest.approx(3e-2 if id(p) in subject else 1e-3)
            assert g["weight_decay"] == (0.05 if p.ndim >= 2 else 0.0)
    assert len(groups) == 4  # (shared | subject) x (decay | no decay)


def test_bf16_mixed_fit_clips_gradients(tiny_dataset_factory, tmp_path):
    """The path of GPUs and fast-bf16 CPUs (`precision: null` picks it there): Lightning refuses to
    clip a fused optimizer's gradients under mixed precision, so the stage must not build one."""
    data = tiny_dataset_factory(subjects={"subj01": 60}, n_images={"train": 8, "val": 4})
    run = tmp_path / "run"
    assert main(tiny_args(run, [data], max_steps=2) + ["--trainer.precision=bf16-mixed"]) == 0
    assert (run / "export" / "config.json").is_file()
    assert "bf16-mixed" in (run / "config.yaml").read_text()


def test_gradient_clipping_under_fsdp_asks_the_root_module_for_the_norm():
    """Lightning's FSDP precision plugin raises on clipping by norm; the stages clip through the root
    FSDP module instead (the only place that sees every shard). Elsewhere: Lightning's own clipping."""
    from types import SimpleNamespace

    from torch.distributed.fsdp import FullyShardedDataParallel

    from mindsemantix.stages.pretrain import BrainMAE

    class Root(FullyShardedDataParallel):  # stands in for the wrapped model (FSDP needs GPUs here)
        def __init__(self):
            object.__setattr__(self, "norms", [])

        def clip_grad_norm_(self, max_norm, norm_type=2.0):
            self.norms.append(max_norm)

    model = BrainMAE(preset="tiny")
    lightning_clips = []
    model.clip_gradients = lambda optimizer, **kw: lightning_clips.append(kw)  # noqa: E731
    root = Root()
    model._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
    model.configure_gradient_clipping(None, gradient_clip_val=0.8, gradient_clip_algorithm="norm")
    assert root.norms == [0.8] and lightning_clips == []
    model._trainer = SimpleNamespace(strategy=SimpleNamespace(model=torch.nn.Linear(2, 2)))  # DDP / single device
    model.configure_gradient_clipping(None, gradient_clip_val=0.8, gradient_clip_algorithm="norm")
    assert root.norms == [0.8] and lightning_clips == [{"gradient_clip_val": 0.8, "gradient_clip_algorithm": "norm"}]
