"""Stage-1 brain encoder (mindsemantix/models/brain_encoder.py): tiny models, a few seconds each."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mindsemantix.export import ExportError
from mindsemantix.models.brain_encoder import (
    BrainEncoder,
    BrainEncoderConfig,
    UnknownSubjectError,
    hilbert_index,
    hilbert_voxel_order,
)

P = 16


def blob_coords(radius_vox: float, spacing_mm: float = 2.0, offset_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """(V, 3) mm coordinates of an ellipsoidal ROI, in C order of the mask (like the datamodule)."""
    n = int(2 * radius_vox) + 3
    ijk = np.stack(np.nonzero(np.ones((n, n, n), bool)), axis=1).astype(np.float64)
    centre = (n - 1) / 2
    inside = (((ijk - centre) / [radius_vox, 0.8 * radius_vox, 0.6 * radius_vox]) ** 2).sum(1) <= 1
    return (ijk[inside] * spacing_mm + np.asarray(offset_mm)).astype(np.float32)


def structured_fmri(coords: np.ndarray, n: int, seed: int) -> torch.Tensor:
    """Low-rank, spatially smooth signal + a little noise: masked voxels are predictable."""
    g = torch.Generator().manual_seed(seed)
    c = torch.as_tensor(coords, dtype=torch.float32)
    freqs = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) / 8.0   # same maps across calls
    maps = torch.cat([torch.sin(c @ freqs.T), torch.cos(c @ freqs.T)], dim=1).T      # (8, V)
    x = torch.randn(n, 8, generator=g) @ maps + 0.1 * torch.randn(n, c.shape[0], generator=g)
    return (x - x.mean(0)) / x.std(0)


def tiny(**overrides) -> BrainEncoderConfig:
    return BrainEncoderConfig.preset("tiny", **overrides)


# -- voxel order ---------------------------------------------------------------------------------

def test_hilbert_curve_is_a_continuous_bijection():
    g = np.stack(np.nonzero(np.ones((8, 8, 8), bool)), axis=1)
    h = hilbert_index(g, bits=3)
    assert sorted(h.tolist()) == list(range(512))
    steps = np.abs(np.diff(g[np.argsort(h)], axis=0)).sum(1)
    assert (steps == 1).all()  # consecutive cells along the curve are face neighbours


def test_patches_are_spatial_neighbourhoods_not_index_runs():
    coords = blob_coords(10.0)                                    # C order, like nonzero of a mask

    def mean_patch_diameter(order):
        n = len(order) // P * P
        patches = coords[order[:n]].reshape(-1, P, 3)
        d = np.linalg.norm(patches[:, :, None] - patches[:, None], axis=-1)
        return d.max(axis=(1, 2)).mean()

    hilbert = mean_patch_diameter(hilbert_voxel_order(coords))
    c_order = mean_patch_diameter(np.arange(len(coords)))
    # ~4.2 voxels (a 2x2x4 block has 4.6); a C-order cut gives lines of ~9 voxels here.
    assert hilbert < 0.5 * c_order, (hilbert, c_order)
    assert hilbert < 5 * 2.0, hilbert


# -- shapes and masking --------------------------------------------------------------------------

@pytest.mark.parametrize("n_voxels", [1, 15, 16, 17, 333])
def test_shapes_for_different_voxel_counts(n_voxels):
    torch.manual_seed(0)
    model = BrainEncoder(tiny())
    model.add_subject("s", blob_coords(6.0)[:n_voxels])
    n_tokens = math.ceil(n_voxels / P)
    assert model.n_tokens("s") == n_tokens
    x = torch.randn(3, n_voxels)
    assert model.forward_features(x, "s").shape == (3, n_tokens, model.config.width)
    if n_tokens == 1:
        with pytest.raises(ValueError, match="at least 2 tokens"):
            model.forward_mae(x, "s")
        return
    out = model.forward_mae(x, "s")
    assert out.pred.shape == out.mask.shape == (3, n_voxels) and out.mask.dtype == torch.bool
    assert out.patch_mask.shape == (3, n_tokens)
    assert torch.isfinite(out.loss)


def test_one_encoder_serves_subjects_of_different_sizes():
    model = BrainEncoder(tiny())
    sizes = {"a": 100, "b": 257, "c": 64}
    for name, v in sizes.items():
        model.add_subject(name, blob_coords(6.0, offset_mm=(v, 0, 0))[:v])
    assert model.subjects == list(sizes)
    for name, v in sizes.items():
        assert model.forward_features(torch.randn(2, v), name).shape == (2, math.ceil(v / P), 64)


def test_actual_mask_ratio_and_encoder_sees_only_visible_tokens():
    torch.manual_seed(0)
    model = BrainEncoder(tiny())
    coords = blob_coords(6.0)[:330]                               # 21 tokens, last one padded
    model.add_subject("s", coords)
    n_tokens = model.n_tokens("s")
    seen = []
    model.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    for ratio in (0.75, 0.5):
        seen.clear()
        out = model.forward_mae(torch.randn(64, 330), "s", mask_ratio=ratio)
        n_keep = round(n_tokens * (1 - ratio))
        assert seen == [(64, n_keep, 64)]                         # encoder got visible tokens only
        assert (out.patch_mask.sum(1) == n_tokens - n_keep).all()
        # Voxel mask follows patches exactly: every patch wholly masked or wholly visible.
        voxel_patch = torch.argsort(model.tokenizers["s"].voxel_order) // P
        assert torch.equal(out.mask, out.patch_mask[:, voxel_patch])
        actual = out.mask.float().mean(1)                         # measured on the output
        assert (actual - ratio).abs().max() <= 1.0 / n_tokens + 1e-6
        assert abs(actual.mean().item() - ratio) < 0.03
        assert len({tuple(m.tolist()) for m in out.patch_mask}) > 50  # a fresh mask per sample


def test_loss_is_mse_on_masked_real_voxels_padding_excluded():
    torch.manual_seed(0)
    model = BrainEncoder(tiny())
    model.add_subject("s", blob_coords(6.0)[:330])              # 330 = 20 * 16 + 10: 6 padded slots
    x = torch.randn(32, 330)
    run = lambda: model.forward_mae(x, "s", generator=torch.Generator().manual_seed(1))
    out = run()
    assert out.patch_mask[:, -1].any()                          # the padded patch is masked somewhere
    manual = ((out.pred - x) ** 2)[out.mask].mean()
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-6)
    head_bias = model.decoder.heads["s"].bias
    with torch.no_grad():
        head_bias[-1, 10:] += 100.0                             # predictions for padded slots only
    assert run().loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    with torch.no_grad():
        head_bias[-1, :10] += 1.0                               # a real voxel of the same patch
    assert run().loss.item() > out.loss.item() + 1e-3


def test_loss_against_a_separate_target():
    torch.manual_seed(0)
    model = BrainEncoder(tiny())
    model.add_subject("s", blob_coords(6.0)[:330])
    x, y = torch.randn(8, 330), torch.randn(8, 330)
    run = lambda **kw: model.forward_mae(x, "s", generator=torch.Generator().manual_seed(1), **kw)
    own, crossed = run(), run(target=y)
    torch.testing.assert_close(crossed.pred, own.pred)                  # the input alone decides the prediction
    torch.testing.assert_close(crossed.loss, ((own.pred - y) ** 2)[own.mask].mean(), rtol=1e-5, atol=1e-6)
    assert abs(crossed.loss.item() - own.loss.item()) > 1e-2
    torch.testing.assert_close(run(target=x).loss, own.loss)
    with pytest.raises(ValueError, match="target must have fmri's shape"):
        run(target=y[:4])


def train_briefly(model: BrainEncoder, data: torch.Tensor, steps: int = 30) -> tuple[list[float], list[float]]:
    """MAE steps on subject "s"; per step the loss and the loss of predicting 0 (the data are
    z-scored: predicting the mean) at the masked voxels."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    losses, predict_zero = [], []
    for step in range(steps):
        batch = data[(step * 32) % len(data):][:32]
        out = model.forward_mae(batch, "s")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        predict_zero.append((batch[out.mask] ** 2).mean().item())
    return losses, predict_zero


def test_loss_falls_below_predicting_the_mean_on_a_tiny_run():
    torch.manual_seed(0)
    coords = blob_coords(6.0)
    model = BrainEncoder(tiny())
    model.add_subject("s", coords)
    losses, predict_zero = train_briefly(model, structured_fmri(coords, 256, seed=0))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    # Not just the per-voxel mean: masked voxels are inferred from the visible ones.
    assert np.mean(losses[-5:]) < 0.8 * np.mean(predict_zero[-5:]), (losses, predict_zero)


def test_bf16_autocast():
    torch.manual_seed(0)
    model = BrainEncoder(tiny())
    model.add_subject("s", blob_coords(5.0))
    x = torch.randn(8, model.tokenizers["s"].n_voxels)
    ref = model.forward_mae(x, "s", generator=torch.Generator().manual_seed(0)).loss
    ref_feats = model.forward_features(x, "s")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_mae(x, "s", generator=torch.Generator().manual_seed(0))
        feats = model.forward_features(x, "s")
    assert out.loss.dtype == torch.float32 and out.pred.dtype == torch.float32
    assert ((feats.float() - ref_feats).norm() / ref_feats.norm()).item() < 3e-2
    assert out.loss.item() == pytest.approx(ref.item(), rel=0.05)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- new subjects --------------------------------------------------------------------------------

def test_adding_a_subject_trains_only_its_layers():
    torch.manual_seed(0)
    model = BrainEncoder(tiny())
    for i, name in enumerate(["a", "b"]):
        model.add_subject(name, blob_coords(5.0 + i))
    coords_new = blob_coords(5.5, offset_mm=(3.0, -2.0, 1.0))
    assert model.add_subject("new", coords_new)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = model.freeze_except_subjects(["new"])
    assert {id(p) for p in trainable} == {id(p) for p in model.subject_parameters("new")}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    data = structured_fmri(coords_new, 64, seed=1)
    losses = []
    for step in range(25):
        loss = model.forward_mae(data[(step * 16) % 64:][:16], "new").loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = model.state_dict()
    new_keys = {k for k in after if k.startswith(("tokenizers.new.", "decoder.heads.new."))}
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    new_params = {k for k in new_keys if k.split(".")[-1] in ("weight", "bias", "embedding")}
    assert changed == new_params, (changed ^ new_params)
    assert np.mean(losses[-5:]) < np.mean(losses[:3])
    # The subject part is small: per-patch maps of width subject_dim, not of the model's width.
    n_subject = sum(p.numel() for p in model.subject_parameters("new"))
    tok = model.tokenizers["new"]
    r, N, D = model.config.subject_dim, tok.n_patches, model.config.width
    assert n_subject == N * P * r + N * r + D + N * r * P + N * P


def test_add_subject_is_idempotent_and_refuses_conflicts():
    model = BrainEncoder(tiny())
    coords = blob_coords(4.0)
    assert model.add_subject("s", coords) is True
    weight = model.tokenizers["s"].weight
    assert model.add_subject("s", torch.as_tensor(coords)) is False
    assert model.tokenizers["s"].weight is weight                 # not re-initialised
    with pytest.raises(ValueError, match="already exists"):
        model.add_subject("s", coords[:-1])
    with pytest.raises(ValueError, match="letters, digits"):
        model.add_subject("subj.01", coords)
    with pytest.raises(ValueError, match=r"\(V, 3\)"):
        model.add_subject("t", coords[:, :2])


def test_clear_errors_for_bad_input():
    model = BrainEncoder(tiny())
    model.add_subject("subj01", blob_coords(5.0)[:200])
    with pytest.raises(ValueError, match=r"'subj01' has 200 voxels but fmri has 199"):
        model.forward_features(torch.randn(2, 199), "subj01")
    with pytest.raises(UnknownSubjectError, match=r"unknown subject 'subj02'.*subj01"):
        model.forward_mae(torch.randn(2, 200), "subj02")
    bad = torch.randn(2, 200)
    bad[1, 7] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf"):
        model.forward_mae(bad, "subj01")
    with pytest.raises(ValueError, match=r"\(batch, voxels\)"):
        model.forward_features(torch.randn(200), "subj01")
    half = torch.randn(2, 200).half()                              # shards store float16
    assert torch.equal(model.forward_features(half, "subj01"), model.forward_features(half.float(), "subj01"))
    with pytest.raises(ValueError, match="mask_ratio"):
        model.forward_mae(torch.randn(2, 200), "subj01", mask_ratio=1.0)


# -- export --------------------------------------------------------------------------------------

def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BrainEncoder(tiny())
    model.add_subject("a", blob_coords(5.0))
    model.add_subject("b", blob_coords(5.0, spacing_mm=1.8)[:150])
    with torch.no_grad():                                          # make every weight non-default
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    # A voxel order other than the one add_subject computes (as if the ordering code changed
    # after export): the stored order must win, and derived indices must follow it.
    state = model.state_dict()
    state["tokenizers.a.voxel_order"] = state["tokenizers.a.voxel_order"].flip(0)
    model.load_state_dict(state)
    x = torch.randn(3, model.tokenizers["a"].n_voxels)
    assert torch.equal(model.tokenizers["a"].unpatchify(model.tokenizers["a"].patchify(x)), x)
    model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["kind"] == "brain_encoder" and cfg["has_decoder"] is True
    assert cfg["subjects"]["b"] == {"n_voxels": 150, "n_tokens": 10}

    loaded = BrainEncoder.from_pretrained(tmp_path / "export")
    assert loaded.config == model.config and loaded.subjects == ["a", "b"]
    for name in ("a", "b"):
        x = torch.randn(4, model.tokenizers[name].n_voxels)
        assert torch.equal(loaded.forward_features(x, name), model.forward_features(x, name))
        o1 = model.forward_mae(x, name, generator=torch.Generator().manual_seed(3))
        o2 = loaded.forward_mae(x, name, generator=torch.Generator().manual_seed(3))
        assert torch.equal(o1.pred, o2.pred) and torch.equal(o1.loss, o2.loss)
        assert torch.equal(loaded.tokenizers[name].voxel_order, model.tokenizers[name].voxel_order)

    encoder_only = BrainEncoder.from_pretrained(tmp_path / "export", with_decoder=False)
    assert encoder_only.decoder is None
    x = torch.randn(2, 150)
    assert torch.equal(encoder_only.forward_features(x, "b"), model.forward_features(x, "b"))
    with pytest.raises(RuntimeError, match="without its MAE decoder"):
        encoder_only.forward_mae(x, "b")

    encoder_only.save_pretrained(tmp_path / "encoder_only")
    assert json.loads((tmp_path / "encoder_only" / "config.json").read_text())["has_decoder"] is False
    with pytest.raises(ExportError, match="no MAE decoder"):
        BrainEncoder.from_pretrained(tmp_path / "encoder_only", with_decoder=True)


def test_presets_match_the_reference_sizes():
    large = BrainEncoderConfig.preset("large")
    assert (large.width, large.depth, large.heads, large.mlp_ratio) == (1024, 24, 16, 1.0)
    assert (large.decoder_width, large.decoder_depth, large.decoder_heads) == (512, 8, 16)
    assert (large.patch_size, large.mask_ratio) == (16, 0.75)
    base = BrainEncoderConfig.preset("base")
    assert (base.width, base.depth, base.decoder_width, base.decoder_depth) == (768, 12, 512, 4)
    with pytest.raises(ValueError, match="unknown preset"):
        BrainEncoderConfig.preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        BrainEncoderConfig.preset("tiny", heads=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_flash_attention_matches_cpu_fp32():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = BrainEncoder(tiny())
    model.add_subject("s", blob_coords(6.0))
    x = torch.randn(8, model.tokenizers["s"].n_voxels)
    ref = model.forward_features(x, "s")
    model.cuda()
    # Only the flash kernel allowed: this raises if the bf16 path cannot use it.
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        feats = model.forward_features(x.cuda(), "s")
        out = model.forward_mae(x.cuda(), "s")
    # (CUDA autocast runs LayerNorm in fp32, CPU autocast in bf16: the output dtype differs.)
    assert ((feats.float().cpu() - ref).norm() / ref.norm()).item() < 3e-2
    assert torch.isfinite(out.loss) and out.pred.dtype == torch.float32
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- speed options: attention implementation, CrossMAE decoder -------------------------------------

def test_math_attention_computes_what_the_fused_kernel_does():
    coords = blob_coords(5.0)
    x = torch.randn(4, len(coords))
    losses, grads = {}, {}
    for impl in ("sdpa", "math"):
        torch.manual_seed(0)
        model = BrainEncoder(tiny(distance_bias=True, attention_impl=impl))
        model.add_subject("s", coords)
        out = model.forward_mae(x, "s", generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        losses[impl], grads[impl] = out.loss.item(), model.blocks[0].attn.qkv.weight.grad
    assert losses["math"] == pytest.approx(losses["sdpa"], rel=1e-5)
    assert torch.allclose(grads["math"], grads["sdpa"], atol=1e-5)


def test_auto_attention_avoids_the_fused_cpu_kernel_for_biased_bf16_only(monkeypatch):
    import mindsemantix.models.brain_encoder as be

    calls = []
    fused = be.F.scaled_dot_product_attention
    monkeypatch.setattr(be.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    coords = blob_coords(5.0)
    x = torch.randn(4, len(coords))

    def fused_calls(bf16: bool, **overrides) -> int:
        calls.clear()
        torch.manual_seed(0)
        model = BrainEncoder(tiny(**overrides))
        model.add_subject("s", coords)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.forward_mae(x, "s")
        return len(calls)

    assert fused_calls(False, distance_bias=True) == 3            # fp32: the fused kernel (2 encoder + 1 decoder block)
    assert fused_calls(True) == 3                                  # bf16 without a bias: fused (faster there)
    assert fused_calls(True, distance_bias=True) == 0             # bf16 with the distance bias: explicit matmuls
    assert fused_calls(True, distance_bias=True, attention_impl="sdpa") == 3   # the old behaviour, kept


def test_cross_decoder_decodes_only_the_hidden_tokens_and_learns():
    torch.manual_seed(0)
    coords = blob_coords(6.0)
    model = BrainEncoder(tiny(decoder_attention="cross", distance_bias=True))
    model.add_subject("s", coords)
    seen = []
    model.decoder.blocks[0].register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    data = structured_fmri(coords, 256, seed=0)
    N = model.n_tokens("s")
    out = model.forward_mae(data[:8], "s")
    n_hidden = int(out.patch_mask[0].sum())
    assert seen == [(8, n_hidden, model.config.decoder_width)] and n_hidden == N - round(N * 0.25)
    assert torch.equal(out.pred[~out.mask], data[:8][~out.mask])       # visible voxels: the input, unscored
    losses, predict_zero = train_briefly(model, data)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(predict_zero[-5:]), (losses, predict_zero)


def test_cross_decoder_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BrainEncoder(tiny(decoder_attention="cross"))
    model.add_subject("s", blob_coords(5.0))
    x = torch.randn(4, model.tokenizers["s"].n_voxels)
    ref = model.forward_mae(x, "s", generator=torch.Generator().manual_seed(0)).loss
    model.save_pretrained(tmp_path / "e")
    again = BrainEncoder.from_pretrained(tmp_path / "e")
    assert again.config.decoder_attention == "cross"
    assert again.forward_mae(x, "s", generator=torch.Generator().manual_seed(0)).loss.item() == pytest.approx(ref.item())
    with pytest.raises(ValueError, match="decoder_attention"):
        tiny(decoder_attention="both")
