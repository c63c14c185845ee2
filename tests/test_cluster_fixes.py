"""Defects a GPU-cluster user would hit first (issue "the cluster path works the first time"), each
checked on a CPU with tiny stand-ins: LoRA precision on a bf16 LLM, fp16 SD on a CPU, checkpoints
without frozen tensors, one `last`, the SLURM script, the set-up script's torch floor."""

from __future__ import annotations

import torch

from mindsemantix.models.llm_bridge import LLMBridge, tiny_random_causal_lm

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def test_lora_on_a_bf16_llm_trains_fp32_adapters_that_small_steps_move():
    llm, tokenizer = tiny_random_causal_lm()
    torch.manual_seed(0)
    bridge = LLMBridge(llm.to(torch.bfloat16), tokenizer, 16, lora=LORA)
    adapters = {n: p for n, p in bridge.named_parameters() if "lora_" in n}
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert bridge.llm_dtype == torch.bfloat16                          # the frozen LLM stays bf16
    with torch.no_grad():  # peft starts lora_B at 0, which leaves lora_A without gradient: as after some training
        for n, p in adapters.items():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in adapters.items()}
    lr = 5e-7
    opt = torch.optim.AdamW(list(adapters.values()), lr=lr, weight_decay=0.0)
    bridge.lm_loss(torch.randn(3, 4, 16), ["a red circle", "two blue squares", "a green star"]).backward()
    opt.step()
    for n, p in adapters.items():
        moved = p.grad != 0
        assert moved.float().mean() > 0.5, n
        # Adam's first step moves every entry with a gradient by lr: in bf16 most would round away
        torch.testing.assert_close((p.detach() - before[n])[moved].abs(), torch.full_like(p[moved], lr),
                                   rtol=0.1, atol=0)  # fp32 spacing near 0.1: ~7e-9


def test_float16_stable_diffusion_on_a_cpu_falls_back_to_float32_with_a_warning(tmp_path):
    import pytest

    from mindsemantix.models.diffusion import Reconstructor, SmallSDConfig, load_stable_diffusion, small_stable_diffusion

    sd = SmallSDConfig(resolution=16, vae_channels=(8, 16), unet_channels=(16, 32), attention_head_dim=8,
                       text_width=16, text_layers=1, text_heads=2, norm_groups=8)
    small_stable_diffusion(sd, seed=0).save_pretrained(tmp_path / "sd")
    with pytest.warns(UserWarning, match="float16 Stable Diffusion needs a GPU"):
        pipe = load_stable_diffusion(str(tmp_path / "sd"), dtype=torch.float16)
    assert pipe.vae.dtype == pipe.unet.dtype == torch.float32
    # what stage 3 does on a CPU under bf16-mixed (fp16 weights failed in group_norm: mixed dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = Reconstructor(pipe).encode_images(torch.full((2, 3, 16, 16), 128, dtype=torch.uint8))
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()


def run_sbatch_script(tmp_path, **slurm_env) -> list[str]:
    """scripts/slurm/train.sbatch run as SLURM would run it, with a fake `srun` that records its arguments."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train.sbatch"
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/srun_args\n')
    (bin_dir / "srun").chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2", **slurm_env}
    proc = subprocess.run(["bash", str(script), "stages/cluster/align.yaml", "--trainer.max_steps", "5"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert not any("--cpus-per-task" in line or "--cpus-per-gpu" in line for line in header)  # no fixed CPU count
    return (tmp_path / "srun_args").read_text().split()


def test_slurm_script_gives_each_task_its_share_of_the_nodes_cpus(tmp_path):
    args = run_sbatch_script(tmp_path / "a", SLURM_CPUS_ON_NODE="64", SLURM_NTASKS_PER_NODE="8")
    assert args[:2] == ["--cpus-per-task", "8"]                        # 64-core node: 8 per task, not 10
    assert args[args.index("--data.num_workers") + 1] == "6"
    assert args[args.index("--trainer.num_nodes") + 1] == "2" and args[-2:] == ["--trainer.max_steps", "5"]
    args = run_sbatch_script(tmp_path / "b", SLURM_CPUS_ON_NODE="128", SLURM_NTASKS_PER_NODE="8",
                             SLURM_CPUS_PER_TASK="5")                  # sbatch --cpus-per-task 5
    assert args[:2] == ["--cpus-per-task", "5"] and args[args.index("--data.num_workers") + 1] == "3"


# -- checkpoints: frozen tensors out, one `last` ----------------------------------------------------

def test_checkpoints_leave_out_every_parameter_nothing_trains_and_load_back(tmp_path):
    """Phase 2 freezes the Q-Former's text side (embeddings, text FFN, ITC/ITM/ITG heads): with BERT-base
    that was most of a 1.6 GB checkpoint. Those tensors come back from the init export on load."""
    from conftest import make_tiny_dataset

    from mindsemantix.data.datamodule import BrainDataModule
    from mindsemantix.models.brain_encoder import BrainEncoder, BrainEncoderConfig
    from helpers import save_tiny_wordpiece_tokenizer
    from mindsemantix.stages.align import BrainAlign

    dm = BrainDataModule(str(make_tiny_dataset(tmp_path / "data")), batch_size=4)
    dm.setup()
    encoder = BrainEncoder(BrainEncoderConfig.preset("tiny"), with_decoder=False)
    for subject, info in dm.subject_info().items():
        encoder.add_subject(subject, info.coords_mm)
    encoder.save_pretrained(tmp_path / "stage1")
    tokenizer = save_tiny_wordpiece_tokenizer(tmp_path / "wordpiece", words=["image", "caption"])
    qformer = dict(num_queries=4, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, embed_dim=16,
                   max_text_length=12, tokenizer=str(tokenizer))
    BrainAlign(brain_encoder=str(tmp_path / "stage1"), qformer=qformer).save_export(tmp_path / "phase1")

    def phase2():
        torch.manual_seed(0)
        return BrainAlign(init_from=str(tmp_path / "phase1"), phase="generative", llm="random:tiny")

    model = phase2()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("captioner.qformer.text_embeddings.") for n in frozen)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)                                              # "trained"
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    state = checkpoint["state_dict"]
    assert not frozen & set(state), sorted(frozen & set(state))[:3]
    assert any(k.startswith("captioner.qformer.") for k in state)                # the trained query path stays
    resumed = phase2()
    resumed.load_state_dict(state)                                      # strict: only frozen keys absent
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, msg=name)


def test_a_preempted_and_resumed_run_keeps_one_last_checkpoint(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import make_tiny_dataset

    root = Path(__file__).resolve().parents[1]
    data = make_tiny_dataset(tmp_path / "data")
    (tmp_path / "tiny.yaml").write_text(
        "trainer: {precision: 32-true, max_steps: 6, val_check_interval: 3, check_val_every_n_epoch: null,\n"
        "  enable_progress_bar: false, callbacks: [{class_path: lightning.pytorch.callbacks.ModelCheckpoint,\n"
        "  init_args: {save_last: true, every_n_train_steps: 3, save_top_k: 2, monitor: val/loss}}]}\n"
        "model: {init_args: {preset: tiny, encoder: null, warmup_steps: 1}}\ndata: {batch_size: 8, num_workers: 0}\n")

    def fit(*extra):
        cmd = [sys.executable, "-m", "mindsemantix.cli", "fit", "--config", str(root / "stages/pretrain.yaml"),
               "--config", str(tmp_path / "tiny.yaml"), f"--data.datasets=[{data}]",
               f"--trainer.default_root_dir={tmp_path / 'run'}", *extra]
        env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    # SIGTERM after step 1: the preemption writes last.ckpt before ModelCheckpoint ever saved one
    assert "preemption: received SIGTERM at step 1" in fit("--trainer.callbacks+=probe_callbacks.KillAtStep",
                                                           "--trainer.callbacks.step=1",
                                                           "--trainer.callbacks.signal_name=SIGTERM")
    fit("--ckpt_path=last")
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert [n for n in names if n.startswith("last")] == ["last.ckpt"], names


# -- dependencies ------------------------------------------------------------------------------------

def test_a_sentencepiece_only_llama_tokenizer_loads(tmp_path):
    """Vicuna / Llama-2 ship `tokenizer.model` only: transformers converts it with sentencepiece and
    protobuf (without them: "Error parsing line ... tokenizer.model")."""
    from cluster_standins import make_llama

    from mindsemantix.models.pretrained import load_causal_lm

    model, tokenizer = load_causal_lm(str(make_llama(tmp_path / "vicuna")), dtype=torch.bfloat16)
    assert not (tmp_path / "vicuna" / "tokenizer.json").exists()
    ids = tokenizer("image 3 caption 1")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "image 3 caption 1"
    assert model.dtype == torch.bfloat16


def run_setup_with_torch(tmp_path, version: str):
    """scripts/setup_env.sh on a venv whose torch reports `version` (pip calls are no-ops)."""
    import subprocess
    import sys
    from pathlib import Path

    fake = tmp_path / "site"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/bash\n[ "$1 $2" = "-m pip" ] && exit 0\n'
                                         f'PYTHONPATH={fake} exec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["bash", str(root / "scripts" / "setup_env.sh")], cwd=root, env={"VENV": str(venv), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)


def test_setup_refuses_a_torch_older_than_transformers_needs(tmp_path):
    old = run_setup_with_torch(tmp_path / "old", "2.5.1+cu121")
    assert old.returncode == 1 and "needs torch >= 2.6" in old.stderr and "keeping" not in old.stdout
    recent = run_setup_with_torch(tmp_path / "recent", "2.7.0+cu126")
    assert "keeping installed torch 2.7.0+cu126" in recent.stdout       # a user's CUDA build stays
