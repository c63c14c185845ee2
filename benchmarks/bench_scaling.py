"""Scaling table (docs/performance.md): how cost grows towards NSD scale, measured on this machine.

  1. stage-1 training step (forward + backward + AdamW) vs voxel count (2k, 8k, 15k: NSD's
     nsdgeneral ROI is ~15k voxels) at the `base` preset, and vs the presets at 8k voxels, MAE
     (`self`) and CrossMAE (`cross`) decoders, `distance_bias` on (as the demo trains);
  2. the data loader's samples/s (shards on disk -> batches, 15k voxels) vs what stage 1 consumes;
  3. caption generation with the KV cache: a batch at once vs one sample at a time, and vs beams;
  4. stage-1 training memory (weights + gradients + AdamW state + the activations autograd keeps,
     counted exactly with saved-tensor hooks) at 2k / 4k / 8k voxels, projected to 15k by a fit of
     a + b V + c V^2 (attention is quadratic in tokens): a projection, not a measurement.

Precision: the automatic one (mindsemantix/precision.py: bf16 autocast where matmuls pay). Each
number is the median of a few repetitions after a warm-up; the whole file runs in a few minutes on
2 cores. Results: bench_results/scaling.json with the CPU, its flags, torch and the matmul peaks.

    python benchmarks/bench_scaling.py [--threads 2] [--parts stage1,loader,captions,memory]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_brain_encoder import cpu_flags, cpu_name, matmul_peaks, roi_coords  # noqa: E402

from mindsemantix.io import write_json_atomic  # noqa: E402
from mindsemantix.models.brain_encoder import BrainEncoder, BrainEncoderConfig  # noqa: E402
from mindsemantix.precision import bf16_is_fast  # noqa: E402

NSD_VOXELS = 15000


def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def encoder(preset: str, voxels: int, **overrides) -> BrainEncoder:
    torch.manual_seed(0)
    model = BrainEncoder(BrainEncoderConfig.preset(preset, distance_bias=True, **overrides))
    model.add_subject("s", roi_coords(voxels))
    return model


def stage1_step(model: BrainEncoder, batch: int, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    x = torch.randn(batch, model.tokenizers["s"].n_voxels)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.forward_mae(x, "s").loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_stage1(bf16: bool, batch: int, reps: int) -> list[dict]:
    """Per shape, the two decoders' steps timed interleaved (self cross, cross self, ...)."""
    rows = []
    shapes = [("base", v) for v in (2048, 8192, NSD_VOXELS)] + [("tiny", 8192), ("large", 8192)]
    for preset, voxels in shapes:
        models = {d: encoder(preset, voxels, decoder_attention=d) for d in ("self", "cross")}
        steps = {d: stage1_step(m, batch, bf16) for d, m in models.items()}
        times: dict[str, list[float]] = {d: [] for d in steps}
        for step in steps.values():
            step()                                              # warm-up
        for i in range(reps):
            for d in (("self", "cross") if i % 2 == 0 else ("cross", "self")):
                t0 = time.perf_counter()
                steps[d]()
                times[d].append(time.perf_counter() - t0)
        for decoder, ts in times.items():
            seconds = statistics.median(ts)
            rows.append({"preset": preset, "voxels": voxels, "tokens": models[decoder].n_tokens("s"),
                         "decoder": decoder, "batch": batch, "step_s": seconds, "samples_per_s": batch / seconds})
            print(f"stage 1  {preset:5} {voxels:>6} voxels  {decoder:5} decoder  {seconds:7.3f} s/step  "
                  f"{batch / seconds:7.1f} samples/s", flush=True)
    return rows


def write_shards(root: Path, voxels: int, n_train: int, reps: int = 3) -> Path:
    """A synthetic study of one subject (random values; a C-order box ROI of `voxels` voxels)."""
    import nibabel as nib

    from mindsemantix.data.shards import ShardWriter

    side = int(np.ceil(voxels ** (1 / 3))) + 1
    mask = np.full((side, side, side), -1, np.int16)
    mask.reshape(-1)[:voxels] = 1
    rng = np.random.default_rng(0)
    with ShardWriter(root, dataset="bench", samples_per_shard=64) as w:
        w.add_subject("subj01", nib.Nifti1Image(mask, np.diag([2.0, 2.0, 2.0, 1.0])))
        for i in range(n_train + 8):
            split = "train" if i < n_train else "val"
            w.write(split, f"subj01-{i:06d}", rng.standard_normal((reps, voxels)).astype(np.float32),
                    {"subject": "subj01", "image_id": i, "trials": list(range(i * reps + 1, i * reps + reps + 1))})
    return root


def bench_loader(stage1: list[dict], batch: int) -> list[dict]:
    from mindsemantix.data.datamodule import BrainDataModule

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_shards(Path(tmp) / "shards", NSD_VOXELS, n_train=256)
        for workers in (0, 1):
            for repetition in ("random", "mean"):
                dm = BrainDataModule(str(root), batch_size=batch, num_workers=workers, train_repetition=repetition)
                dm.setup("fit")
                t0, n = time.perf_counter(), 0
                for b in dm.train_dataloader():
                    n += len(b["key"])
                seconds = time.perf_counter() - t0
                rows.append({"voxels": NSD_VOXELS, "batch": batch, "num_workers": workers,
                             "train_repetition": repetition, "samples": n, "samples_per_s": n / seconds})
                print(f"loader   {NSD_VOXELS} voxels  workers {workers}  repetition {repetition:6}  "
                      f"{n / seconds:8.0f} samples/s (first epoch, start-up included)", flush=True)
    consumed = {f"{r['preset']}/{r['decoder']}": r["samples_per_s"] for r in stage1
                if r["voxels"] == NSD_VOXELS}
    slowest_loader = min(r["samples_per_s"] for r in rows)
    for name, rate in consumed.items():
        print(f"loader / stage-1 consumption ({name}, {NSD_VOXELS} voxels): {slowest_loader / rate:.0f}x", flush=True)
    return rows


def bench_captions(bf16: bool, batch: int, reps: int) -> dict:
    from mindsemantix.models.llm_bridge import LLMBridge
    from mindsemantix.models.pretrained import load_causal_lm

    llm, tokenizer = load_causal_lm()
    torch.manual_seed(0)
    bridge = LLMBridge(llm, tokenizer, query_width=256, prompt="A photo of").eval()
    query_out = torch.randn(batch, 32, 256)
    fixed = {"max_new_tokens": 20, "min_new_tokens": 20}   # every caption as long: equal work

    def run(q, **kw):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return bridge.generate(q, **fixed, **kw)

    batched = median_time(lambda: run(query_out), reps)
    loop = median_time(lambda: [run(query_out[i:i + 1]) for i in range(batch)], 1, warmup=0)
    no_cache = median_time(lambda: run(query_out, use_cache=False), 1, warmup=0)
    beams = {k: median_time(lambda k=k: run(query_out, num_beams=k), 1, warmup=0) for k in (1, 3, 5)}
    result = {"batch": batch, "new_tokens": 20, "batched_s": batched, "one_at_a_time_s": loop,
              "batched_without_kv_cache_s": no_cache, "speedup_batched_vs_loop": loop / batched,
              "beams_s": beams, "llm": "offline:smollm2-135m-instruct"}
    print(f"captions {batch} samples x 20 tokens: batched {batched:.2f} s, one at a time {loop:.2f} s "
          f"({loop / batched:.1f}x), batched without KV cache {no_cache:.2f} s; beams "
          + ", ".join(f"{k}: {s:.2f} s" for k, s in beams.items()), flush=True)
    return result


def training_bytes(model: BrainEncoder, batch: int, bf16: bool) -> dict:
    """Weights + grads + AdamW m, v (fp32: 16 bytes a parameter) + the activations autograd saves."""
    saved = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        nonlocal saved
        key = t.untyped_storage().data_ptr()
        if key not in seen:  # count each storage once (views share it)
            seen.add(key)
            saved += t.untyped_storage().nbytes()
        return t

    x = torch.randn(batch, model.tokenizers["s"].n_voxels)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.forward_mae(x, "s")
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "state_bytes": 16 * params, "activation_bytes": saved}


def bench_memory(bf16: bool, preset: str, batch: int) -> list[dict]:
    rows = []
    for decoder in ("self", "cross"):
        measured = []
        for voxels in (2048, 4096, 8192):
            m = training_bytes(encoder(preset, voxels, decoder_attention=decoder), batch, bf16)
            measured.append((voxels, m))
            rows.append({"preset": preset, "decoder": decoder, "voxels": voxels, "batch": batch, "kind": "measured",
                         **m, "total_gib": (m["state_bytes"] + m["activation_bytes"]) / 2**30})
        v = np.array([vx for vx, _ in measured], float)
        projected = {key: float(np.polyval(np.polyfit(v, [m[key] for _, m in measured], 2), NSD_VOXELS))
                     for key in ("state_bytes", "activation_bytes")}   # a quadratic through the 3 points
        rows.append({"preset": preset, "decoder": decoder, "voxels": NSD_VOXELS, "batch": batch,
                     "kind": "projected (quadratic through 2k/4k/8k)", **projected,
                     "total_gib": sum(projected.values()) / 2**30})
        for r in rows[-4:]:
            print(f"memory   stage 1 {preset} {decoder:5} {r['voxels']:>6} voxels  batch {batch}: "
                  f"{r['total_gib']:.2f} GiB ({r['kind']})", flush=True)
    return rows


def markdown(r: dict) -> str:
    """The tables of docs/performance.md, "Scaling", from one run's results."""
    lines = [f"{r['cpu']} ({' '.join(r['cpu_flags'])}), torch {r['torch']}, {r['threads']} threads, "
             f"{r['precision']} autocast; matmul peaks fp32 {r['matmul_peak_gflops']['fp32']:.0f} / bf16 "
             f"{r['matmul_peak_gflops']['bf16']:.0f} GFLOP/s; load average {r['load_avg_at_start'][0]:.1f} at start; "
             f"{r['time']}.", ""]
    if r.get("stage1"):
        lines += ["| stage 1 (distance_bias on) | voxels | tokens | batch | MAE decoder s/step | CrossMAE decoder s/step | ratio |",
                  "|---|---|---|---|---|---|---|"]
        by = {(x["preset"], x["voxels"], x["decoder"]): x for x in r["stage1"]}
        for (preset, voxels, decoder), x in by.items():
            if decoder == "self":
                c = by[(preset, voxels, "cross")]
                lines.append(f"| {preset} | {voxels} | {x['tokens']} | {x['batch']} | {x['step_s']:.3f} | "
                             f"{c['step_s']:.3f} | {x['step_s'] / c['step_s']:.2f}x |")
        lines.append("")
    if r.get("loader"):
        lines += ["| data loader (15k voxels, batch 32) | workers | repetition | samples/s |", "|---|---|---|---|"]
        lines += [f"| shards -> batches | {x['num_workers']} | {x['train_repetition']} | {x['samples_per_s']:.0f} |"
                  for x in r["loader"]]
        lines += [f"| stage 1 consumes ({x['preset']}, {x['decoder']}) | | | {x['samples_per_s']:.1f} |"
                  for x in r.get("stage1", []) if x["voxels"] == NSD_VOXELS]
        lines.append("")
    if r.get("captions"):
        c = r["captions"]
        lines += [f"| captions ({c['batch']} samples x {c['new_tokens']} tokens, {c['llm']}) | seconds |", "|---|---|",
                  f"| batched, KV cache | {c['batched_s']:.2f} |", f"| one sample at a time, KV cache | "
                  f"{c['one_at_a_time_s']:.2f} ({c['speedup_batched_vs_loop']:.1f}x the batched time) |",
                  f"| batched, no KV cache | {c['batched_without_kv_cache_s']:.2f} |"]
        lines += [f"| batched, {k} beam(s) | {v:.2f} |" for k, v in c["beams_s"].items()]
        lines.append("")
    if r.get("memory"):
        lines += ["| stage-1 training memory (large preset, batch 16) | decoder | voxels | weights+grads+AdamW GiB | "
                  "activations GiB | total GiB | |", "|---|---|---|---|---|---|---|"]
        lines += [f"| | {x['decoder']} | {x['voxels']} | {x['state_bytes'] / 2**30:.2f} | "
                  f"{x['activation_bytes'] / 2**30:.2f} | {x['total_gib']:.2f} | {x['kind']} |" for x in r["memory"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="stage1,loader,captions,memory")
    ap.add_argument("--batch", type=int, default=4, help="stage-1 batch (timing)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="bench_results/scaling.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    bf16 = bf16_is_fast("cpu", "matmul")
    peaks = matmul_peaks(torch.device("cpu"), n=2048 if bf16 else 512)
    result = {"benchmark": "scaling table (docs/performance.md)", "cpu": cpu_name(), "cpu_flags": cpu_flags(),
              "torch": torch.__version__, "threads": args.threads, "precision": "bf16" if bf16 else "fp32",
              "matmul_peak_gflops": peaks, "load_avg_at_start": os.getloadavg(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"{result['cpu']}, torch {torch.__version__}, {args.threads} threads, {result['precision']}; matmul "
          f"peaks fp32 {peaks['fp32']:.0f} / bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True)
    out = Path(args.out)
    stage1: list[dict] = []
    if "stage1" in parts:
        result["stage1"] = stage1 = bench_stage1(bf16, args.batch, args.reps)
        write_json_atomic(out, result)
    if "loader" in parts:
        result["loader"] = bench_loader(stage1, batch=32)
        write_json_atomic(out, result)
    if "captions" in parts:
        result["captions"] = bench_captions(bf16, batch=8, reps=args.reps)
        write_json_atomic(out, result)
    if "memory" in parts:
        result["memory"] = bench_memory(bf16, "large", batch=16)
    result["load_avg_at_end"] = os.getloadavg()
    write_json_atomic(out, result)
    table = out.with_suffix(".md")
    table.write_text(markdown(result))
    print(f"wrote {out} and {table} (the tables of docs/performance.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
