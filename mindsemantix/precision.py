"""Whether bf16 autocast pays on this machine, per kind of work, decided by a measurement.

A CPU flag does not say it. On a 2-core AMD EPYC (Zen 4: AVX512-BF16, no AMX) bf16 matrix
products run ~2x faster than fp32, but the toy SD's UNet training step ran 1.7x slower in bf16:
its convolutions gain a little, while the CPU's fused attention kernel in bf16 loses ~4x
(docs/performance.md). With AMX both pay; on AVX2-only CPUs bf16 is emulated and neither does. So
a small probe times forward + backward, in fp32 and under bf16 autocast, of

  * "matmul": a 1024 x 1024 matrix product (transformer / LLM parts: stages 1-2, the stage-3 head);
  * "conv":   a toy-SD UNet block as diffusers runs it (GroupNorm-SiLU-conv3x3 twice, then spatial
              self-attention through scaled_dot_product_attention) at the toy SD's shapes: the
              convolutional networks' kind of work (toy SD training, VAE encoding, SD sampling);

and bf16 counts as fast for a kind when it is at least `MIN_SPEEDUP` x faster. The probe takes
~0.2 s; its result is cached per machine (CPU model and flags), torch version and thread count in
`$XDG_CACHE_HOME/mindsemantix/bf16_probe.json` (default `~/.cache/...`), so it runs once.
`MINDSEMANTIX_BF16=1 / 0` overrides it for every kind. GPUs: bf16 pays where CUDA supports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

KINDS = ("matmul", "conv")
BF16_ENV = "MINDSEMANTIX_BF16"
MIN_SPEEDUP = 1.1          # bf16 must beat fp32 by 10%: below that the rounding is not worth it
CACHE_NAME = "bf16_probe.json"
_memo: dict[str, dict] = {}   # machine key -> probe result, for this process


def bf16_override() -> bool | None:
    """MINDSEMANTIX_BF16=1 / 0 forces bf16 autocast on / off wherever the precision is automatic
    (`trainer.precision: null`, the toy SD recipe, stage 3's SD parts): 0 reproduces fp32 results
    on bf16 hardware, 1 checks the bf16 path on hardware that emulates it. Unset or `auto`: measured."""
    value = os.environ.get(BF16_ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "on"):
        return True
    if value in ("0", "false", "off"):
        return False
    raise ValueError(f"{BF16_ENV}={value!r}: use 1, 0 or auto")


def cpu_description() -> tuple[str, str]:
    """(model name, flags) from /proc/cpuinfo; ("unknown", "") where it cannot be read."""
    import platform

    model, flags = platform.processor() or platform.machine() or "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model != value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return model, flags


def machine_key() -> str:
    """What the probe's answer depends on: CPU model and flags, torch version, thread count."""
    import torch

    model, flags = cpu_description()
    text = f"{model}|{' '.join(sorted(flags.split()))}|torch {torch.__version__}|threads {torch.get_num_threads()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mindsemantix" / CACHE_NAME


def _best_seconds(fn: Callable[[], None], reps: int = 5, budget_s: float = 0.15) -> float:
    """Fastest time of `fn` after one warm-up call: the least disturbed by other processes (the
    answer is cached, so one busy moment must not decide it). Stops early once `budget_s` is spent
    (an emulated bf16 path can be 30x slower: a couple of calls already tell)."""
    fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < reps and (spent < budget_s or not times):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return min(times)


def _unet_block(g):
    """A toy-SD UNet block as diffusers runs it: GroupNorm-SiLU-conv3x3 twice, a residual, then
    spatial self-attention through scaled_dot_product_attention; (B, C, 8, 8), C = 32, one head."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(32, 32, 8, 8, generator=g, requires_grad=True)
    conv1, conv2, qkv = ((0.05 * torch.randn(*shape, generator=g)).requires_grad_()
                         for shape in ((32, 32, 3, 3), (32, 32, 3, 3), (96, 32)))

    def run() -> None:
        h = F.conv2d(F.silu(F.group_norm(x, 8)), conv1, padding=1)
        h = x + F.conv2d(F.silu(F.group_norm(h, 8)), conv2, padding=1)            # (B, C, 8, 8)
        tokens = h.flatten(2).transpose(1, 2)                                     # (B, 64, C)
        q, k, v = (tokens @ qkv.t()).unsqueeze(1).chunk(3, dim=-1)               # (B, 1, 64, C) each
        F.scaled_dot_product_attention(q, k, v).float().sum().backward()
    return run


def measure() -> dict[str, dict[str, float]]:
    """Time each kind in fp32 and under bf16 autocast on the CPU: {kind: {fp32_s, bf16_s, speedup}}."""
    import torch

    g = torch.Generator().manual_seed(0)

    def matmul(n: int):
        a = torch.randn(n, n, generator=g, requires_grad=True)
        b = torch.randn(n, n, generator=g)
        return lambda: (a @ b).float().sum().backward()

    def timed(fn) -> dict[str, float]:
        seconds = {}
        for name, enabled in (("fp32", False), ("bf16", True)):
            def run(enabled=enabled) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                    fn()
            seconds[name] = _best_seconds(run)
        return {"fp32_s": seconds["fp32"], "bf16_s": seconds["bf16"], "speedup": seconds["fp32"] / seconds["bf16"]}

    # A 256^3 product first: where bf16 is emulated (~30x slower) it already tells, in milliseconds;
    # elsewhere the 1024^3 one decides (at 512^3 two threads gave speedups from 1.2 to 1.8 in one minute).
    quick = timed(matmul(256))
    result = {"matmul": quick if quick["speedup"] < 0.5 else timed(matmul(1024)), "conv": timed(_unet_block(g))}
    return result


def probe() -> dict[str, dict[str, float]]:
    """The CPU probe's result for this machine: from the cache when it has one, else measured and cached."""
    key = machine_key()
    if key in _memo:
        return _memo[key]
    path = cache_file()
    cached: dict = {}
    try:
        cached = json.loads(path.read_text())
        found = cached.get(key, {}).get("results")
        if isinstance(found, dict) and all(isinstance(found.get(k), dict) and "speedup" in found[k] for k in KINDS):
            _memo[key] = found
            return found
    except (OSError, ValueError, AttributeError):
        cached = {}
    import torch

    from mindsemantix.io import write_json_atomic

    results = measure()
    model, _ = cpu_description()
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = {"cpu": model, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}
    try:
        write_json_atomic(path, cached)
    except OSError:  # a read-only home: measure again next time
        pass
    _memo[key] = results
    return results


def bf16_is_fast(device_type: str, kind: str = "matmul") -> bool:
    """Whether bf16 autocast pays for `kind` of work ("matmul" or "conv") on `device_type`
    ("cuda" / "cpu"): GPUs with bf16 support; on CPUs the cached probe; MINDSEMANTIX_BF16 overrides."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    forced = bf16_override()
    if forced is not None:
        return forced
    if device_type == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and probe()[kind]["speedup"] >= MIN_SPEEDUP


def auto_precision(accelerator: str | None = "auto", kind: str = "matmul") -> str:
    """`trainer.precision: null` in a config means: bf16-mixed where bf16 pays for the stage's
    `kind` of work (`bf16_is_fast`) on the device the run gets, else 32-true."""
    import torch

    wants_gpu = accelerator in (None, "auto", "gpu", "cuda")
    device_type = "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"
    return "bf16-mixed" if bf16_is_fast(device_type, kind) else "32-true"


def precision_name(device_type: str, kind: str) -> str:
    """"bf16" or "fp32": what automatic precision gives `kind` of work here (for records)."""
    return "bf16" if bf16_is_fast(device_type, kind) else "fp32"


def fp32_unless_fast(device_type: str, kind: str = "conv"):
    """A context that switches autocast off around `kind` of work (e.g. Stable Diffusion inside a
    bf16-mixed stage) where bf16 does not pay for it; a no-op where it does or autocast is off.
    Inputs computed under autocast may be bf16: the wrapped code must cast them (diffusers does)."""
    import torch

    if torch.is_autocast_enabled(device_type) and not bf16_is_fast(device_type, kind):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
