"""Every `stages/cluster/*.yaml` runs: parsed as a user would give it, with only the hub ids and data /
run paths pointed at tiny local stand-ins (tests/cluster_standins.py: same classes and file layouts),
the accelerator / devices / worker count set for a CPU, and step counts cut — 3 training steps, a
checkpoint every 2 — then `predict` for stages 2 and 3. Phase 2 runs with the LoRA setting the config
suggests on the bf16 Llama stand-in (SentencePiece-only tokenizer, .bin shards), and once more as
written under 2-process DDP (gloo) with predict. Stage 1 has no hub model; its `large` preset is the
one size override (scripts/gpu_check.sh runs it as written on a GPU).

Checks on the way: each run leaves exactly one `last.ckpt`, and no checkpoint holds a frozen tensor.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mindsemantix.callbacks import load_checkpoint_safely

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "stages" / "cluster"
CONFIGS = ["pretrain.yaml", "align_representation.yaml", "align.yaml", "reconstruct.yaml"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}  # align.yaml's example
CPU_TRAINER = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "max_steps": 3, "val_check_interval": 2,
               "enable_progress_bar": False, "enable_model_summary": False}
# What may differ from the config as written (dotted paths; `*` = any path-valued string).
ALLOWED = {"trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.max_steps", "trainer.val_check_interval",
           "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.default_root_dir",
           "trainer.callbacks.init_args.every_n_train_steps", "data.num_workers", "model.init_args.sampling.num_inference_steps",
           "model.init_args.preset", "model.init_args.lora"}


def test_every_cluster_config_is_covered():
    assert sorted(p.name for p in CLUSTER.glob("*.yaml")) == sorted(CONFIGS)


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    from cluster_standins import make_cluster_inputs

    return make_cluster_inputs(tmp_path_factory.mktemp("cluster"))


def point_at_standins(value, paths: dict[str, str]):
    """Hub ids -> stand-in folders, `data/...` and `runs/nsd/...` -> the test's folders; recursively."""
    if isinstance(value, dict):
        return {k: point_at_standins(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [point_at_standins(v, paths) for v in value]
    if isinstance(value, str):
        if value in paths:
            return paths[value]
        if value.startswith("runs/nsd/"):
            return str(Path(paths["runs/nsd"]) / value.removeprefix("runs/nsd/"))
    return value


def standin_config(name: str, paths: dict[str, str], **model_overrides) -> dict:
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    cfg = point_at_standins(cfg, paths)
    cfg["trainer"].update(CPU_TRAINER)
    for callback in cfg["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 2
    cfg["data"]["num_workers"] = 0
    init = cfg["model"]["init_args"]
    if "sampling" in init:
        init["sampling"]["num_inference_steps"] = 2
    if init.get("preset") == "large":
        init["preset"] = "tiny"  # stage 1 on a CPU: no hub model to stand in for, so the size is cut
    init.update(model_overrides)
    return cfg


def changed_keys(a, b, prefix="") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k for key in set(a) | set(b) for k in changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return {k for x, y in zip(a, b) for k in changed_keys(x, y, prefix)}
    return set() if a == b else {prefix.rstrip(".")}


def run_cli(subcommand: str, cfg: dict, tmp: Path, *extra: str, devices: int = 1) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (Lightning's DDP launcher re-runs it per rank)."""
    path = tmp / f"{Path(cfg['trainer']['default_root_dir']).name}-{subcommand}-{devices}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mindsemantix.cli", subcommand, "--config", str(path), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return proc


def check_checkpoints(run: Path, frozen_prefixes: tuple[str, ...]) -> dict[str, int]:
    """Exactly one `last` checkpoint, none holding frozen tensors; returns {file: bytes}."""
    files = sorted((run / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in files if p.name.startswith("last")] == ["last.ckpt"], [p.name for p in files]
    for path in files:
        keys = load_checkpoint_safely(path)["state_dict"]
        leaked = [k for k in keys if k.startswith(frozen_prefixes)]
        assert not leaked, f"{path.name} holds frozen tensors, e.g. {leaked[:3]}"
    return {p.name: p.stat().st_size for p in files}


def test_cluster_configs_run_on_standins(standins, tmp_path):
    runs = Path(standins["runs/nsd"])

    cfg = standin_config("pretrain.yaml", standins)
    original = yaml.safe_load((CLUSTER / "pretrain.yaml").read_text())
    assert changed_keys(original, cfg) - {"data.datasets", *ALLOWED} == set()
    run_cli("fit", cfg, tmp_path)
    assert (runs / "pretrain" / "export" / "config.json").is_file()
    check_checkpoints(runs / "pretrain", ())

    cfg = standin_config("align_representation.yaml", standins)
    paths = {"model.init_args.brain_encoder", "model.init_args.qformer.text_init", "model.init_args.vision_encoder",
             "data.datasets"}
    assert changed_keys(yaml.safe_load((CLUSTER / "align_representation.yaml").read_text()), cfg) - paths - ALLOWED == set()
    run_cli("fit", cfg, tmp_path)
    # frozen in phase 1: the CLIP tower (the brain encoder trains here)
    check_checkpoints(runs / "align_representation", ("vision_encoder.",))

    # phase 2 with LoRA on the bf16 Llama whose tokenizer is only a SentencePiece model
    cfg = standin_config("align.yaml", standins, lora=LORA)
    assert cfg["model"]["init_args"]["llm_dtype"] == "bfloat16"
    run_cli("fit", cfg, tmp_path)
    run = runs / "align"
    sizes = check_checkpoints(run, ("brain_encoder.", "vision_encoder."))
    state = load_checkpoint_safely(run / "checkpoints" / "last.ckpt")["state_dict"]
    llm_keys = [k for k in state if ".llm." in k or k.startswith("bridge.llm.")]
    assert llm_keys and all("lora_" in k for k in llm_keys)            # adapters only, never the LLM
    assert all(state[k].dtype == torch.float32 for k in llm_keys)      # fp32 adapters beside a bf16 LLM
    run_cli("predict", cfg, tmp_path, "--model.init_args.init_from", str(run / "export"))  # align.yaml lists CaptionWriter
    captions = [json.loads(line) for line in (run / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 2 * 3 and all(isinstance(c["caption"], str) for c in captions)

    cfg = standin_config("reconstruct.yaml", standins)
    assert cfg["model"]["init_args"]["diffusion_dtype"] == "float16"  # a GPU setting: fp32 on this CPU, warned
    assert "float16 Stable Diffusion needs a GPU" in run_cli("fit", cfg, tmp_path).stderr
    run = runs / "reconstruct"
    check_checkpoints(run, ("brain_encoder.", "align.", "pipe.", "diffusion."))
    run_cli("predict", cfg, tmp_path, "--model.init_args.init_from", str(run / "export"))
    for variant in ("caption_only", "latent_only", "full"):
        assert len(list((run / "predict" / variant).glob("*.png"))) == 2 * 3, variant
    (tmp_path / "checkpoint_sizes.json").write_text(json.dumps(sizes))


def test_stage2_phase2_under_two_process_ddp(standins, tmp_path):
    """align.yaml as written (DDP, no LoRA) on 2 CPU processes, then predict on 2 processes."""
    runs = Path(standins["runs/nsd"])
    phase1 = runs / "align_representation" / "export"
    if not (phase1 / "config.json").is_file():  # run alone: stage 1 and phase 1 first
        for name in ("pretrain.yaml", "align_representation.yaml"):
            run_cli("fit", standin_config(name, standins), tmp_path)
    cfg = standin_config("align.yaml", standins)
    run = tmp_path / "align_ddp"
    cfg["trainer"].update(devices=2, strategy=yaml.safe_load((CLUSTER / "align.yaml").read_text())["trainer"]["strategy"],
                          default_root_dir=str(run))
    assert run_cli("fit", cfg, tmp_path, devices=2).stdout.count("export: wrote") == 1
    check_checkpoints(run, ("brain_encoder.", "vision_encoder."))
    out = run_cli("predict", cfg, tmp_path, "--model.init_args.init_from", str(run / "export"), devices=2).stdout
    assert out.count("captions: wrote") == 1
    keys = [json.loads(line)["key"] for line in (run / "captions.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 2 * 3                         # every test key exactly once
