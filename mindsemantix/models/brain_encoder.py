"""Stage-1 brain encoder: one masked autoencoder over fMRI voxels for many subjects and datasets.

Subjects have different voxel counts and voxels that do not correspond across brains, so every
subject gets a small tokenizer of its own, and everything after it is shared:

    fmri (B, V_s) --[subject tokenizer]--> tokens (B, N_s, D) --[shared transformer]--> (B, N_s, D)

Subject tokenizer (`SubjectTokenizer`), built from the voxels' millimetre coordinates alone:
  * voxel order: the subject's voxels are sorted along a 3-D Hilbert curve over their mm positions
    and cut into patches of `patch_size` consecutive voxels, so a patch is a compact neighbourhood
    (a C-order cut of the mask would give 16-voxel lines). The last patch is zero-padded; padded
    slots never enter a loss.
  * per-patch linear map: each patch has its own (P -> subject_dim) weights (voxels inside a patch
    have no order that means the same thing in two patches, so a shared patch embedding as in a ViT
    would be meaningless here), followed by a *shared* projection subject_dim -> width. The
    factorisation keeps the subject part small: V * subject_dim weights per subject instead of
    V * width (about 1 M instead of 16 M for an NSD subject at width 1024), which matters for
    corpora with hundreds of subjects and for fitting a new subject on an hour of data.
    subject_dim = width recovers a full per-patch (P x width) map. All patches start from the same
    map (see `_init_patch_maps`: independent random starts stalled training at "predict the mean").
  * optional learned subject embedding (width,), added to every token.
The shared positional embedding is computed from each patch's centroid in mm (Fourier features ->
MLP), so tokens from different subjects that lie in the same place get similar positions. With
`center_coords` the coordinates are taken relative to the subject's ROI centroid first: native-space
origins differ by centimetres between subjects, ROI centroids of one ROI definition much less.
With `distance_bias` every attention head (encoder and decoder) also adds -k_h * d^2 to its logits,
d the mm distance between two tokens' patch centroids, k_h learned per head (starting widths 8-64
mm): the heads start local, so a hidden patch reads its neighbours from the first step (on the
simulated study, a 300-step MAE without it stayed at "predict the mean"; docs/stage1.md). Off by
default, so exports written before it load unchanged.

MAE pretraining (`forward_mae`), as in He et al. 2022 / MinD-Vis: per sample, a random
(1 - mask_ratio) of the tokens is kept; the encoder sees only those; the shared decoder gets the
encoded tokens back at their places, learned mask tokens elsewhere, plus a decoder positional
embedding from the same centroids; a per-subject output head maps each decoder token back to its
patch's voxels (shared projection decoder_width -> subject_dim, then per-patch subject_dim -> P).
Loss: mean squared error over the voxels of masked patches, padded slots excluded.

Adding a subject to a pretrained encoder: `add_subject(name, coords_mm)` then
`freeze_except_subjects([name])` and train with `forward_mae` on that subject's data: only its
tokenizer and output head change (tests/test_brain_encoder.py checks this).

A batch holds one subject, so the other subjects' layers get no gradient in that step: under DDP
use find_unused_parameters=True.

Export (docs/formats.md, kind "brain_encoder"): `save_pretrained(folder)` writes config.json
(model config, subject names and voxel counts) and model.safetensors (weights plus each subject's
coordinates, voxel order and patch centroids, so nothing needs the data to rebuild).
`BrainEncoder.from_pretrained(folder)` rebuilds it. The MAE decoder and the subject output heads are
exported by default: they are needed to add a subject or continue pretraining, and cost ~8% of the
parameters at the `large` preset. Stage 2 loads with `with_decoder=False` and never builds them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mindsemantix.export import ExportError, load_export, save_export

EXPORT_KIND = "brain_encoder"


ATTENTION_IMPLS = ("auto", "sdpa", "math")


@dataclass(frozen=True)
class BrainEncoderConfig:
    patch_size: int = 16          # voxels per token
    width: int = 1024             # encoder width D
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    decoder_width: int = 512      # D_dec
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float | None = None   # None: same as mlp_ratio
    mask_ratio: float = 0.75
    subject_dim: int = 64         # r: per-patch map P -> r (per subject), then r -> D (shared)
    subject_embedding: bool = True
    pos_frequencies: int = 16     # Fourier frequencies per axis, wavelengths geometric in [min, max]
    pos_min_wavelength_mm: float = 4.0
    pos_max_wavelength_mm: float = 256.0
    center_coords: bool = True    # coordinates relative to the subject's ROI centroid
    distance_bias: bool = False   # attention logits - k_h * (distance between token centroids)^2, k_h learned
    # "self": the decoder runs self-attention over all N tokens (mask tokens at the hidden places), as
    # MAE / MinD-Vis; "cross": only the hidden tokens are decoded, each cross-attending to the visible
    # ones (CrossMAE, Fu et al. 2024): fewer tokens through the decoder, no N x N attention.
    decoder_attention: str = "self"
    # "auto": scaled_dot_product_attention, except explicit matmul-softmax attention for bf16 with a
    # distance bias on a CPU (faster there than torch's fused CPU kernel: docs/stage1.md);
    # "sdpa" / "math" force one. The same arithmetic either way.
    attention_impl: str = "auto"
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("patch_size", "width", "depth", "heads", "decoder_width", "decoder_depth",
                     "decoder_heads", "subject_dim", "pos_frequencies"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"BrainEncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.decoder_width % self.decoder_heads:
            raise ValueError(f"decoder_width {self.decoder_width} is not divisible by decoder_heads {self.decoder_heads}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_attention not in ("self", "cross"):
            raise ValueError(f"decoder_attention must be 'self' or 'cross', got {self.decoder_attention!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "BrainEncoderConfig":
        """`tiny` (tests, demo), `base`, `large` (MinD-Vis's published MAE: 1024 x 24, 16 heads,
        mlp ratio 1, decoder 512 x 8)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BrainEncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown BrainEncoderConfig fields {unknown}")
        return cls(**d)


@dataclass(frozen=True)
class BrainEncoderOverrides:
    """Changes to a size preset of `BrainEncoderConfig` (stage 1's `encoder` setting); each field
    left null keeps the preset's value.

    Args:
        patch_size: voxels per token (consecutive along a Hilbert curve through the ROI).
        width: encoder width D.
        depth: encoder blocks.
        heads: encoder attention heads (must divide width).
        mlp_ratio: encoder MLP width / D.
        decoder_width: MAE decoder width.
        decoder_depth: MAE decoder blocks.
        decoder_heads: MAE decoder attention heads (must divide decoder_width).
        decoder_mlp_ratio: MAE decoder MLP width / decoder_width (the preset's null: mlp_ratio).
        mask_ratio: share of tokens masked in MAE training, in (0, 1).
        subject_dim: r: each subject maps a patch to r values, then a shared map r -> D.
        subject_embedding: add a learned per-subject vector to every token.
        pos_frequencies: Fourier frequencies per axis of the voxel coordinates (wavelengths geometric
            between the two below).
        pos_min_wavelength_mm: shortest wavelength in mm.
        pos_max_wavelength_mm: longest wavelength in mm.
        center_coords: coordinates relative to the subject's ROI centroid.
        distance_bias: attention logits minus k_h * (distance between token centroids)^2, k_h learned.
        decoder_attention: "self" (MAE: the decoder attends over all tokens) or "cross" (CrossMAE: the
            hidden tokens cross-attend to the visible ones only; cheaper, docs/stage1.md).
        attention_impl: "auto", "sdpa" or "math" (explicit matrix products; docs/stage1.md).
        layer_norm_eps: LayerNorm epsilon.
    """

    patch_size: int | None = None
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    decoder_width: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    decoder_mlp_ratio: float | None = None
    mask_ratio: float | None = None
    subject_dim: int | None = None
    subject_embedding: bool | None = None
    pos_frequencies: int | None = None
    pos_min_wavelength_mm: float | None = None
    pos_max_wavelength_mm: float | None = None
    center_coords: bool | None = None
    distance_bias: bool | None = None
    decoder_attention: str | None = None
    attention_impl: str | None = None
    layer_norm_eps: float | None = None

    def changes(self) -> dict[str, Any]:
        """The fields that are set, for `BrainEncoderConfig.preset(name, **changes)`."""
        return {k: v for k, v in asdict(self).items() if v is not None}


PRESETS = {
    "tiny": BrainEncoderConfig(width=64, depth=2, heads=4, mlp_ratio=2.0, decoder_width=32,
                               decoder_depth=1, decoder_heads=2, subject_dim=16),
    "base": BrainEncoderConfig(width=768, depth=12, heads=12, mlp_ratio=4.0, decoder_width=512,
                               decoder_depth=4, decoder_heads=16, subject_dim=64),
    "large": BrainEncoderConfig(width=1024, depth=24, heads=16, mlp_ratio=1.0, decoder_width=512,
                                decoder_depth=8, decoder_heads=16, subject_dim=64),
}


# ----------------------------------------------------------------------------------------------
# Voxel order along a Hilbert curve
# ----------------------------------------------------------------------------------------------

def hilbert_index(grid: np.ndarray, bits: int) -> np.ndarray:
    """Position along a 3-D Hilbert curve of integer points `grid` (V, 3) in [0, 2**bits).

    Skilling's transpose algorithm ("Programming the Hilbert curve", 2004), vectorised over points.
    """
    x = [grid[:, i].astype(np.int64) for i in range(3)]
    top = 1 << (bits - 1)
    # Inverse undo of the curve's rotations and reflections, from the top bit down.
    q = top
    while q > 1:
        p = q - 1
        for i in range(3):
            bit = (x[i] & q) != 0
            if i == 0:
                x[0] = np.where(bit, x[0] ^ p, x[0])
            else:
                t = (x[0] ^ x[i]) & p
                x[0], x[i] = np.where(bit, x[0] ^ p, x[0] ^ t), np.where(bit, x[i], x[i] ^ t)
        q >>= 1
    # Gray encode.
    for i in range(1, 3):
        x[i] = x[i] ^ x[i - 1]
    t = np.zeros_like(x[0])
    q = top
    while q > 1:
        t = np.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x = [xi ^ t for xi in x]
    # Interleave the transposed bits (axis 0 most significant within each level).
    index = np.zeros_like(x[0])
    for b in range(bits - 1, -1, -1):
        for i in range(3):
            index = (index << 1) | ((x[i] >> b) & 1)
    return index


def hilbert_voxel_order(coords_mm: np.ndarray, bits: int = 10) -> np.ndarray:
    """Permutation (V,) that sorts voxels along a Hilbert curve through their mm positions.

    The bounding box is scaled isotropically onto a 2**bits grid (0.2 mm cells for a 200 mm brain),
    finer than any fMRI voxel, so no voxel size or axis alignment is assumed (oblique affines work).
    Ties (duplicate positions) keep their input order.
    """
    lo = coords_mm.min(axis=0)
    extent = max(float((coords_mm - lo).max()), 1e-6)
    grid = np.rint((coords_mm - lo) / extent * ((1 << bits) - 1)).astype(np.int64)
    return np.argsort(hilbert_index(grid, bits), kind="stable")


# ----------------------------------------------------------------------------------------------
# Subject-specific layers
# ----------------------------------------------------------------------------------------------

class SubjectTokenizer(nn.Module):
    """One subject's voxel layout and input map: fmri (B, V) -> per-patch features (B, N, r)."""

    def __init__(self, coords_mm: Tensor, patch_size: int, subject_dim: int, width: int,
                 subject_embedding: bool, center_coords: bool):
        super().__init__()
        coords_mm = coords_mm.detach().to(torch.float32).cpu()
        n_voxels, n_patches = coords_mm.shape[0], math.ceil(coords_mm.shape[0] / patch_size)
        self.n_voxels, self.n_patches, self.patch_size = n_voxels, n_patches, patch_size
        order = torch.from_numpy(hilbert_voxel_order(coords_mm.numpy().astype(np.float64)))
        self.register_buffer("coords_mm", coords_mm)              # (V, 3) as given, data voxel order
        self.register_buffer("voxel_order", order)                 # (V,) data index at curve position
        valid = torch.arange(n_patches * patch_size) < n_voxels
        self.register_buffer("valid", valid.view(n_patches, patch_size), persistent=False)  # (N, P)
        centre = coords_mm.mean(0) if center_coords else torch.zeros(3)
        ordered = F.pad(coords_mm[order] - centre, (0, 0, 0, n_patches * patch_size - n_voxels))
        centroids = (ordered.view(n_patches, patch_size, 3).sum(1)
                     / self.valid.sum(1, keepdim=True))           # mean over real voxels only
        self.register_buffer("centroids_mm", centroids)            # (N, 3)
        self.weight = nn.Parameter(torch.empty(n_patches, patch_size, subject_dim))  # (N, P, r)
        self.bias = nn.Parameter(torch.zeros(n_patches, subject_dim))                # (N, r)
        self.embedding = nn.Parameter(torch.zeros(width)) if subject_embedding else None
        _init_patch_maps(self.weight)
        self._set_inverse()

    def _set_inverse(self) -> None:
        # Derived from voxel_order, so not saved; recomputed whenever voxel_order is loaded.
        inverse = torch.argsort(self.voxel_order)                          # (V,) curve position of voxel
        self.register_buffer("inverse_order", inverse, persistent=False)
        self.register_buffer("voxel_patch", inverse // self.patch_size, persistent=False)  # (V,) its token

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        with torch.no_grad():
            inverse = torch.argsort(self.voxel_order)
            self.inverse_order.copy_(inverse)
            self.voxel_patch.copy_(inverse // self.patch_size)

    def patchify(self, fmri: Tensor) -> Tensor:
        """(B, V) data order -> (B, N, P) curve order, zeros in the padded slots."""
        ordered = fmri[:, self.voxel_order]                                    # (B, V)
        ordered = F.pad(ordered, (0, self.n_patches * self.patch_size - self.n_voxels))
        return ordered.view(fmri.shape[0], self.n_patches, self.patch_size)   # (B, N, P)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, N, P) curve order -> (B, V) data order; padded slots dropped."""
        flat = patches.reshape(patches.shape[0], -1)[:, : self.n_voxels]      # (B, V) curve order
        return flat[:, self.inverse_order]                                     # (B, V) data order

    def forward(self, patches: Tensor) -> Tensor:
        # (B, N, P) x (N, P, r) -> (B, N, r): one small matrix per patch.
        return torch.einsum("bnp,npr->bnr", patches, self.weight) + self.bias


def _init_patch_maps(weight: Tensor) -> None:
    """Start every patch with the same xavier-uniform map, free to specialise in training.

    Independent random maps per patch hand the backbone one spatial pattern in a different random
    basis at every position, and training then sat at "predict the mean" for a long, seed-dependent
    time: on the tests' tiny structured signal, 2 of 3 seeds had not left it after 100 steps, while
    a shared start learned the structure within 10-20 steps for every seed. Voxel j of two patches
    lies at the same place along its local curve segment, so a shared start behaves like a ViT's
    shared patch embedding.
    """
    n, fan_in, fan_out = weight.shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        weight.copy_(torch.empty(fan_in, fan_out).uniform_(-bound, bound).expand(n, -1, -1))


class SubjectHead(nn.Module):
    """One subject's output map: decoder features (B, N, r) -> voxel values (B, N, P)."""

    def __init__(self, n_patches: int, patch_size: int, subject_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_patches, subject_dim, patch_size))  # (N, r, P)
        self.bias = nn.Parameter(torch.zeros(n_patches, patch_size))                 # (N, P)
        _init_patch_maps(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bnr,nrp->bnp", x, self.weight) + self.bias


# ----------------------------------------------------------------------------------------------
# Shared parts
# ----------------------------------------------------------------------------------------------

class FourierFeatures(nn.Module):
    """mm positions (N, 3) -> (N, 6F) sin/cos features at geometric wavelengths."""

    def __init__(self, n_frequencies: int, min_wavelength_mm: float, max_wavelength_mm: float):
        super().__init__()
        wavelengths = torch.logspace(math.log10(min_wavelength_mm), math.log10(max_wavelength_mm), n_frequencies)
        self.register_buffer("angular", 2 * math.pi / wavelengths, persistent=False)  # (F,)
        self.out_dim = 6 * n_frequencies

    def forward(self, xyz_mm: Tensor) -> Tensor:
        with torch.autocast(xyz_mm.device.type, enabled=False):  # phases need fp32, never bf16
            phase = (xyz_mm.float()[:, :, None] * self.angular).flatten(1)      # (N, 3F)
            return torch.cat([phase.sin(), phase.cos()], dim=1)                 # (N, 6F)


def position_mlp(in_dim: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, impl: str = "auto") -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over (B, H, T, d) heads. "auto": torch's fused kernels
    (flash / memory-efficient), except with a bias (`distance_bias`) on a CPU in bf16, where explicit
    matmuls (bf16) and a softmax (fp32) made the whole MinD-Vis-sized step 1.10x faster; without a
    bias the fused kernel was 1.09x faster there (docs/stage1.md)."""
    cpu_bf16_bias = q.device.type == "cpu" and q.dtype == torch.bfloat16 and bias is not None
    if impl == "sdpa" or (impl == "auto" and not cpu_bf16_bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)              # (B, H, Tq, Tk)
    if bias is not None:
        logits = logits + bias
    return logits.float().softmax(-1).to(v.dtype) @ v                     # (B, H, Tq, d)


class Attention(nn.Module):
    """Multi-head self-attention, or cross-attention when `context` is given; with `distance_bias`,
    head h adds -k_h * d_ij^2 to its logits (d_ij: mm distance between the tokens' patch centroids),
    k_h learned, starting from widths sqrt(1 / 2k_h) geometric in [8, 64] mm: local heads from the
    first step (neighbouring patches carry most of what a hidden patch holds), free to widen or narrow."""

    def __init__(self, width: int, heads: int, distance_bias: bool = False, impl: str = "auto"):
        super().__init__()
        self.heads, self.impl = heads, impl
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.log_k = None
        if distance_bias:
            sigma_mm = torch.logspace(math.log10(8.0), math.log10(64.0), heads)
            self.log_k = nn.Parameter(-torch.log(2 * sigma_mm ** 2))   # (H,)

    def forward(self, x: Tensor, dist2: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        """x (B, T, D) queries; context (B, S, D) keys/values (None: x itself); dist2 (B or 1, T, S)
        squared centroid distances in mm^2 (used with distance_bias)."""
        B, T, D = x.shape
        H, d = self.heads, D // self.heads
        if context is None:
            q, k, v = self.qkv(x).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, d)
        else:  # the same projections, queries from x, keys and values from the context
            w_q, w_kv = self.qkv.weight.split([D, 2 * D])
            b_q, b_kv = self.qkv.bias.split([D, 2 * D])
            q = F.linear(x, w_q, b_q).view(B, T, H, d).transpose(1, 2)                      # (B, H, T, d)
            k, v = F.linear(context, w_kv, b_kv).view(B, -1, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, d)
        bias = None
        if self.log_k is not None and dist2 is not None:
            bias = (-self.log_k.exp()[:, None, None] * dist2[:, None]).to(q.dtype)  # (B|1, H, T, S)
        x = attention(q, k, v, bias, self.impl)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float, distance_bias: bool = False,
                 impl: str = "auto"):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, distance_bias, impl)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, dist2: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        """Self-attention block, or with `context` (B, S, D) (already normalised) a cross-attention block."""
        x = x + self.attn(self.norm1(x), dist2, context)
        return x + self.mlp(self.norm2(x))


def squared_distances(centroids: Tensor) -> Tensor:
    """(..., T, 3) mm -> (..., T, T) squared pairwise distances."""
    return (centroids[..., :, None, :] - centroids[..., None, :, :]).pow(2).sum(-1)


class MAEDecoder(nn.Module):
    """Shared MAE decoder plus the subjects' output heads."""

    def __init__(self, cfg: BrainEncoderConfig, fourier_dim: int):
        super().__init__()
        mlp_ratio = cfg.mlp_ratio if cfg.decoder_mlp_ratio is None else cfg.decoder_mlp_ratio
        self.embed = nn.Linear(cfg.width, cfg.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(cfg.decoder_width))
        self.pos = position_mlp(fourier_dim, cfg.decoder_width)
        self.blocks = nn.ModuleList(Block(cfg.decoder_width, cfg.decoder_heads, mlp_ratio, cfg.layer_norm_eps,
                                          cfg.distance_bias, cfg.attention_impl) for _ in range(cfg.decoder_depth))
        # decoder_attention "cross": the visible tokens (keys / values) are normalised once per block
        self.context_norms = (nn.ModuleList(nn.LayerNorm(cfg.decoder_width, eps=cfg.layer_norm_eps)
                                            for _ in range(cfg.decoder_depth))
                              if cfg.decoder_attention == "cross" else None)
        self.norm = nn.LayerNorm(cfg.decoder_width, eps=cfg.layer_norm_eps)
        self.to_subject = nn.Linear(cfg.decoder_width, cfg.subject_dim)  # shared D_dec -> r
        self.heads = nn.ModuleDict()                                      # subject -> SubjectHead


@dataclass
class MAEOutput:
    loss: Tensor         # () fp32: MSE over masked, non-padded voxels
    pred: Tensor         # (B, V) predicted value of every voxel (data order), fp32
    mask: Tensor         # (B, V) bool, True where the voxel's patch was hidden from the encoder
    patch_mask: Tensor   # (B, N) bool, True for masked tokens


class UnknownSubjectError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


_SUBJECT_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class BrainEncoder(nn.Module):
    """Multi-subject fMRI transformer encoder with an MAE decoder. See the module docstring."""

    def __init__(self, config: BrainEncoderConfig | None = None, with_decoder: bool = True):
        super().__init__()
        cfg = self.config = config if config is not None else BrainEncoderConfig()
        self.fourier = FourierFeatures(cfg.pos_frequencies, cfg.pos_min_wavelength_mm, cfg.pos_max_wavelength_mm)
        self.tokenizers = nn.ModuleDict()                                # subject -> SubjectTokenizer
        self.from_subject = nn.Linear(cfg.subject_dim, cfg.width)        # shared r -> D
        self.pos = position_mlp(self.fourier.out_dim, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.layer_norm_eps, cfg.distance_bias,
                                          cfg.attention_impl) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.decoder = MAEDecoder(cfg, self.fourier.out_dim) if with_decoder else None
        # Refuse NaN/inf input with a clear error. Costs one host-device sync per call on a GPU,
        # which stops the host from queueing the next step early; switch off once data are trusted.
        self.check_finite = True
        self.apply(_init_shared)
        if self.decoder is not None:
            nn.init.normal_(self.decoder.mask_token, std=0.02)

    # -- subjects ---------------------------------------------------------------------------------

    @property
    def subjects(self) -> list[str]:
        return list(self.tokenizers)

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def add_subject(self, name: str, coords_mm: np.ndarray | Tensor) -> bool:
        """Create subject `name`'s tokenizer (and output head) from its voxels' mm coordinates
        (V, 3), in the data's voxel order (C-order nonzero of the ROI mask).

        Idempotent: a subject that exists with the same coordinates is left as it is (returns
        False), so a LightningModule's setup() can call this for every subject of the datamodule,
        also after loading an export. Different coordinates under an existing name raise.
        """
        if isinstance(coords_mm, Tensor):
            coords = coords_mm.detach().to("cpu", torch.float32)
        else:
            coords = torch.from_numpy(np.asarray(coords_mm, dtype=np.float32))
        if coords.ndim != 2 or coords.shape[1] != 3 or coords.shape[0] < 1:
            raise ValueError(f"coords_mm for subject {name!r} must have shape (V, 3) with V >= 1, got {tuple(coords.shape)}")
        if not torch.isfinite(coords).all():
            raise ValueError(f"coords_mm for subject {name!r} contains NaN or inf")
        if not isinstance(name, str) or not _SUBJECT_NAME.match(name):
            raise ValueError(f"subject name {name!r} must be letters, digits, '_' or '-'")
        if name in self.tokenizers:
            known = self.tokenizers[name].coords_mm
            if known.shape == coords.shape and torch.allclose(known.cpu(), coords, atol=1e-4):
                return False
            raise ValueError(f"subject {name!r} already exists with {known.shape[0]} voxels at other coordinates "
                             f"(given {coords.shape[0]} voxels); use a new name for a different voxel set")
        cfg, ref = self.config, self.norm.weight
        tok = SubjectTokenizer(coords, cfg.patch_size, cfg.subject_dim, cfg.width, cfg.subject_embedding,
                               cfg.center_coords)
        self.tokenizers[name] = tok.to(device=ref.device, dtype=ref.dtype)
        if self.decoder is not None:
            head = SubjectHead(tok.n_patches, cfg.patch_size, cfg.subject_dim)
            self.decoder.heads[name] = head.to(device=ref.device, dtype=ref.dtype)
        return True

    def n_tokens(self, subject: str) -> int:
        return self._tokenizer(subject).n_patches

    def subject_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The parameters that belong to subject `name` alone (tokenizer, subject embedding, head)."""
        yield from self._tokenizer(name).parameters()
        if self.decoder is not None:
            yield from self.decoder.heads[name].parameters()

    def freeze_except_subjects(self, subjects: Iterable[str]) -> list[nn.Parameter]:
        """Freeze the shared parts and all other subjects; return the parameters left trainable.

        This is how a new subject is fitted to a pretrained encoder: give the returned list to the
        optimiser (frozen parameters get no gradients, so weight decay cannot move them either).
        """
        subjects = list(subjects)
        for s in subjects:
            self._tokenizer(s)
        self.requires_grad_(False)
        trainable = [p for s in subjects for p in self.subject_parameters(s)]
        for p in trainable:
            p.requires_grad_(True)
        return trainable

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, fmri: Tensor, subject: str) -> Tensor:
        return self.forward_features(fmri, subject)

    def forward_features(self, fmri: Tensor, subject: str) -> Tensor:
        """All tokens, no masking (stages 2-3): fmri (B, V_subject) -> (B, N_subject, width)."""
        tok = self._tokenizer(subject)
        patches = tok.patchify(self._check_fmri(fmri, subject, tok))             # (B, N, P)
        x = self._embed(tok, patches, self.fourier(tok.centroids_mm))             # (B, N, D)
        dist2 = squared_distances(tok.centroids_mm)[None] if self.config.distance_bias else None  # (1, N, N)
        for blk in self.blocks:
            x = blk(x, dist2)
        return self.norm(x)

    def forward_mae(self, fmri: Tensor, subject: str, mask_ratio: float | None = None,
                    generator: torch.Generator | None = None, target: Tensor | None = None) -> MAEOutput:
        """Masked-autoencoder pass. A fresh random mask per sample (pass a seeded `generator`
        on fmri's device for a reproducible validation loss). `target` (B, V): what the hidden
        patches are scored against (default: `fmri` itself; e.g. another repetition's response to
        the same image, so that only the stimulus-driven part is predictable)."""
        if self.decoder is None:
            raise RuntimeError("this BrainEncoder was built without its MAE decoder (with_decoder=False); "
                               "load the export with with_decoder=True to pretrain or add subjects")
        tok = self._tokenizer(subject)
        ratio = self.config.mask_ratio if mask_ratio is None else float(mask_ratio)
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {ratio}")
        patches = tok.patchify(self._check_fmri(fmri, subject, tok))     # (B, N, P)
        target_patches = patches if target is None else tok.patchify(self._check_fmri(target, subject, tok))
        if target_patches.shape != patches.shape:
            raise ValueError(f"target must have fmri's shape {tuple(fmri.shape)}, got {tuple(target.shape)}")
        B, N, P = patches.shape
        if N < 2:
            raise ValueError(f"subject {subject!r} has {tok.n_voxels} voxels = {N} token; masked modelling "
                             f"needs at least 2 tokens (more than patch_size={P} voxels)")
        n_keep = min(max(round(N * (1.0 - ratio)), 1), N - 1)      # at least one visible, one masked

        fourier = self.fourier(tok.centroids_mm)                           # (N, 6F), encoder + decoder
        x = self._embed(tok, patches, fourier)                             # (B, N, D)
        # Random subset per sample: argsort of uniform noise is a random permutation. (Embedding
        # all N tokens before selecting costs <= 1% of the step's FLOPs and fewer kernels than
        # selecting subject features and positions separately.)
        noise = torch.rand(B, N, device=patches.device, generator=generator)
        order = noise.argsort(dim=1)
        keep = order[:, :n_keep]                                           # (B, K) kept token ids
        x = torch.gather(x, 1, keep[:, :, None].expand(-1, -1, x.shape[2]))  # (B, K, D)
        dist2 = dec_dist2 = None
        if self.config.distance_bias:
            dec_dist2 = squared_distances(tok.centroids_mm)[None]             # (1, N, N)
            dist2 = dec_dist2[0][keep[:, :, None], keep[:, None, :]]          # (B, K, K) kept tokens
        for blk in self.blocks:
            x = blk(x, dist2)
        x = self.norm(x)                                                   # (B, K, D)

        dec = self.decoder
        y = dec.embed(x)                                                   # (B, K, Dd)
        dec_pos = dec.pos(fourier).to(y.dtype)                             # (N, Dd)
        if self.config.decoder_attention == "cross":
            pred = self._decode_cross(subject, y, dec_pos, keep, order[:, n_keep:], dec_dist2, patches)
        else:
            # Encoded tokens back at their places, the mask token everywhere else.
            full = dec.mask_token.to(y.dtype).expand(B, N, -1)
            y = full.scatter(1, keep[:, :, None].expand(-1, -1, y.shape[2]), y)  # (B, N, Dd)
            y = y + dec_pos
            for blk in dec.blocks:
                y = blk(y, dec_dist2)
            pred = dec.heads[subject](dec.to_subject(dec.norm(y))).float()    # (B, N, P)

        patch_mask = torch.ones(B, N, dtype=torch.bool, device=patches.device)
        patch_mask.scatter_(1, keep, False)                                # (B, N) True = masked
        counted = patch_mask[:, :, None] & tok.valid                       # (B, N, P) masked, not padding
        loss = ((pred - target_patches.float()) ** 2).masked_fill(~counted, 0.0).sum() / counted.sum()
        voxel_mask = patch_mask[:, tok.voxel_patch]                        # (B, V)
        return MAEOutput(loss=loss, pred=tok.unpatchify(pred), mask=voxel_mask, patch_mask=patch_mask)

    def _decode_cross(self, subject: str, y: Tensor, dec_pos: Tensor, keep: Tensor, hidden: Tensor,
                      dec_dist2: Tensor | None, patches: Tensor) -> Tensor:
        """CrossMAE decoding: the hidden tokens (mask token + position) cross-attend, block by block,
        to the visible ones (encoded + position), which are not updated. Returns (B, N, P): decoded
        values at the hidden patches, the input itself at the visible ones (never scored)."""
        dec = self.decoder
        B, K, Dd = y.shape
        context = y + dec_pos[keep]                                        # (B, K, Dd) visible
        q = dec.mask_token.to(y.dtype) + dec_pos[hidden]                   # (B, M, Dd) hidden
        dist2 = dec_dist2[0][hidden[:, :, None], keep[:, None, :]] if dec_dist2 is not None else None  # (B, M, K)
        for blk, norm in zip(dec.blocks, dec.context_norms):
            q = blk(q, dist2, norm(context))
        head = dec.heads[subject]
        feats = dec.to_subject(dec.norm(q))                                # (B, M, r)
        # the hidden patches' own per-patch maps: (B, M, r) x (B, M, r, P) -> (B, M, P)
        pred_hidden = torch.einsum("bmr,bmrp->bmp", feats, head.weight[hidden].to(feats.dtype)) + head.bias[hidden]
        pred = patches.float().clone()                                     # (B, N, P) visible: the input
        return pred.scatter(1, hidden[:, :, None].expand(-1, -1, pred.shape[2]), pred_hidden.float())

    def _embed(self, tok: SubjectTokenizer, patches: Tensor, fourier: Tensor) -> Tensor:
        """Patches (B, N, P) -> tokens (B, N, D): subject map, shared projection, positions."""
        pos = self.pos(fourier)                                            # (N, D), shared
        if tok.embedding is not None:
            pos = pos + tok.embedding
        x = self.from_subject(tok(patches))                                # (B, N, r) -> (B, N, D)
        return x + pos.to(x.dtype)

    def _tokenizer(self, subject: str) -> SubjectTokenizer:
        if subject not in self.tokenizers:
            raise UnknownSubjectError(f"unknown subject {subject!r}; this encoder has {self.subjects or 'no subjects'}. "
                                      f"Add it with add_subject(name, coords_mm).")
        return self.tokenizers[subject]

    def _check_fmri(self, fmri: Tensor, subject: str, tok: SubjectTokenizer) -> Tensor:
        if not isinstance(fmri, Tensor) or fmri.ndim != 2:
            shape = tuple(fmri.shape) if isinstance(fmri, Tensor) else type(fmri).__name__
            raise ValueError(f"fmri must be a (batch, voxels) tensor, got {shape}")
        if fmri.shape[1] != tok.n_voxels:
            raise ValueError(f"subject {subject!r} has {tok.n_voxels} voxels but fmri has {fmri.shape[1]} "
                             f"(shape {tuple(fmri.shape)})")
        if fmri.device != tok.weight.device:
            raise ValueError(f"fmri is on {fmri.device} but the encoder is on {tok.weight.device}")
        if fmri.dtype != tok.weight.dtype:  # e.g. float16 straight from the shards
            fmri = fmri.to(tok.weight.dtype)
        if self.check_finite and not torch.isfinite(fmri).all():  # NaNs would poison the weights
            bad = int((~torch.isfinite(fmri)).sum())
            raise ValueError(f"fmri for subject {subject!r} contains {bad} NaN/inf values")
        return fmri

    # -- export (docs/formats.md) ------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, include_decoder: bool = True) -> Path:
        """Write `folder/config.json` + `folder/model.safetensors` (kind "brain_encoder")."""
        include_decoder = include_decoder and self.decoder is not None
        tensors = {k: v for k, v in self.state_dict().items()
                   if include_decoder or not k.startswith("decoder.")}
        config = {
            "architecture": "BrainEncoder",
            "model": asdict(self.config),
            "has_decoder": include_decoder,
            "subjects": {s: {"n_voxels": t.n_voxels, "n_tokens": t.n_patches} for s, t in self.tokenizers.items()},
        }
        return save_export(folder, EXPORT_KIND, config, tensors)

    @classmethod
    def from_pretrained(cls, folder: str | Path, with_decoder: bool | None = None,
                        map_location: str | torch.device = "cpu") -> "BrainEncoder":
        """Rebuild from an export. `with_decoder`: None = as exported; False = encoder only."""
        config, tensors = load_export(folder, EXPORT_KIND)
        try:
            cfg = BrainEncoderConfig.from_dict(config["model"])
            subjects = list(config["subjects"])
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"export {folder}: config.json is not a BrainEncoder config ({e})") from e
        has_decoder = bool(config.get("has_decoder", False))
        if with_decoder is None:
            with_decoder = has_decoder
        if with_decoder and not has_decoder:
            raise ExportError(f"export {folder} holds no MAE decoder; load it with with_decoder=False")
        model = cls(cfg, with_decoder=with_decoder)
        for s in subjects:
            key = f"tokenizers.{s}.coords_mm"
            if key not in tensors:
                raise ExportError(f"export {folder}: {key} is missing")
            model.add_subject(s, tensors[key])
        if not with_decoder:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("decoder.")}
        # Stored voxel orders and centroids replace the recomputed ones: a future change of the
        # ordering code cannot silently reorder an exported subject.
        model.load_state_dict(tensors, strict=True)
        return model.to(map_location)


def _init_shared(m: nn.Module) -> None:
    # As FAIR's MAE: xavier-uniform linears with zero bias, unit LayerNorms.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
