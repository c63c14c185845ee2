"""Training-step speed of the stage-1 brain encoder, against MinD-Vis's MAE on the same shapes.

One step = forward + backward + AdamW step (MinD-Vis's lr, betas, weight decay). Reports the median
of `--steps` timed steps after `--warmup` untimed ones, in fp32 and under bf16 autocast, for the
configurations whose MinD-Vis numbers are in docs/stage1.md, "Training speed against MinD-Vis"
(the MEASURED column: another machine, so only a rough anchor), and beside ours, in the same run,
`MindVisShapedMAE`: the compute graph of MinD-Vis's `MAEforFMRI` (timm blocks, fused attention).
Every model of a row is timed interleaved with the others (A B C, C B A, ...), so the same-run
ratio is the fair one. Our variants (`--variants`): the encoder with `distance_bias` off / on (the
demo's), with the MAE decoder (`self`) or the CrossMAE one (`cross`), and `sdpa` = the attention
before this benchmark's changes (torch's fused kernel also in bf16 on a CPU). The run also measures
this machine's fp32 and bf16 matrix-product peaks (2048^3, median of 5) before and after, and
reports each model's achieved GFLOP/s (of the FLOPs it actually executes) as % of them.
Results go to bench_results/brain_encoder.json, one entry per device type, keyed by
config/precision/model so partial reruns update in place.

    python benchmarks/bench_brain_encoder.py                      # CPU, all configs, 2 threads
    nice -n 5 python benchmarks/bench_brain_encoder.py --configs 8k,mindvis --precisions fp32
    python benchmarks/bench_brain_encoder.py --device cuda        # GPU: bf16 attention is a fused flash kernel

bf16 on a CPU without AVX512-BF16/AMX runs matmuls through a slow fallback (docs/stage2.md,
"CPU notes"), so CPU bf16 is skipped there unless --force-bf16. Shapes whose MinD-Vis head count is not
recorded use 64-wide encoder heads; MinD-Vis carries one extra (cls) token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mindsemantix.io import write_json_atomic
from mindsemantix.models.brain_encoder import Block, BrainEncoder, BrainEncoderConfig

# name: (voxels, batch, encoder (width, depth, heads), decoder (width, depth, heads), mlp ratio,
#        MinD-Vis samples/s fp32, bf16 as measured with its own code: docs/stage1.md)
CONFIGS = {
    "small": (2048, 32, (256, 4, 4), (128, 2, 4), 4.0, 131.0, 129.0),
    "8k": (8192, 32, (768, 12, 12), (512, 4, 16), 4.0, 1.24, 3.78),
    "mindvis": (4656, 16, (1024, 24, 16), (512, 8, 16), 1.0, 1.86, 3.94),
}
# Our variants: name -> BrainEncoderConfig overrides.
VARIANTS = {
    "ours": {},                                                   # distance_bias off, MAE decoder
    "ours-dist": {"distance_bias": True},                         # as the demo trains it
    "ours-cross": {"decoder_attention": "cross"},
    "ours-cross-dist": {"decoder_attention": "cross", "distance_bias": True},
    "ours-sdpa": {"attention_impl": "sdpa"},                      # the attention before (fused kernel in bf16 too)
    "ours-sdpa-dist": {"attention_impl": "sdpa", "distance_bias": True},
}
REFERENCE = "mindvis-shape"


def matmul_peaks(device: torch.device, n: int = 2048, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of an n^3 matrix product in fp32 and bf16 on this device now (median of `reps`)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        a @ b
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - t0)
        peaks[name] = 2 * n**3 / statistics.median(times) / 1e9
    return peaks


class MindVisShapedMAE(nn.Module):
    """The compute graph of MinD-Vis's `MAEforFMRI`, for a same-machine, same-time baseline.

    Conv1d patch embedding over voxels in index order, a cls token, fixed 1-D positions, timm's
    ViT block (pre-norm, fused qkv, scaled_dot_product_attention, GELU MLP: the same arithmetic as
    our `Block` with impl="sdpa"), mask tokens restored by gather, a shared Linear prediction, MSE on masked patches.
    Speed comparison only; the position values are random, not sin-cos.
    """

    def __init__(self, n_voxels, patch, width, depth, heads, mlp, dec_width, dec_depth, dec_heads):
        super().__init__()
        n = n_voxels // patch
        self.patch = patch
        self.patch_embed = nn.Conv1d(1, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.register_buffer("pos", 0.02 * torch.randn(1, n + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp, 1e-6, impl="sdpa") for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_embed = nn.Linear(width, dec_width)
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, dec_width))
        self.register_buffer("decoder_pos", 0.02 * torch.randn(1, n + 1, dec_width))
        self.decoder_blocks = nn.ModuleList(Block(dec_width, dec_heads, mlp, 1e-6, impl="sdpa") for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_width, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_width, patch)

    def forward(self, fmri: torch.Tensor, mask_ratio: float = 0.75) -> torch.Tensor:
        B = fmri.shape[0]
        x = self.patch_embed(fmri[:, None]).transpose(1, 2) + self.pos[:, 1:]          # (B, N, D)
        N, D = x.shape[1], x.shape[2]
        keep = int(N * (1 - mask_ratio))
        ids_shuffle = torch.rand(B, N, device=fmri.device).argsort(1)
        ids_restore = ids_shuffle.argsort(1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
        x = torch.cat([(self.cls_token + self.pos[:, :1]).expand(B, -1, -1).to(x.dtype), x], 1)
        for blk in self.blocks:
            x = blk(x)
        y = self.decoder_embed(self.norm(x))                                             # (B, 1+K, Dd)
        y_ = torch.cat([y[:, 1:], self.mask_token.to(y.dtype).expand(B, N - keep, -1)], 1)
        y_ = torch.gather(y_, 1, ids_restore[:, :, None].expand(-1, -1, y.shape[2]))
        y = torch.cat([y[:, :1], y_], 1) + self.decoder_pos
        for blk in self.decoder_blocks:
            y = blk(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:].float()                   # (B, N, P)
        mask = torch.ones(B, N, device=fmri.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        loss = ((pred - fmri[:, : N * self.patch].view(B, N, self.patch)) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()


def cpu_bf16_matmul_gflops(n: int = 256) -> float:
    """A quick probe: CPUs without AVX512-BF16/AMX run bf16 matmuls through a slow fallback."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    t0 = time.perf_counter()
    a @ b
    return 2 * n**3 / (time.perf_counter() - t0) / 1e9


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU flags that decide bf16 speed (avx2 / avx512 / bf16 / amx)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if f.startswith(("avx2", "avx512f", "avx512_bf16", "amx", "fma", "sve")))
    except OSError:
        pass
    return []


def roi_coords(n_voxels: int) -> np.ndarray:
    """(V, 3) mm coordinates of an ellipsoidal ROI on a 2 mm grid, C order, exactly V voxels."""
    r = 1.0
    while True:
        n = int(2 * r) + 3
        ijk = np.stack(np.nonzero(np.ones((n, n, n), bool)), axis=1).astype(np.float64)
        inside = (((ijk - (n - 1) / 2) / [r, 0.8 * r, 0.6 * r]) ** 2).sum(1) <= 1
        if inside.sum() >= n_voxels:
            return (ijk[inside][:n_voxels] * 2.0).astype(np.float32)
        r *= 1.1


def step_gflop(cfg: BrainEncoderConfig, n_voxels: int, batch: int) -> float:
    """Matrix-product GFLOP one training step executes (forward x 3 for forward + backward)."""
    n_tok = -(-n_voxels // cfg.patch_size)
    keep = min(max(round(n_tok * (1 - cfg.mask_ratio)), 1), n_tok - 1)

    def blocks(width, depth, mlp_ratio, tokens):
        linear = 4 * width * width + 2 * width * int(width * mlp_ratio)
        return depth * (2 * linear * batch * tokens + 4 * batch * tokens * tokens * width)

    dec_mlp = cfg.mlp_ratio if cfg.decoder_mlp_ratio is None else cfg.decoder_mlp_ratio
    if cfg.decoder_attention == "cross":  # hidden tokens: q, out, MLP; visible: k, v; attention hidden x visible
        Dd, hidden = cfg.decoder_width, n_tok - keep
        linear = 2 * batch * (hidden * (2 * Dd * Dd + 2 * Dd * int(Dd * dec_mlp)) + keep * 2 * Dd * Dd)
        decoder = cfg.decoder_depth * (linear + 4 * batch * hidden * keep * Dd)
        head_tokens = hidden
    else:
        decoder, head_tokens = blocks(cfg.decoder_width, cfg.decoder_depth, dec_mlp, n_tok), n_tok
    fwd = (blocks(cfg.width, cfg.depth, cfg.mlp_ratio, keep)
           + decoder
           + 2 * batch * n_tok * (cfg.patch_size * cfg.subject_dim + cfg.subject_dim * cfg.width)   # tokenizer
           + 2 * batch * keep * cfg.width * cfg.decoder_width                                       # decoder embed
           + 2 * batch * head_tokens * (cfg.decoder_width * cfg.subject_dim + cfg.subject_dim * cfg.patch_size))  # head
    return 3 * fwd / 1e9


def build_step(name: str, model_kind: str, precision: str, device: torch.device, optimizer_impl: str):
    """One model of config `name` and a closure that runs and times one training step."""
    n_voxels, batch, (w, d, h), (dw, dd, dh), mlp, *_ = CONFIGS[name]
    cfg = BrainEncoderConfig(width=w, depth=d, heads=h, mlp_ratio=mlp, decoder_width=dw,
                             decoder_depth=dd, decoder_heads=dh, **VARIANTS.get(model_kind, {}))
    torch.manual_seed(0)
    if model_kind != REFERENCE:
        model = BrainEncoder(cfg)
        model.add_subject("subj", roi_coords(n_voxels))
        loss_fn = lambda x: model.forward_mae(x, "subj").loss
    else:
        model = MindVisShapedMAE(n_voxels, cfg.patch_size, w, d, h, mlp, dw, dd, dh)
        loss_fn = model
    model.to(device).train()
    kwargs = {"fused": True} if optimizer_impl == "fused" else {"foreach": optimizer_impl == "foreach"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2.5e-4,
                            betas=(0.9, 0.95), weight_decay=0.05, **kwargs)
    fmri = torch.randn(batch, n_voxels, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> float:
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(fmri)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    if model_kind == REFERENCE:  # its graph: our MAE decoder's FLOPs (plus one cls token, ignored)
        cfg = BrainEncoderConfig(width=w, depth=d, heads=h, mlp_ratio=mlp, decoder_width=dw, decoder_depth=dd,
                                 decoder_heads=dh)
    info = {"config": name, "model": model_kind, "settings": VARIANTS.get(model_kind, {}), "precision": precision,
            "voxels": n_voxels, "batch": batch,
            "encoder": f"{w}x{d} h{h}", "decoder": f"{dw}x{dd} h{dh}", "mlp_ratio": mlp,
            "n_params": sum(p.numel() for p in model.parameters()), "gflop_per_step": step_gflop(cfg, n_voxels, batch)}
    return step, info


def bench_models(name: str, kinds: list[str], precision: str, device: torch.device, steps: int, warmup: int,
                 optimizer_impl: str, peaks: dict[str, float]) -> dict[str, dict]:
    """Time the models' steps interleaved (A B C, C B A, ...), so that load from other processes on
    a shared machine falls on all models alike instead of on whichever ran during a busy minute."""
    runs = {}
    for kind in kinds:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        step, info = build_step(name, kind, precision, device, optimizer_impl)
        for _ in range(warmup):
            step()
        if device.type == "cuda":
            info["max_memory_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        runs[kind] = (step, info, [])
    for i in range(steps):
        for kind in (kinds if i % 2 == 0 else kinds[::-1]):
            runs[kind][2].append(runs[kind][0]())
    anchor = CONFIGS[name][5 if precision == "fp32" else 6]
    results = {}
    for kind, (_, info, times) in runs.items():
        median = statistics.median(times)
        results[kind] = r = {**info, "step_s_median": median, "step_s_all": times,
                             "samples_per_s": info["batch"] / median, "mindvis_samples_per_s": anchor,
                             "ratio_to_mindvis": info["batch"] / median / anchor,
                             "achieved_gflops": info["gflop_per_step"] / median}
        r["pct_of_matmul_peak_same_run"] = 100 * r["achieved_gflops"] / peaks[precision]
    if REFERENCE in results:
        for kind, r in results.items():
            if kind != REFERENCE:
                r["ratio_to_mindvis_shape_same_run"] = r["samples_per_s"] / results[REFERENCE]["samples_per_s"]
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the MEASURED column used 2)")
    ap.add_argument("--optimizer", default="fused", choices=["fused", "foreach", "loop"],
                    help="AdamW implementation (fused runs on CPU and CUDA in torch >= 2.4)")
    ap.add_argument("--variants", default="ours,ours-dist,ours-cross,ours-cross-dist,ours-sdpa,ours-sdpa-dist",
                    help=f"comma list of our variants, from {list(VARIANTS)}")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the same-run MinD-Vis-shaped baseline (MindVisShapedMAE)")
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 on CPUs without fast bf16 matmuls")
    ap.add_argument("--note", default="", help="e.g. whether the machine was shared")
    ap.add_argument("--out", default="bench_results/brain_encoder.json")
    args = ap.parse_args(argv)
    if args.steps < 5:
        ap.error("--steps must be >= 5 (median of at least 5 steps)")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32 here

    load_before = os.getloadavg()
    bf16_probe = cpu_bf16_matmul_gflops() if device.type == "cpu" else None
    slow_bf16 = bf16_probe is not None and bf16_probe < 50 and not args.force_bf16
    peaks = matmul_peaks(device, n=2048 if not slow_bf16 else 512)
    print(f"matmul peaks now (2048^3, median of 5): fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True)
    out = Path(args.out)
    device_info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "cpu_flags": cpu_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_matmul_gflops": bf16_probe, "matmul_peak_gflops_at_start": peaks,
        "torch": torch.__version__, "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
    }

    def record(kind: str, key: str, value: dict) -> None:
        """Merge one result into the JSON file now, so a long run that is stopped keeps its rows."""
        run = {"threads": args.threads, "optimizer": f"AdamW ({args.optimizer})", "steps": args.steps,
               "matmul_peak_gflops": peaks,
               "warmup": args.warmup, "load_avg_at_start": load_before, "load_avg_at_end": os.getloadavg(),
               "note": args.note, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        data = {}
        if out.is_file():
            try:
                data = json.loads(out.read_text())
            except ValueError:
                data = {}
        data.setdefault("benchmark", "brain encoder MAE training step (forward + backward + AdamW) vs MinD-Vis")
        entry = data.setdefault("runs", {}).setdefault(device.type, {})
        entry.update(device_info)
        entry.setdefault(kind, {})[key] = {**value, **run}   # keyed: partial reruns update in place
        write_json_atomic(out, data)

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    models = variants if args.no_reference else [REFERENCE, *variants]
    print(f"{'config':8} {'prec':5} {'model':16} {'samples/s':>9} {'vs ref':>7} {'GFLOP/s':>8} {'% peak':>6} "
          f"{'MEASURED':>9}", flush=True)
    for name in args.configs.split(","):
        if name not in CONFIGS:
            ap.error(f"unknown config {name!r}; choose from {list(CONFIGS)}")
        for precision in args.precisions.split(","):
            if precision not in ("fp32", "bf16"):
                ap.error(f"unknown precision {precision!r}")
            if precision == "bf16" and slow_bf16:
                why = (f"bf16 matmul runs at {bf16_probe:.1f} GFLOP/s on this CPU (capability "
                       f"{torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16/AMX): a step would take hours")
                record("skipped", f"{name}/{precision}", {"config": name, "precision": precision, "reason": why})
                print(f"{name:8} {precision:5} skipped: {why}", flush=True)
                continue
            row = bench_models(name, models, precision, device, args.steps, args.warmup, args.optimizer, peaks)
            for m, r in row.items():
                record("results", f"{name}/{precision}/{m}", r)
                print(f"{name:8} {precision:5} {m:16} {r['samples_per_s']:>9.2f} "
                      f"{r.get('ratio_to_mindvis_shape_same_run', 1.0):>7.2f} {r['achieved_gflops']:>8.0f} "
                      f"{r['pct_of_matmul_peak_same_run']:>6.0f} {r['mindvis_samples_per_s']:>9.2f}", flush=True)
    peaks_end = matmul_peaks(device, n=2048 if not slow_bf16 else 512)
    record("peaks", "end", {"matmul_peak_gflops_at_end": peaks_end})
    print(f"matmul peaks at the end: fp32 {peaks_end['fp32']:.0f}, bf16 {peaks_end['bf16']:.0f} GFLOP/s")
    print(f"wrote {out} (1-min load average at start/end: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
