"""Stable Diffusion for stage 3: loading the frozen parts, and the reconstruction variants.

Stage 3 turns a decoded caption and a brain-predicted VAE latent into an image. Stable Diffusion is
never trained here; it is loaded through diffusers exactly as a user loads SD 1.5 or 2.1 (a hub id
or a local folder in diffusers format). The embedded demo brings its own small text-to-image model
(`data_recipes/toy_diffusion.py`), saved in that same format, so the same code path loads both.

Three variants per test key (the full method and the two ablations the report compares (docs/formats.md)):

| variant        | image from                                                          |
|----------------|---------------------------------------------------------------------|
| `full`         | img2img: the predicted latent, noised to `strength`, denoised with the caption as prompt |
| `caption_only` | text2img from pure noise with the caption as prompt                 |
| `latent_only`  | the predicted latent through the VAE decoder, no diffusion          |

Every image is seeded by its key (`key_generator`), so a key's image does not depend on which other
keys share its batch, and reruns give identical PNGs.

Latents are always *scaled* latents (`vae.encode(x).latent_dist.mean * scaling_factor`), the space
the UNet works in and the one img2img takes directly: (B, 4, H / f, W / f) with f the VAE's
downsampling factor (8 for SD 1.5, 4 for the demo's model).
"""

from __future__ import annotations

import hashlib
import warnings
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from mindsemantix.io import atomic_path

VARIANTS = ("caption_only", "latent_only", "full")

SCHEDULERS = {  # name -> diffusers class name; DDIM with eta=0 makes sampling deterministic given the noise
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


# ---------------------------------------------------------------------------------------------
# Loading


def load_stable_diffusion(name_or_path: str, *, dtype: torch.dtype = torch.float32, scheduler: str | None = "ddim",
                          local_files_only: bool | None = None, variant: str | None = None):
    """A frozen `StableDiffusionPipeline` from a hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`)
    or a local diffusers folder (the demo's toy model, a cluster's model store).

    The safety checker is not loaded: reconstructions are research outputs compared against the
    seen images, and a checker that blacks out images would bias the image metrics.
    `local_files_only` defaults to True for local folders (no hub access is attempted), False for ids.
    """
    from diffusers import StableDiffusionPipeline

    if dtype == torch.float16 and not torch.cuda.is_available():  # half precision is a GPU setting
        warnings.warn(f"{name_or_path}: float16 Stable Diffusion needs a GPU (CPU kernels lack it); loading it in float32")
        dtype = torch.float32
    local = Path(name_or_path).expanduser().is_dir()
    if local_files_only is None:
        local_files_only = local
    pipe = StableDiffusionPipeline.from_pretrained(
        str(Path(name_or_path).expanduser()) if local else name_or_path, **{dtype_keyword(): dtype},
        safety_checker=None, requires_safety_checker=False, local_files_only=local_files_only, variant=variant)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    freeze_pipeline(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dtype_keyword() -> str:
    """The name under which the installed diffusers takes the weights' dtype: newer ones renamed
    `torch_dtype` to `dtype` and warn at the old name (they define `_resolve_dtype` for the change)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def make_scheduler(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def freeze_pipeline(pipe) -> None:
    for module in pipeline_modules(pipe).values():
        module.eval().requires_grad_(False)


def pipeline_modules(pipe) -> dict[str, nn.Module]:
    """The pipeline's torch modules by component name (unet, vae, text_encoder, ...)."""
    return {name: c for name, c in pipe.components.items() if isinstance(c, nn.Module)}


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(pipe, resolution: int | None = None) -> tuple[int, int, int]:
    """(C, h, w) of the scaled latent of a square image at `resolution` (default: the UNet's native size)."""
    f = vae_scale_factor(pipe.vae)
    resolution = resolution or pipe.unet.config.sample_size * f
    return pipe.vae.config.latent_channels, resolution // f, resolution // f


# ---------------------------------------------------------------------------------------------
# Seeding


def key_seed(key: str, seed: int) -> int:
    """A 63-bit seed from (key, seed): stable across processes and Python versions (unlike hash())."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def key_generators(keys: Sequence[str], seed: int) -> list[torch.Generator]:
    """One CPU generator per key (diffusers draws each sample's noise from its own generator, so a
    key's noise is the same whatever batch it is in; CPU generators give the same noise on any device)."""
    return [torch.Generator("cpu").manual_seed(key_seed(k, seed)) for k in keys]


# ---------------------------------------------------------------------------------------------
# Image <-> tensor helpers


def to_unit(images: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float [-1, 1] (B, 3, R, R), the VAE's input range (antialiased resize)."""
    x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
    if resolution is not None and x.shape[-1] != resolution:
        x = nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                                      antialias=True)
    return x


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [0, 1] (B, 3, H, W) -> uint8 (B, 3, H, W)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def save_png(path: str | Path, image: torch.Tensor | np.ndarray) -> None:
    """uint8 (3, H, W) tensor or (H, W, 3) array -> PNG, written atomically."""
    from PIL import Image

    array = image.permute(1, 2, 0).cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")


def load_png(path: str | Path) -> torch.Tensor:
    """PNG -> uint8 (3, H, W)."""
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Reconstruction


@dataclass
class SamplingConfig:
    """How Stable Diffusion samples the reconstructions.

    Args:
        num_inference_steps: denoising steps of the full schedule.
        guidance_scale: classifier-free guidance scale (1: no guidance).
        strength: img2img: the share of the schedule re-run from the noised predicted latent.
        negative_prompt: text the guidance steers away from.
        seed: seed of every key's noise (with the key: a key's image does not depend on its batch).
    """

    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    strength: float = 0.5
    negative_prompt: str = ""
    seed: int = 0


class Reconstructor:
    """The three reconstruction variants over one frozen Stable Diffusion pipeline.

    `pipe` is a `StableDiffusionPipeline` (see `load_stable_diffusion`); the img2img pipeline shares
    its modules. Images come back as uint8 (B, 3, R, R) at `resolution` R (default: the UNet's
    native size; seen images are resized to it before encoding); latents are scaled latents (B, C, R / f, R / f).
    """

    def __init__(self, pipe, sampling: SamplingConfig | None = None, resolution: int | None = None):
        from diffusers import StableDiffusionImg2ImgPipeline

        native = pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)
        # the VAE halves the size per level, the UNet's down blocks halve the latent again
        multiple = vae_scale_factor(pipe.vae) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if resolution is not None and (resolution <= 0 or resolution % multiple):
            raise ValueError(f"resolution {resolution}: this Stable Diffusion needs a multiple of {multiple} "
                             f"(its native size is {native})")
        self._resolution = resolution or native
        self.text2img = pipe
        components = {k: v for k, v in pipe.components.items() if k != "requires_safety_checker"}
        self.img2img = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
        self.img2img.set_progress_bar_config(disable=True)
        self.sampling = sampling or SamplingConfig()

    @property
    def vae(self):
        return self.text2img.vae

    @property
    def device(self) -> torch.device:
        return self.text2img.unet.device

    @property
    def resolution(self) -> int:
        """Image size of the latents, text-to-image samples and targets: the setting, or the UNet's native size."""
        return self._resolution

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return latent_shape(self.text2img, self.resolution)

    def to(self, device) -> "Reconstructor":
        self.text2img.to(device)  # img2img shares the modules
        return self

    # -- VAE --------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> scaled latents (B, C, h, w): the posterior mean (deterministic), the
        regression target of stage 3."""
        vae = self.vae
        x = to_unit(images, self.resolution).to(self.device, vae.dtype)
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents (B, C, h, w) -> uint8 (B, 3, R, R)."""
        vae = self.vae
        x = vae.decode(latents.to(self.device, vae.dtype) / vae.config.scaling_factor).sample
        return to_uint8((x + 1) / 2).cpu()

    # -- the three variants -------------------------------------------------------------------

    @torch.no_grad()
    def latent_only(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(latents)

    @torch.no_grad()
    def caption_only(self, captions: Sequence[str], keys: Sequence[str]) -> torch.Tensor:
        s = self.sampling
        out = self.text2img(
            prompt=list(captions), negative_prompt=[s.negative_prompt] * len(captions),
            height=self.resolution, width=self.resolution, num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale, generator=key_generators(keys, s.seed), output_type="pt")
        return to_uint8(out.images).cpu()

    @torch.no_grad()
    def full(self, captions: Sequence[str], latents: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        s = self.sampling
        if s.strength <= 0:  # nothing re-run: img2img degenerates to decoding the latent
            return self.decode_latents(latents)
        out = self.img2img(
            prompt=list(captions), negative_prompt=[s.negative_prompt] * len(captions),
            image=latents.to(self.device, self.text2img.unet.dtype), strength=s.strength,
            num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
            generator=key_generators(keys, s.seed), output_type="pt")
        return to_uint8(out.images).cpu()

    @torch.no_grad()
    def full_candidates(self, captions: Sequence[str], latents: torch.Tensor, keys: Sequence[str], n: int) -> torch.Tensor:
        """`n` img2img samples per key (seeds `key`, `key#1`, ...; candidate 0 = plain `full`) ->
        uint8 (B, n, 3, R, R)."""
        seeds = [[f"{k}#{j}" if j else k for k in keys] for j in range(n)]
        return torch.stack([self.full(captions, latents, s) for s in seeds], 1)

    @torch.no_grad()
    def full_mean(self, captions: Sequence[str], latents: torch.Tensor, keys: Sequence[str], n: int) -> torch.Tensor:
        """The pixel mean of `n` img2img samples per key (a Monte Carlo estimate of the posterior mean
        image given the latent and the caption) -> uint8 (B, 3, R, R)."""
        if n <= 1:
            return self.full(captions, latents, keys)
        return self.full_candidates(captions, latents, keys, n).float().mean(1).round().to(torch.uint8)

    def reconstruct(self, keys: Sequence[str], captions: Sequence[str] | None, latents: torch.Tensor | None,
                    variants: Iterable[str] = VARIANTS) -> dict[str, torch.Tensor]:
        """{variant: uint8 (B, 3, R, R)} for one batch; a variant whose input is None is skipped."""
        out = {}
        for v in variants:
            if v not in VARIANTS:
                raise ValueError(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
            if v == "latent_only" and latents is not None:
                out[v] = self.latent_only(latents)
            elif v == "caption_only" and captions is not None:
                out[v] = self.caption_only(captions, keys)
            elif v == "full" and captions is not None and latents is not None:
                out[v] = self.full(captions, latents, keys)
        return out

    def write(self, out_dir: str | Path, keys: Sequence[str], captions: Sequence[str] | None,
              latents: torch.Tensor | None, variants: Iterable[str] = VARIANTS, batch_size: int = 16,
              progress: bool = True) -> dict[str, list[Path]]:
        """Reconstruct all keys in batches and write `out_dir/<variant>/<key>.png` (one PNG per key,
        each written atomically). Returns the paths per variant."""
        from tqdm.auto import tqdm

        out_dir, variants = Path(out_dir), list(variants)
        paths: dict[str, list[Path]] = {v: [] for v in variants}
        starts = range(0, len(keys), batch_size)
        for i in tqdm(starts, desc="reconstruct", unit="batch", disable=not progress):
            ks = list(keys[i:i + batch_size])
            images = self.reconstruct(ks, None if captions is None else list(captions[i:i + batch_size]),
                                      None if latents is None else latents[i:i + batch_size], variants)
            for v, batch in images.items():
                for k, image in zip(ks, batch):
                    path = out_dir / v / f"{k}.png"
                    save_png(path, image)
                    paths[v].append(path)
        return paths


# ---------------------------------------------------------------------------------------------
# The picture: seen | caption-only | latent-only | full, with reference and decoded captions


GRID_COLUMNS = (("seen", "seen image"), ("caption_only", "caption only"), ("latent_only", "latent only"),
                ("full", "full (img2img)"))


def save_reconstruction_grid(path: str | Path, rows: Sequence[dict], title: str | None = None) -> Path:
    """One row per test key: images under the names of GRID_COLUMNS (uint8 (3, H, W) each, missing
    ones left blank), plus `key`, `reference` and `decoded` captions printed under the row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k = max(len(rows), 1), len(GRID_COLUMNS)
    fig, axes = plt.subplots(n, k + 1, figsize=(1.6 * k + 4.2, 1.7 * n + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * k + [2.6]})
    for r, row in enumerate(rows):
        for c, (name, label) in enumerate(GRID_COLUMNS):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if row.get(name) is not None:
                ax.imshow(row[name].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            if r == 0:
                ax.set_title(label, fontsize=9)
        axes[r][0].set_ylabel(row.get("key", ""), fontsize=7)
        text = "\n".join(textwrap.wrap(f"reference: {row.get('reference', '')}", 44)[:3]
                         + textwrap.wrap(f"decoded: {row.get('decoded', '')}", 44)[:3])
        axes[r][k].axis("off")
        axes[r][k].text(0, 0.5, text, transform=axes[r][k].transAxes, fontsize=7.5, va="center", ha="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Building a small Stable Diffusion from scratch (the demo's toy model, and tests' random parts)


@dataclass
class SmallSDConfig:
    """Architecture of a small Stable Diffusion with SD 1.5's component classes.

    The VAE downsamples by 2 ** (len(vae_channels) - 1); the UNet has one level per entry of
    `unet_channels`, cross-attention on the levels marked in `unet_cross_attention`.
    `text_time_conditioning` adds diffusers' `addition_embed_type="text"`: the prompt's tokens,
    attention-pooled, are added to the timestep embedding, so global attributes (background,
    colour) reach every ResNet block, not only the cross-attention layers; StableDiffusionPipeline
    runs such a UNet unchanged. `max_length` is the tokenizer's model_max_length (SD: 77; the
    simulated captions fit in 32 tokens, and the text encoder and cross-attention cost scale with it).
    """

    resolution: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    unet_cross_attention: tuple[bool, ...] = (True, True)
    unet_layers_per_block: int = 1
    attention_head_dim: int = 32
    text_time_conditioning: bool = True
    prediction_type: str = "v_prediction"  # or "epsilon" (SD 1.5's; SD 2.x uses v)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    norm_groups: int = 16
    max_length: int = 32

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


def small_stable_diffusion(config: SmallSDConfig, tokenizer=None, seed: int = 0):
    """A randomly initialised `StableDiffusionPipeline` (UNet2DConditionModel, AutoencoderKL,
    CLIPTextModel, the real CLIP BPE tokenizer, SD 1.5's scaled-linear schedule with DDIM sampling)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mindsemantix.models.pretrained import load_clip_tokenizer

    tokenizer = tokenizer or load_clip_tokenizer(model_max_length=config.max_length)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=config.latent_channels,
        block_out_channels=tuple(config.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        layers_per_block=1, norm_num_groups=min(config.norm_groups, min(config.vae_channels)),
        sample_size=config.resolution, mid_block_add_attention=False)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.unet_cross_attention))
    extra = {}
    if config.text_time_conditioning:
        extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": max(1, config.text_width // 32),
                 "resnet_time_scale_shift": "scale_shift"}
    unet = UNet2DConditionModel(
        sample_size=config.resolution // config.vae_scale_factor, in_channels=config.latent_channels,
        out_channels=config.latent_channels, block_out_channels=tuple(config.unet_channels), down_block_types=down,
        up_block_types=up, layers_per_block=config.unet_layers_per_block, cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_groups, **extra)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type=config.prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
