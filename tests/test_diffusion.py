"""Stable Diffusion loading and the reconstruction variants, with tiny random SD parts (a few
seconds in all): shapes, per-key seeding, the diffusers-folder round trip, atomic PNGs, the grid."""

from __future__ import annotations

import pytest
import torch

from mindsemantix.models.diffusion import (VARIANTS, Reconstructor, SamplingConfig, SmallSDConfig, freeze_pipeline,
                                           key_seed, load_png, load_stable_diffusion, save_reconstruction_grid,
                                           small_stable_diffusion)

TINY = SmallSDConfig(resolution=32, vae_channels=(8, 16, 16), unet_channels=(16, 32), attention_head_dim=8,
                     text_width=16, text_layers=1, text_heads=2, norm_groups=8)
KEYS = ["subj01-000001", "subj01-000002", "subj02-000003"]
PROMPTS = ["a red circle at the top left", "two blue squares on grass", "a small white star on black"]


@pytest.fixture(scope="module")
def pipe():
    p = small_stable_diffusion(TINY, seed=0)
    freeze_pipeline(p)
    return p


def reconstructor(pipe, **sampling) -> Reconstructor:
    return Reconstructor(pipe, SamplingConfig(**{"num_inference_steps": 2, "strength": 0.5, **sampling}))


def seen_images(n: int = 3, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_shapes_of_latents_and_all_variants(pipe):
    rec = reconstructor(pipe)
    assert rec.resolution == 32 and rec.latent_shape == (4, 8, 8)
    latents = rec.encode_images(seen_images())           # resized to the native 32 px, then encoded
    assert latents.shape == (3, 4, 8, 8) and latents.dtype == torch.float32
    out = rec.reconstruct(KEYS, PROMPTS, latents)
    assert set(out) == set(VARIANTS)
    for images in out.values():
        assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    # a variant whose input is missing is skipped, not faked
    assert set(rec.reconstruct(KEYS, None, latents)) == {"latent_only"}
    assert set(rec.reconstruct(KEYS, PROMPTS, None)) == {"caption_only"}
    with pytest.raises(ValueError, match="unknown variant"):
        rec.reconstruct(KEYS, PROMPTS, latents, ["img2img"])


def test_seeding_is_per_key_and_independent_of_the_batch(pipe):
    latents = reconstructor(pipe).encode_images(seen_images())
    a = reconstructor(pipe, seed=0).reconstruct(KEYS, PROMPTS, latents)
    b = reconstructor(pipe, seed=0).reconstruct(KEYS, PROMPTS, latents)
    c = reconstructor(pipe, seed=1).reconstruct(KEYS, PROMPTS, latents)
    for v in ("caption_only", "full"):
        assert torch.equal(a[v], b[v])                    # same seed: identical images
        assert not torch.equal(a[v], c[v])                # another seed: other noise, other images
    assert torch.equal(a["latent_only"], c["latent_only"])  # no noise in a plain decode
    # a key's image does not depend on the other keys of its batch (one generator per key)
    alone = reconstructor(pipe, seed=0).reconstruct(KEYS[1:2], PROMPTS[1:2], latents[1:2])
    for v in VARIANTS:
        assert (alone[v][0].int() - a[v][1].int()).abs().max() <= 1  # up to float summation order
    assert key_seed("subj01-000001", 0) == key_seed("subj01-000001", 0) != key_seed("subj01-000001", 1)
    assert key_seed("subj01-000001", 0) == 3519128199479950926  # stable across processes and versions


def test_strength_zero_is_the_latent_only_decode_and_strength_matters(pipe):
    latents = reconstructor(pipe).encode_images(seen_images())
    zero = reconstructor(pipe, strength=0.0).reconstruct(KEYS, PROMPTS, latents)
    assert torch.equal(zero["full"], zero["latent_only"])
    half = reconstructor(pipe, strength=0.5, num_inference_steps=4).full(PROMPTS, latents, KEYS)
    most = reconstructor(pipe, strength=1.0, num_inference_steps=4).full(PROMPTS, latents, KEYS)
    assert not torch.equal(half, most)


def test_pipeline_saved_in_diffusers_format_loads_back_identically(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "sd")
    assert (tmp_path / "sd" / "model_index.json").is_file()
    loaded = load_stable_diffusion(str(tmp_path / "sd"))  # local folder: local_files_only, no hub access
    assert loaded.tokenizer.model_max_length == TINY.max_length
    assert all(not p.requires_grad for m in (loaded.unet, loaded.vae, loaded.text_encoder) for p in m.parameters())
    for name in ("unet", "vae", "text_encoder"):
        for (k, v), (k2, v2) in zip(getattr(pipe, name).state_dict().items(), getattr(loaded, name).state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    latents = reconstructor(pipe).encode_images(seen_images())
    a = reconstructor(pipe).reconstruct(KEYS, PROMPTS, latents)
    b = reconstructor(loaded).reconstruct(KEYS, PROMPTS, latents)
    for v in VARIANTS:
        assert torch.equal(a[v], b[v])


def test_write_gives_one_png_per_key_and_variant_atomically(pipe, tmp_path):
    rec = reconstructor(pipe)
    latents = rec.encode_images(seen_images())
    paths = rec.write(tmp_path / "out", KEYS, PROMPTS, latents, batch_size=2, progress=False)
    direct = rec.reconstruct(KEYS, PROMPTS, latents)
    for v in VARIANTS:
        assert [p.name for p in paths[v]] == [f"{k}.png" for k in KEYS]
        for i, p in enumerate(paths[v]):
            # PNGs are lossless; batches of 2 vs 3 differ only in float summation order
            assert (load_png(p).int() - direct[v][i].int()).abs().max() <= 1
    assert not list((tmp_path / "out").rglob("*.tmp"))      # no temporary files left behind


def test_grid_picture(tmp_path):
    images = seen_images(2, 32)
    rows = [{"key": k, "seen": images[i], "caption_only": images[i], "latent_only": None, "full": images[i],
             "reference": "a red circle", "decoded": "a red disk"} for i, k in enumerate(KEYS[:2])]
    path = save_reconstruction_grid(tmp_path / "grid.png", rows, title="test")
    assert load_png(path).shape[0] == 3
