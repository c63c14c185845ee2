"""Stages 2 and 3 through the real CLI in subprocesses (stage 1: tests/test_resume.py and
tests/test_distributed.py).

Exact resume: a run SIGKILLed after its last periodic checkpoint and resumed with `--ckpt_path
last` ends with bitwise the same export as an uninterrupted run; so does one stopped by SIGTERM (stage 2).
DDP: stage 2 on 2 CPU processes (gloo) — contrastive negatives gathered across ranks — keeps
identical replicas with equal step counts, rank 0 alone exports, and predict writes every test
caption exactly once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import TINY_QFORMER, run_cli, write_tiny_exports
from mindsemantix.callbacks import load_checkpoint_safely

QFORMER = {**TINY_QFORMER, "dropout": 0.1, "itg_vocab": "seen"}
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

    root = tmp_path_factory.mktemp("resume_stages")
    data = make_tiny_dataset(root / "data", n_images={"train": 14, "val": 4, "test": 4}, image_size=16)
    exports = write_tiny_exports(root, data, qformer=QFORMER)
    return {"root": root, "data": str(data), "stage1": exports["stage1"], "qformer": exports["qformer"],
            "align": exports["align"], "sd": exports["sd"]}


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
    return run_cli(subcommand, "--config", str(path), f"--trainer.default_root_dir={run}", *extra, expect_rc=expect_rc)


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
