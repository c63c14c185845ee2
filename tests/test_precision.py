"""Automatic precision from a measurement (mindsemantix/precision.py), with faked probe results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mindsemantix import cli, demo, precision

ROOT = Path(__file__).resolve().parents[1]
# As measured on an AVX512-BF16 CPU without AMX: matrix products pay in bf16, the UNet block does not.
MATMUL_FAST_CONV_SLOW = {"matmul": {"fp32_s": 0.004, "bf16_s": 0.002, "speedup": 2.0},
                         "conv": {"fp32_s": 0.004, "bf16_s": 0.007, "speedup": 0.57}}


def toy_diffusion():
    spec = importlib.util.spec_from_file_location("toy_diffusion_p", ROOT / "data_recipes" / "toy_diffusion.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_probe(monkeypatch, tmp_path):
    """A fresh cache folder, no override, and `measure` faked and counted."""
    calls = []

    def measure():
        calls.append(1)
        return json.loads(json.dumps(MATMUL_FAST_CONV_SLOW))

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(precision.BF16_ENV, raising=False)
    monkeypatch.setattr(precision, "measure", measure)
    monkeypatch.setattr(precision, "_memo", {})
    return calls


def test_matmul_fast_conv_slow_gives_bf16_stages_and_an_fp32_toy_sd(fake_probe):
    assert cli.auto_precision("cpu") == "bf16-mixed"                  # stages' `precision: null`
    assert cli.bf16_is_fast("cpu") and not cli.bf16_is_fast("cpu", "conv")
    T = toy_diffusion()
    recipe = T.SCALES["tiny"]
    assert T.precision_used(recipe, torch.device("cpu")) == {"vae": "fp32", "text_pretrain": "bf16", "unet": "fp32"}
    with T._autocast(torch.device("cpu"), recipe.bf16):              # the VAE / UNet phases
        assert not torch.is_autocast_enabled("cpu")
    with T._autocast(torch.device("cpu"), recipe.bf16, "matmul"):    # the text-encoder pretraining
        assert torch.is_autocast_enabled("cpu")
    assert demo.step_precision("stage 1: pretrain") == {"trainer": "bf16"}
    assert demo.step_precision("train toy SD") == {"vae": "fp32", "text_pretrain": "bf16", "unet": "fp32"}


def test_sd_parts_run_in_fp32_inside_a_bf16_stage(fake_probe):
    """Stage 3 under bf16-mixed: the head stays bf16, the wrapped SD work runs without autocast."""
    w = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.ones(2, 8) @ w).dtype == torch.bfloat16
        with precision.fp32_unless_fast("cpu", "conv"):
            assert (torch.ones(2, 8) @ w).dtype == torch.float32
        with precision.fp32_unless_fast("cpu", "matmul"):
            assert (torch.ones(2, 8) @ w).dtype == torch.bfloat16


def test_the_environment_override_wins(fake_probe, monkeypatch):
    monkeypatch.setenv(precision.BF16_ENV, "0")
    assert cli.auto_precision("cpu") == "32-true" and not precision.bf16_is_fast("cpu", "matmul")
    monkeypatch.setenv(precision.BF16_ENV, "1")
    assert cli.auto_precision("cpu") == "bf16-mixed" and precision.bf16_is_fast("cpu", "conv")
    T = toy_diffusion()
    assert T.precision_used(T.SCALES["tiny"], torch.device("cpu")) == {"vae": "bf16", "text_pretrain": "bf16", "unet": "bf16"}
    assert fake_probe == []                                           # overridden: nothing measured
    monkeypatch.setenv(precision.BF16_ENV, "maybe")
    with pytest.raises(ValueError, match="MINDSEMANTIX_BF16='maybe'"):
        cli.auto_precision("cpu")


def test_the_probe_runs_once_per_machine_torch_and_thread_count(fake_probe, monkeypatch, tmp_path):
    precision.bf16_is_fast("cpu", "conv")
    cache = tmp_path / "cache" / "mindsemantix" / "bf16_probe.json"
    stored = json.loads(cache.read_text())
    assert [entry["results"] for entry in stored.values()] == [MATMUL_FAST_CONV_SLOW]
    monkeypatch.setattr(precision, "_memo", {})                      # a new process: reads the file
    assert cli.auto_precision("cpu") == "bf16-mixed" and not precision.bf16_is_fast("cpu", "conv")
    assert len(fake_probe) == 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)                          # another thread count: measured again
        precision.bf16_is_fast("cpu")
    finally:
        torch.set_num_threads(threads)
    assert len(fake_probe) == 2 and len(json.loads(cache.read_text())) == 2


def test_a_corrupt_cache_is_measured_again(fake_probe, tmp_path):
    cache = tmp_path / "cache" / "mindsemantix" / "bf16_probe.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    assert precision.bf16_is_fast("cpu") and len(fake_probe) == 1
    assert json.loads(cache.read_text())


def test_the_real_probe_is_quick_and_complete():
    result = precision.measure()
    assert set(result) == set(precision.KINDS)
    for kind in result.values():
        assert kind["fp32_s"] > 0 and kind["bf16_s"] > 0
        assert kind["speedup"] == pytest.approx(kind["fp32_s"] / kind["bf16_s"])


def test_the_demo_records_each_steps_precision(fake_probe, tmp_path):
    done = tmp_path / "s1" / "done"
    step = demo.Step("stage 1: pretrain", [sys.executable, "-c",
                                            f"import pathlib; p = pathlib.Path({str(done)!r}); "
                                            "p.parent.mkdir(parents=True); p.write_text('x')"], done)
    other = demo.Step("simulate study", [sys.executable, "-c", "pass"], tmp_path / "s1")  # exists: reused
    demo.run_steps([step], tmp_path / "demo_timings.json")
    assert list(json.loads((tmp_path / "demo_timings.json").read_text())) == ["stage 1: pretrain"]
    assert json.loads((tmp_path / "demo_precision.json").read_text()) == {"stage 1: pretrain": {"trainer": "bf16"}}
    assert demo.step_precision(other.name) == {"all": "fp32"}
