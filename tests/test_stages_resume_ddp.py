"""Stages 2 and 3 through the real CLI in subprocesses (stage 1: tests/test_resume.py and
tests/test_distributed.py).

Exact resume: a run SIGKILLed after its last periodic checkpoint and resumed with `--ckpt_path
last` ends with bitwise the same export as an uninterrupted run; so does one stopped by SIGTERM (stage 2).
DDP: stage 2 on 2 CPU processes (gloo) — contrastive negatives gathered across ranks — keeps
identical replicas with equal step counts, rank 0 alone exports, and predict writes every test
caption exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mindsemantix.callbacks import load_checkpoint_safely

ROOT = Path(__file__).resolve().parent.parent
QFORMER = dict(num_queries=4, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, embed_dim=16,
               max_text_length=12, dropout=0.1, itg_vocab="seen")
TRAINER = {"accelerator": "cpu", "precision": "32-true", "max_steps": 8, "val_check_interval": 4,
           "check_val_every_n_epoch": None, "limit_val_batches": 1, "num_sanity_val_steps": 0,
           "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
           "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"save_last": True, "every_n_train_steps": 2, "save_top_k": -1}}]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny data with captions and images, a stage-1 export, a tiny tokenizer, a stage-2 export
    over both subjects, a tiny random SD folder and captions for the test keys."""
    from conftest import make_tiny_dataset

    from mindsemantix.data.datamodule import BrainDataModule
    from mindsemantix.models.brain_encoder import BrainEncoder, BrainEncoderConfig
    from mindsemantix.models.diffusion import SmallSDConfig, small_stable_diffusion
    from mindsemantix.models.qformer import save_tiny_wordpiece_tokenizer
    from mindsemantix.stages.align import BrainAlign

    root = tmp_path_factory.mktemp("resume_stages")
    data = make_tiny_dataset(root / "data", n_images={"train": 14, "val": 4, "test": 4}, image_size=16)
    dm = BrainDataModule(str(data), batch_size=4)
    dm.setup()
    torch.manual_seed(0)
    encoder = BrainEncoder(BrainEncoderConfig.preset("tiny"), with_decoder=False)
    for subject, info in dm.subject_info().items():
        encoder.add_subject(subject, info.coords_mm)
    encoder.save_pretrained(root / "stage1")
    tokenizer = save_tiny_wordpiece_tokenizer(root / "wordpiece", words=["image", "caption"] + [str(i) for i in range(30)])
    qformer = {**QFORMER, "tokenizer": str(tokenizer)}
    BrainAlign(brain_encoder=str(root / "stage1"), qformer=qformer).save_export(root / "align")
    sd = SmallSDConfig(resolution=16, vae_channels=(8, 16), unet_channels=(16, 32), attention_head_dim=8,
                       text_width=16, text_layers=1, text_heads=2, norm_groups=8)
    small_stable_diffusion(sd, seed=0).save_pretrained(root / "sd")
    return {"root": root, "data": str(data), "stage1": str(root / "stage1"), "qformer": qformer,
            "align": str(root / "align"), "sd": str(root / "sd")}


def config(stage: str, s: dict) -> dict:
    if stage == "align":  # the representation phase: ITC + ITM hard negatives + ITG, dropout, a readout
        model = {"class_path": "mindsemantix.stages.align.BrainAlign",
                 "init_args": {"brain_encoder": s["stage1"], "train_brain_encoder": True, "qformer": s["qformer"],
                               "readout_dim": 8, "lr": 3e-3, "warmup_steps": 2}}
        fields = ["captions"]
    else:
        model = {"class_path": "mindsemantix.stages.reconstruct.BrainReconstruct",
                 "init_args": {"align_export": s["align"], "diffusion": s["sd"], "head": {"hidden": 32, "token_dim": 8},
                               "lr": 3e-3, "warmup_steps": 2}}
        fields = ["captions", "image"]
    return {"seed_everything": 0, "trainer": TRAINER, "model": model,
            "data": {"datasets": s["data"], "batch_size": 4, "fields": fields, "num_workers": 0}}


def fit(stage: str, s: dict, run: Path, *extra: str, expect_rc: int = 0, subcommand: str = "fit",
        trainer: dict | None = None) -> subprocess.CompletedProcess:
    path = run.parent / f"{stage}.yaml"
    cfg = config(stage, s)
    cfg["trainer"] = {**cfg["trainer"], **(trainer or {})}
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "mindsemantix.cli", subcommand, "--config", str(path),
           f"--trainer.default_root_dir={run}", *extra]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect_rc, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def export_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


@pytest.mark.parametrize("stage", ["align", "reconstruct"])
def test_killed_or_preempted_run_resumes_bitwise_exact(stage, inputs, tmp_path):
    plain = tmp_path / "plain" / "run"
    plain.parent.mkdir()
    fit(stage, inputs, plain)
    reference = export_tensors(plain)

    killed = tmp_path / "killed" / "run"
    killed.parent.mkdir()
    fit(stage, inputs, killed, "--trainer.callbacks+=probe_callbacks.KillAtStep", "--trainer.callbacks.step=5",
        expect_rc=-9)
    assert not (killed / "export").exists()
    assert load_checkpoint_safely(killed / "checkpoints" / "last.ckpt")["global_step"] == 4
    fit(stage, inputs, killed, "--ckpt_path=last")

    runs = [killed]
    if stage == "align":  # SIGTERM's path is the same for every stage (the Preemption callback)
        stopped = tmp_path / "stopped" / "run"
        stopped.parent.mkdir()
        proc = fit(stage, inputs, stopped, "--trainer.callbacks+=probe_callbacks.KillAtStep",
                   "--trainer.callbacks.step=3", "--trainer.callbacks.signal_name=SIGTERM")
        assert "preemption: received SIGTERM at step 3" in proc.stdout and not (stopped / "export").exists()
        fit(stage, inputs, stopped, "--ckpt_path=last")
        runs.append(stopped)

    for run in runs:
        resumed = export_tensors(run)
        assert resumed.keys() == reference.keys()
        different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
        assert not different, f"{run.parent.name}: {len(different)} tensors differ, e.g. {different[:3]}"
        # the training curves survive the resume: steps logged before the interruption are still there
        steps = {int(float(r.split(",")[header.index("step")]))
                 for header in [(run / "metrics.csv").read_text().splitlines()[0].split(",")]
                 for r in (run / "metrics.csv").read_text().splitlines()[1:]}
        assert min(steps) <= 1 and max(steps) >= 7
    assert json.loads((killed / "export" / "config.json").read_text())


def test_stage2_under_two_process_ddp(inputs, tmp_path):
    from mindsemantix.data.datamodule import BrainDataModule

    run, probes = tmp_path / "run", tmp_path / "probes"
    ddp = {"devices": 2, "strategy": "ddp_find_unused_parameters_true", "max_steps": 4, "val_check_interval": 2,
           "limit_val_batches": None}
    proc = fit("align", inputs, run, "--trainer.callbacks+=probe_callbacks.RecordWeights",
               f"--trainer.callbacks.out_dir={probes}", trainer=ddp)
    ranks = [json.loads((probes / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    assert ranks[0]["digest"] == ranks[1]["digest"]                    # identical replicas
    assert proc.stdout.count("export: wrote") == 1 and "(rank 0)" in proc.stdout

    predicted = fit("align", inputs, run, "--model.init_args.init_from", str(run / "export"),
                    "--trainer.callbacks+=mindsemantix.stages.align.CaptionWriter", subcommand="predict",
                    trainer={"devices": 2, "strategy": "ddp"})
    assert predicted.stdout.count("captions: wrote") == 1              # rank 0 writes, once
    rows = [json.loads(line) for line in (run / "captions.jsonl").read_text().splitlines()]
    dm = BrainDataModule(inputs["data"], batch_size=4)
    dm.setup()
    assert sorted(r["key"] for r in rows) == sorted(r.key for r in dm.split_refs("test"))  # each key exactly once
