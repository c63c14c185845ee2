"""Train the simulated study's own small Stable Diffusion, once, and save it in diffusers format.

No Stable Diffusion weights exist offline, so the embedded demo brings a small text-to-image model
of the same anatomy as SD 1.5 (AutoencoderKL, UNet2DConditionModel, CLIPTextModel, the real CLIP
BPE tokenizer, a scaled-linear DDPM schedule), trained from scratch on the simulated study's
TRAINING images and their captions (never the shared test images, `sharedix`). Stage 3 then loads
the folder exactly as it loads SD 1.5:

    StableDiffusionPipeline.from_pretrained(OUT, local_files_only=True)

    python data_recipes/toy_diffusion.py --nsd-root data/toyworld/nsd --out data/toy_sd [--scale demo]

What makes it learn in minutes on two CPU cores (each measured, see docs/stage3.md):
  * two phases: the VAE first (reconstruction only), then every training image is encoded once, so
    the UNet phase never runs the VAE; latent mean and std are cached and a fresh sample is drawn
    from the posterior per step, as SD's training does;
  * 32 px images with a 4x VAE (8 x 8 latents): the UNet stays small;
  * v-prediction (as SD 2.x) with a plain loss, so the high-noise steps, where the prompt decides the
    layout, count fully (`min_snr_gamma` enables min-SNR weighting, Hang et al. 2023);
  * a small text encoder trained jointly with the UNet on the study's reference captions plus the
    simulator's canonical caption (every attribute named, from the ground-truth scene) when the
    ground truth is available, 10% empty prompts for classifier-free guidance;
  * an exponential moving average of the UNet and text-encoder weights is what gets saved (as
    SD ships its EMA weights); with it, 1,200 steps show colour 0.40 (docs/stage3.md);
  * bf16 autocast where it is measured to pay (mindsemantix/precision.py): the VAE and UNet phases
    by the "conv" probe (a UNet block), the text-encoder pretraining by the "matmul" one. On AVX512-
    BF16 CPUs without AMX the UNet step is ~1.7x slower in bf16 (the CPU attention kernel), so those
    run fp32 there; AVX2-only CPUs emulate bf16 (~30x slower); fp32 weights and optimiser.

The folder also holds `toy_sd.json`: the recipe, the data provenance, the timings, and the measured
prompt faithfulness (below), and `samples.png`, a grid of prompts and their images.

Prompt faithfulness is measured against the simulator's ground truth: for test scenes (the shared
test images' scenes when the ground-truth file is found, else fresh scenes from the simulator), an
image is generated from the scene's canonical caption, and for each attribute (background, colour,
shape, place, size) it is compared with renderings of the same scene that differ only in that
attribute; the attribute counts as shown when the rendering with the true value is the nearest
(blurred pixels, so small shifts do not matter). Chance is 1 / number of values. The same test on
the VAE's reconstructions of the true images gives the ceiling the decoder allows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from mindsemantix.models.diffusion import (SmallSDConfig, freeze_pipeline, key_generators, small_stable_diffusion, to_uint8,
                                          to_unit)
from mindsemantix.numerics import warmup_cosine

log = logging.getLogger("toy_diffusion")


# ---------------------------------------------------------------------------------------------
# Recipe


@dataclass
class ToySDRecipe:
    model: SmallSDConfig = field(default_factory=SmallSDConfig)
    # phase 1: the autoencoder
    vae_steps: int = 600
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_object_weight: float = 4.0  # extra loss weight on pixels unlike the image's median colour (objects)
    # phase 2a: text encoder alone, caption -> latent of its image (SD's text encoder comes
    # pretrained and aligned to images, CLIP; this is our cheap stand-in, so the UNet gets
    # informative prompt features from its first step)
    text_pretrain_steps: int = 300
    text_pretrain_lr: float = 3e-3
    # phase 2b: UNet + text encoder on cached latents
    unet_steps: int = 1000
    unet_batch: int = 32
    unet_lr: float = 2e-3
    text_lr: float = 2e-3
    warmup_steps: int = 50
    # None: plain loss. With v-prediction that weights an x0 error by SNR + 1, i.e. the high-noise
    # steps, where the prompt decides the layout, count fully; min-SNR-5 would scale them by SNR.
    min_snr_gamma: float | None = None
    object_weight: float = 4.0  # extra loss weight on latent cells covering objects (text pretraining and UNet)
    caption_dropout: float = 0.1  # empty prompt, for classifier-free guidance
    canonical_prob: float = 0.3  # share of steps prompted with the canonical caption (when known)
    grad_clip: float = 1.0
    # exponential moving average of the UNet and text-encoder weights, saved in their place (as SD
    # and most diffusion models ship theirs); the decay ramps up from 0 ((1 + n) / (10 + n) at step n)
    # so the average is useful after a few hundred steps. None: the raw weights.
    ema_decay: float | None = 0.995
    bf16: bool | None = None  # None: per phase, where the probe measures that bf16 pays (mindsemantix/precision.py)
    # faithfulness check
    eval_scenes: int = 100
    eval_steps: int = 25
    eval_guidance: float = 2.0  # as stage 3 samples (stages/reconstruct.yaml); 5 over-saturates this small model
    seed: int = 0


def _tiny_model() -> SmallSDConfig:
    return SmallSDConfig(resolution=16, vae_channels=(8, 16), unet_channels=(16, 32), text_width=32,
                         text_layers=1, text_heads=2, attention_head_dim=16, norm_groups=8)


# SCALE=tiny trains in well under a minute (for the end-to-end test; images are blobs);
# demo is the `make demo` default (its cost: docs/stage3.md); full trains longer.
SCALES = {
    "tiny": ToySDRecipe(model=_tiny_model(), vae_steps=40, vae_batch=8, text_pretrain_steps=20, unet_steps=40,
                        unet_batch=16, warmup_steps=5, eval_scenes=16, eval_steps=8),
    "demo": ToySDRecipe(vae_steps=400, text_pretrain_steps=150, unet_steps=1200, eval_scenes=50),
    "full": ToySDRecipe(vae_steps=1500, unet_steps=6000, warmup_steps=200),
}


# ---------------------------------------------------------------------------------------------
# Data: the simulated study's training images and captions


@dataclass
class TrainingSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[list[str]]  # N lists of reference captions
    image_ids: np.ndarray  # (N,) 0-based ids into imgBrick
    canonical: list[str | None]  # N canonical captions (None where the ground truth is unknown)
    provenance: dict


def load_study(nsd_root: str | Path, resolution: int, max_images: int | None = None) -> tuple[TrainingSet, dict]:
    """The training set (every image that is not a shared test image, `sharedix`) of an NSD-layout
    tree, resized to `resolution`, and the test scenes of the simulator's ground truth (when the tree
    has one: `toyworld_truth/truth.json`), for the faithfulness check only."""
    import h5py

    from mindsemantix.data.nsd import NSDLayout, load_coco_captions, load_design, load_stim_info
    from mindsemantix.simulate.scenes import Scene
    from mindsemantix.simulate.study import load_truth

    layout = NSDLayout(nsd_root)
    shared = set(load_design(layout.expdesign).shared_nsd_ids.tolist())
    stim = load_stim_info(layout.stim_info)
    captions_by_coco = load_coco_captions(layout.annotations)
    with h5py.File(layout.stimuli, "r") as f:
        brick = f["imgBrick"]
        n_total = brick.shape[0]
        train_ids = np.array([i for i in range(n_total) if i not in shared
                              and i < len(stim.coco_id) and captions_by_coco.get(int(stim.coco_id[i]))])
        if max_images is not None:
            train_ids = train_ids[:max_images]
        images, wanted = [], np.zeros(n_total, dtype=bool)
        wanted[train_ids] = True
        for start in range(0, n_total, 1024):  # contiguous blocks (h5py point selection is slow); the real imgBrick is 40 GB
            block = wanted[start:start + 1024]
            if block.any():
                images.append(_resize_uint8(brick[start:start + len(block)][block], resolution))
    images = np.concatenate(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8)
    captions = [captions_by_coco[int(stim.coco_id[i])] for i in train_ids]

    truth = load_truth(nsd_root)
    canonical: list[str | None] = [None] * len(train_ids)
    test = {"scenes": [], "nsd_ids": [], "novel": []}
    if truth is not None:
        by_id = {img["nsd_id"]: img for img in truth["images"]}
        canonical = [by_id[int(i)]["canonical_caption"] if int(i) in by_id else None for i in train_ids]
        for img in truth["images"]:
            if img["nsd_id"] in shared:
                test["scenes"].append(Scene.from_dict(img["scene"]))
                test["nsd_ids"].append(img["nsd_id"])
                test["novel"].append(bool(img.get("novel")))
    provenance = {"nsd_root": str(Path(nsd_root).resolve()), "n_train_images": int(len(train_ids)),
                  "n_shared_excluded": len(shared), "ground_truth": truth is not None,
                  "first_train_ids": train_ids[:5].tolist()}
    return TrainingSet(images, captions, train_ids, canonical, provenance), test


# ---------------------------------------------------------------------------------------------
# Phase 1: the autoencoder


def bf16_is_fast(device: torch.device, kind: str = "conv") -> bool:
    """Whether bf16 autocast pays for `kind` of work ("conv": the VAE and UNet; "matmul": the text
    encoder alone) here: the stages' measured rule, MINDSEMANTIX_BF16 included."""
    from mindsemantix import precision

    return precision.bf16_is_fast(device.type, kind)


def _autocast(device: torch.device, enabled: bool | None, kind: str = "conv"):
    if enabled is None:
        enabled = bf16_is_fast(device, kind)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def precision_used(recipe: ToySDRecipe, device: torch.device) -> dict[str, str]:
    """Per training phase, "bf16" or "fp32" (for toy_sd.json and the demo's record)."""
    kinds = {"vae": "conv", "text_pretrain": "matmul", "unet": "conv"}
    return {phase: "bf16" if (recipe.bf16 if recipe.bf16 is not None else bf16_is_fast(device, kind)) else "fp32"
            for phase, kind in kinds.items()}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, mininterval=2.0)


def images_to_unit(images: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float [-1, 1] (N, 3, R, R)."""
    return to_unit(torch.as_tensor(images).permute(0, 3, 1, 2), resolution)


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] images (B, 3, R, R) -> (B, 1, R, R) in {0, 1}: pixels unlike the image's median
    colour. Objects cover few pixels, so a plain MSE is dominated by the background; this mask lets
    the losses weight what the captions are about (no ground truth needed: pixels only)."""
    median = x.flatten(2).median(dim=2).values[..., None, None]  # (B, 3, 1, 1)
    return ((x - median).abs().amax(1, keepdim=True) > 0.25).float()


def latent_object_weights(images: torch.Tensor, latent_hw: int, weight: float, batch: int = 512) -> torch.Tensor:
    """(N, 1, h, w) loss weights 1 + weight * (share of object pixels in each latent cell)."""
    out = []
    for i in range(0, len(images), batch):
        m = nn.functional.adaptive_avg_pool2d(object_mask(images[i:i + batch]), latent_hw)
        out.append(1 + weight * m)
    return torch.cat(out)


def train_vae(vae, images: torch.Tensor, recipe: ToySDRecipe, device: torch.device, progress: bool = True) -> dict:
    """Reconstruction (MSE + L1 for sharper edges) with a tiny KL term, as SD's VAE minus the GAN.
    `images`: float [-1, 1] (N, 3, R, R) on the CPU."""
    g = torch.Generator().manual_seed(recipe.seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(min(50, recipe.vae_steps // 10), recipe.vae_steps))
    losses, start = [], time.time()
    with _progress(recipe.vae_steps, "toy SD: VAE", progress) as bar:
        for step in range(recipe.vae_steps):
            idx = torch.randint(len(images), (recipe.vae_batch,), generator=g)
            x = images[idx].to(device)
            with _autocast(device, recipe.bf16):
                posterior = vae.encode(x).latent_dist
                rec = vae.decode(posterior.sample(generator=None)).sample.float()
            err = (rec - x) ** 2 + 0.5 * (rec - x).abs()  # (B, 3, R, R)
            if recipe.vae_object_weight:
                # Objects cover few pixels; up-weight pixels far from the image's median colour so the
                # reconstruction keeps their colour (the background dominates a plain MSE).
                err = err * (1 + recipe.vae_object_weight * object_mask(x))
            loss = err.mean() + recipe.vae_kl_weight * posterior.kl().float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(vae.parameters(), recipe.grad_clip)
            opt.step(), sched.step()
            losses.append(loss.item())
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    vae.eval().requires_grad_(False)
    return {"steps": recipe.vae_steps, "seconds": time.time() - start, "final_loss": float(np.mean(losses[-50:]))}


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, device: torch.device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of every image, unscaled: (N, C, h, w) each, on the CPU."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i:i + batch].to(device)).latent_dist
        means.append(d.mean.float().cpu()), stds.append(d.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------
# Phase 2: UNet + text encoder


def tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Exactly as StableDiffusionPipeline.encode_prompt tokenizes: padded to model_max_length (77)."""
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _prompt_table(tokenizer, prompts: list[list[str]], canonical: list[str | None]):
    """Tokenize every distinct prompt once: (token table (P, L) with row 0 the empty prompt,
    per image the rows of its reference captions, per image the row of its canonical caption or -1)."""
    table_texts, index = [""], {"": 0}

    def row(t: str) -> int:
        if t not in index:
            index[t] = len(table_texts)
            table_texts.append(t)
        return index[t]

    refs = [[row(t) for t in caps] for caps in prompts]
    canon = [row(c) if c else -1 for c in canonical]
    return tokenize(tokenizer, table_texts), refs, canon


def _draw_prompts(rng: np.random.Generator, idx: list[int], refs, canon, recipe: "ToySDRecipe", dropout: float) -> list[int]:
    rows = []
    for i in idx:
        u = rng.random()
        if u < dropout:
            rows.append(0)
        elif u < dropout + recipe.canonical_prob and canon[i] >= 0:
            rows.append(canon[i])
        else:
            rows.append(refs[i][rng.integers(len(refs[i]))])
    return rows


def pretrain_text_encoder(pipe, latent_mean: torch.Tensor, prompts: list[list[str]], canonical: list[str | None],
                          recipe: "ToySDRecipe", device: torch.device, progress: bool = True,
                          weights: torch.Tensor | None = None) -> dict:
    """Regress each image's scaled latent (C, h, w) from its caption through the text encoder's
    pooled output and a linear readout (discarded afterwards). Captions that omit an attribute learn
    its average: the text features end up encoding what the caption says about the image."""
    text_encoder, scaling = pipe.text_encoder, pipe.vae.config.scaling_factor
    token_table, refs, canon = _prompt_table(pipe.tokenizer, prompts, canonical)
    target = (latent_mean * scaling).flatten(1)  # (N, C*h*w)
    # per-element loss weights (N, C*h*w): object cells count more, as in the UNet loss
    w = (weights.expand_as(latent_mean).flatten(1) if weights is not None else torch.ones_like(target))
    readout = nn.Linear(text_encoder.config.hidden_size, target.shape[1]).to(device)
    text_encoder.train().requires_grad_(True)
    params = list(text_encoder.parameters()) + list(readout.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.text_pretrain_lr, weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(min(50, recipe.text_pretrain_steps // 10), recipe.text_pretrain_steps))
    rng, g = np.random.default_rng(recipe.seed + 2), torch.Generator().manual_seed(recipe.seed + 2)
    losses, start = [], time.time()
    with _progress(recipe.text_pretrain_steps, "toy SD: text encoder", progress) as bar:
        for step in range(recipe.text_pretrain_steps):
            idx = torch.randint(len(target), (recipe.unet_batch,), generator=g)
            ids = token_table[_draw_prompts(rng, idx.tolist(), refs, canon, recipe, 0.0)].to(device)
            with _autocast(device, recipe.bf16, "matmul"):
                pooled = text_encoder(ids).pooler_output
                loss = (w[idx].to(device) * (readout(pooled).float() - target[idx].to(device)) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step(), sched.step()
            losses.append(loss.item())
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return {"steps": recipe.text_pretrain_steps, "seconds": time.time() - start,
            "final_loss": float(np.mean(losses[-50:])) if losses else None,
            "target_variance": float((w * (target - target.mean(0)) ** 2).mean())}


def train_unet(pipe, latent_mean: torch.Tensor, latent_std: torch.Tensor, prompts: list[list[str]],
               canonical: list[str | None], recipe: ToySDRecipe, device: torch.device, progress: bool = True,
               on_step=None, weights: torch.Tensor | None = None) -> dict:
    """Denoising training of UNet + text encoder on scaled latents sampled from the cached posteriors.

    Each step draws a batch of images, for each a prompt: the empty prompt (caption_dropout), the
    canonical caption (canonical_prob, where known) or one of its reference captions.
    """
    unet, text_encoder, tokenizer, scheduler = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    scaling = pipe.vae.config.scaling_factor
    rng = np.random.default_rng(recipe.seed + 1)
    g = torch.Generator().manual_seed(recipe.seed + 1)

    token_table, refs, canon = _prompt_table(tokenizer, prompts, canonical)

    v_prediction = scheduler.config.prediction_type == "v_prediction"
    alphas_cumprod = scheduler.alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    # fused AdamW: one kernel for all tensors (the text encoder's 49408-row token table makes the
    # per-tensor loop a tenth of a CPU step)
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": recipe.unet_lr},
        {"params": list(text_encoder.parameters()), "lr": recipe.text_lr},
    ], weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(recipe.warmup_steps, recipe.unet_steps))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params] if recipe.ema_decay else None
    losses, start = [], time.time()
    n = len(latent_mean)
    with _progress(recipe.unet_steps, "toy SD: UNet", progress) as bar:
        for step in range(recipe.unet_steps):
            idx = torch.randint(n, (recipe.unet_batch,), generator=g)
            ids = token_table[_draw_prompts(rng, idx.tolist(), refs, canon, recipe, recipe.caption_dropout)].to(device)
            x0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)) * scaling
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, len(alphas_cumprod), (len(idx),), generator=g)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(device)
            with _autocast(device, recipe.bf16):
                cond = text_encoder(ids)[0]
                pred = unet(xt, t.to(device), cond).sample.float()
            if v_prediction:  # v = sqrt(a) * noise - sqrt(1 - a) * x0 (Salimans & Ho 2022)
                target = a.sqrt() * noise - (1 - a).sqrt() * x0
            else:
                target = noise
            err = (pred - target.to(device)) ** 2  # (B, C, h, w)
            if weights is not None:  # object cells count more (see latent_object_weights)
                err = err * weights[idx].to(device)
            per_sample = err.mean(dim=(1, 2, 3))
            if recipe.min_snr_gamma:  # min-SNR weight: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v
                clipped = snr[t].clamp(max=recipe.min_snr_gamma)
                w = (clipped / (snr[t] + 1) if v_prediction else clipped / snr[t]).to(device)
                loss = (w * per_sample).mean()
            else:
                loss = per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step(), sched.step()
            if ema is not None:
                weight = 1 - min(recipe.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for average, p in zip(ema, params):
                        average.lerp_(p, weight)
            losses.append(loss.item())
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if on_step is not None:
                on_step(step + 1)
    if ema is not None:
        with torch.no_grad():
            for p, average in zip(params, ema):
                p.copy_(average)
    freeze_pipeline(pipe)
    return {"steps": recipe.unet_steps, "seconds": time.time() - start, "final_loss": float(np.mean(losses[-100:])),
            "n_prompts": len(token_table)}


# ---------------------------------------------------------------------------------------------
# Prompt faithfulness against the simulator's ground truth


ATTRIBUTES = ("background", "colour", "shape", "place", "size")


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """(N, H, W, 3) -> blurred float32, so the nearest rendering tolerates small shifts."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(images.astype(np.float32) / 255.0, sigma=(0, sigma, sigma, 0))


def counterfactuals(scene) -> dict[str, tuple[list, int]]:
    """For each attribute that the scene's canonical caption names: (scenes differing only in that
    attribute, index of the true one). Colour and shape are varied on every object together for
    groups, on the first object for pairs; size on singles only (its two classes, mid radius)."""
    from mindsemantix.simulate import scenes as S

    def with_objects(objs):
        return dataclasses.replace(scene, objects=tuple(objs))

    out = {"background": ([dataclasses.replace(scene, background=b) for b in S.BACKGROUNDS],
                          S.BACKGROUNDS.index(scene.background))}
    first = scene.objects[0]
    varied = range(len(scene.objects)) if scene.layout != "pair" else [0]

    def vary(attr, values):
        options = [with_objects([dataclasses.replace(o, **{attr: v}) if i in varied else o
                                 for i, o in enumerate(scene.objects)]) for v in values]
        return options, list(values).index(getattr(first, attr))

    out["colour"] = vary("colour", list(S.COLOURS))
    out["shape"] = vary("shape", list(S.SHAPES))
    if scene.layout == "single":
        sizes = [with_objects([dataclasses.replace(first, size=z, radius=float(np.mean(S.RADIUS_RANGE[z])))])
                 for z in S.SIZES]
        out["size"] = (sizes, list(S.SIZES).index(first.size))
    return out


OBJECT_THRESHOLD = 50.0  # RGB distance (0-255) from the scene's bare background that marks object pixels


def _object_mask(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels unlike the bare background rendering (H, W, 3)."""
    return np.linalg.norm(image.astype(np.float32) - background.astype(np.float32), axis=-1) > OBJECT_THRESHOLD


def _palette_histogram(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(8,) share of the image's pixels that are object pixels of each named colour: where the
    colours are, not where they are (position-invariant, so colour is judged apart from place)."""
    from mindsemantix.simulate.scenes import COLOURS

    palette = np.array(list(COLOURS.values()), dtype=np.float32)  # (8, 3)
    mask = _object_mask(image, background)
    pixels = image[mask].astype(np.float32)  # (M, 3)
    hist = np.zeros(len(palette), dtype=np.float64)
    if len(pixels):
        nearest = np.linalg.norm(pixels[:, None] - palette[None], axis=-1).argmin(1)
        hist += np.bincount(nearest, minlength=len(palette))
    return hist / mask.size


def attribute_accuracy(images: np.ndarray, scenes: list, sigma: float = 1.5) -> dict:
    """images (N, H, W, 3) uint8 shown for `scenes` -> {attribute: {accuracy, chance, n}}.

    background: the nearest of the scene rendered on each background (blurred pixels).
    colour: the nearest colour counterfactual by palette histogram of object pixels (position-free).
    shape: the nearest shape counterfactual (blurred pixels; needs the object roughly in place).
    place (singles): the named 3 x 3 place of the object pixels' centroid.
    size (singles): the nearer of the two size classes by object area.
    """
    from mindsemantix.simulate.scenes import place_name, render_scene, render_scenes

    size = images.shape[1]
    sig = sigma * size / 64
    hits: dict[str, list[float]] = {a: [] for a in ATTRIBUTES}
    chance: dict[str, list[float]] = {a: [] for a in ATTRIBUTES}
    for image, scene in zip(images, scenes):
        bare = render_scene(dataclasses.replace(scene, objects=()), size)
        blurred = _blur(image[None], sig)[0]
        for attr, (options, truth) in counterfactuals(scene).items():
            renders = render_scenes(options, size)
            if attr == "colour":
                h = _palette_histogram(image, bare)
                distances = np.array([np.abs(_palette_histogram(r, bare) - h).sum() for r in renders])
            elif attr == "size":
                area = _object_mask(image, bare).mean()
                distances = np.array([abs(_object_mask(r, bare).mean() - area) for r in renders])
            else:
                distances = ((_blur(renders, sig) - blurred[None]) ** 2).reshape(len(options), -1).mean(1)
            hits[attr].append(float(np.argmin(distances) == truth))
            chance[attr].append(1 / len(options))
        if scene.layout == "single":
            ys, xs = np.nonzero(_object_mask(image, bare))
            place = place_name((xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size) if len(xs) else None
            hits["place"].append(float(place == scene.objects[0].place))
            chance["place"].append(1 / 9)
    out = {a: {"accuracy": float(np.mean(h)), "chance": float(np.mean(chance[a])), "n": len(h)}
           for a, h in hits.items() if h}
    out["mean"] = {"accuracy": float(np.mean([v["accuracy"] for v in out.values()])),
                   "chance": float(np.mean([v["chance"] for v in out.values()]))}
    return out


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], steps: int, guidance: float, seed: int, batch: int = 50,
             keys: Sequence[str] | None = None) -> np.ndarray:
    """(N, R, R, 3) uint8 from text2img, one generator per prompt."""
    keys = list(keys) if keys is not None else [f"eval-{i:06d}" for i in range(len(prompts))]
    out = []
    for i in range(0, len(prompts), batch):
        images = pipe(prompt=list(prompts[i:i + batch]), num_inference_steps=steps, guidance_scale=guidance,
                      generator=key_generators(keys[i:i + batch], seed), output_type="np").images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def measure_faithfulness(pipe, scenes: list, recipe: ToySDRecipe, images: np.ndarray | None = None) -> dict:
    """Attribute accuracy of text2img images of the scenes' canonical captions; with `images` (the
    true stimuli of the scenes) also of their VAE reconstructions (the decoder's ceiling)."""
    from mindsemantix.simulate.captions import canonical_caption

    start = time.time()
    prompts = [canonical_caption(s) for s in scenes]
    generated = generate(pipe, prompts, recipe.eval_steps, recipe.eval_guidance, recipe.seed)
    gen_seconds = time.time() - start
    # the same images scored against other scenes' prompts: the chance level this generator's habits
    # give (e.g. a blob always in the middle is "right" for every central object)
    mismatched = [scenes[(i + len(scenes) // 2) % len(scenes)] for i in range(len(scenes))]
    result = {"text2img": attribute_accuracy(generated, scenes), "mismatched_prompts": attribute_accuracy(generated, mismatched),
              "n_scenes": len(scenes),
              "guidance_scale": recipe.eval_guidance, "num_inference_steps": recipe.eval_steps,
              "seconds_per_image": gen_seconds / max(1, len(scenes))}
    if images is not None:
        res = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        x = images_to_unit(images, res).to(pipe.vae.device)
        with torch.no_grad():
            rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
        rec = to_uint8((rec + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        result["vae_reconstruction"] = attribute_accuracy(rec, scenes)
        result["vae_pixcorr"] = float(np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in
                                               zip(rec.astype(np.float64), _resize_uint8(images, res).astype(np.float64))]))
    return result, generated, prompts


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8 (antialiased bilinear)."""
    if images.shape[1] == size:
        return np.asarray(images)
    x = images_to_unit(np.asarray(images), size)
    return to_uint8((x + 1) / 2).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------
# The whole recipe


def sample_grid(path: Path, prompts: Sequence[str], generated: np.ndarray, truth: np.ndarray | None, n: int = 12) -> None:
    """Pairs (true stimulus | generated from its canonical caption) with the prompt under each."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mindsemantix.io import atomic_path

    n = min(n, len(prompts))
    cols = 4
    rows = math.ceil(n / cols)
    per = 2 if truth is not None else 1
    fig, axes = plt.subplots(rows, cols * per, figsize=(1.6 * cols * per, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        r, c = divmod(i, cols)
        if truth is not None:
            axes[r][c * per].imshow(truth[i], interpolation="nearest")
            axes[r][c * per].set_title("seen" if r == 0 else "", fontsize=7)
        ax = axes[r][c * per + per - 1]
        ax.imshow(generated[i], interpolation="nearest")
        ax.set_title("generated" if r == 0 else "", fontsize=7)
        axes[r][c * per].text(0, -0.08, "\n".join(textwrap.wrap(prompts[i], 38)[:3]), fontsize=5.5, va="top",
                              transform=axes[r][c * per].transAxes)
    fig.tight_layout(h_pad=2.2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _fingerprint(recipe: ToySDRecipe, provenance: dict) -> dict:
    return {"recipe": dataclasses.asdict(recipe), "data": {k: provenance[k] for k in ("nsd_root", "n_train_images", "first_train_ids")}}


def is_complete(out: Path, fingerprint: dict | None = None) -> bool:
    """A finished folder of the same recipe and data (then the recipe need not run again)."""
    info = out / "toy_sd.json"
    if not (out / "model_index.json").is_file() or not info.is_file():
        return False
    if fingerprint is None:
        return True
    try:
        saved = json.loads(info.read_text())
    except json.JSONDecodeError:
        return False
    return saved.get("fingerprint") == json.loads(json.dumps(fingerprint))


def build(nsd_root: str | Path, out: str | Path, recipe: ToySDRecipe, device: str = "cpu", max_images: int | None = None,
          progress: bool = True, force: bool = False) -> dict:
    """Train and save the toy SD; returns the summary written to `out/toy_sd.json`."""
    from mindsemantix.io import atomic_dir, write_json_atomic

    out, dev = Path(out), torch.device(device)
    start = time.time()
    data, test = load_study(nsd_root, recipe.model.resolution, max_images)
    fingerprint = _fingerprint(recipe, data.provenance)
    if not force and is_complete(out, fingerprint):
        log.info("%s is complete for this recipe and data; nothing to do (--force retrains)", out)
        return json.loads((out / "toy_sd.json").read_text())
    if len(data.images) == 0:
        raise SystemExit(f"toy_diffusion: no training images with captions under {nsd_root}")
    log.info("training on %d images (shared test images excluded), %s", len(data.images), device)
    torch.manual_seed(recipe.seed)
    pipe = small_stable_diffusion(recipe.model, seed=recipe.seed).to(dev)

    # phase 1: the VAE, then its latent scale (SD: 1 / std of the latents, so the UNet sees unit variance)
    x = images_to_unit(data.images, recipe.model.resolution)
    vae_stats = train_vae(pipe.vae, x, recipe, dev, progress)
    mean, std = encode_all(pipe.vae, x, dev)
    pipe.vae.register_to_config(scaling_factor=float(1 / mean.std()))

    # phase 2: text encoder alone (optional), then UNet + text encoder
    weights = latent_object_weights(x, mean.shape[-1], recipe.object_weight) if recipe.object_weight else None
    text_stats = pretrain_text_encoder(pipe, mean, data.captions, data.canonical, recipe, dev, progress, weights) \
        if recipe.text_pretrain_steps else None
    unet_stats = train_unet(pipe, mean, std, data.captions, data.canonical, recipe, dev, progress, weights=weights)
    train_seconds = time.time() - start

    # prompt faithfulness on the shared test scenes (never trained on), else on fresh scenes
    from mindsemantix.simulate.scenes import render_scenes, sample_scene

    if test["scenes"]:
        scenes, source = test["scenes"][: recipe.eval_scenes], "shared test images of the study"
    else:
        rng = np.random.default_rng(recipe.seed + 12345)
        scenes, source = [sample_scene(rng) for _ in range(recipe.eval_scenes)], "fresh scenes from the simulator"
    truth_images = render_scenes(scenes, recipe.model.resolution)
    faithfulness, generated, prompts = measure_faithfulness(pipe, scenes, recipe, truth_images)
    faithfulness["scenes"] = source

    summary = {
        "format": "mindsemantix-toy-sd/1", "fingerprint": fingerprint, "provenance": data.provenance,
        "device": device, "threads": torch.get_num_threads(), "precision": precision_used(recipe, dev),
        "vae": vae_stats, "text_pretrain": text_stats, "unet": unet_stats, "scaling_factor": pipe.vae.config.scaling_factor,
        "train_seconds": round(train_seconds, 1), "faithfulness": faithfulness,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "diffusers": __import__("diffusers").__version__,
                     "transformers": __import__("transformers").__version__},
    }
    pipe.to("cpu")
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        sample_grid(tmp / "samples.png", prompts, generated, truth_images)
        write_json_atomic(tmp / "toy_sd.json", summary)  # last: marks the folder complete
    summary["seconds"] = round(time.time() - start, 1)
    write_json_atomic(out / "toy_sd.json", summary)
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsd-root", required=True, type=Path, help="NSD-layout tree (data_recipes/toyworld.py --out)")
    p.add_argument("--out", required=True, type=Path, help="diffusers folder to write (replaced atomically)")
    p.add_argument("--scale", choices=sorted(SCALES), default=os.environ.get("SCALE", "demo"),
                   help="recipe preset (default: $SCALE or demo)")
    p.add_argument("--vae-steps", type=int, help="override the preset's VAE steps")
    p.add_argument("--unet-steps", type=int, help="override the preset's UNet steps")
    p.add_argument("--eval-scenes", type=int, help="override the number of scenes of the faithfulness check")
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-images", type=int, help="train on at most this many images")
    p.add_argument("--force", action="store_true", help="retrain even if --out is complete for this recipe and data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    recipe = SCALES[args.scale]
    overrides = {k: v for k, v in {"vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
                                    "eval_scenes": args.eval_scenes, "seed": args.seed}.items() if v is not None}
    recipe = dataclasses.replace(recipe, **overrides)
    summary = build(args.nsd_root, args.out, recipe, args.device, args.max_images, not args.quiet, args.force)
    f = summary["faithfulness"]
    shown = ", ".join(f"{a} {v['accuracy']:.2f} (chance {v['chance']:.2f})" for a, v in f["text2img"].items())
    print(f"wrote {args.out}: trained in {summary['train_seconds']} s on {summary['provenance']['n_train_images']} "
          f"images; prompt faithfulness on {f['n_scenes']} {f['scenes']}: {shown}")
    return summary


if __name__ == "__main__":
    main()
