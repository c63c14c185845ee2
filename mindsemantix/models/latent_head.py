"""The trained stage-3 model: the frozen stage-2 brain representation -> a VAE latent of the seen image.

    fmri (B, V_s) --BrainRepresentation (frozen BrainCaptioner.query_outputs)--> (B, T, D)
                  --LatentHead--> scaled VAE latent (B, C, h, w)   [+ image embedding (B, E)]

`LatentHead.save_pretrained(folder)` / `from_pretrained(folder)` write and read the stage-3 export
(kind "brain_reconstruct"): the head's tensors and config, plus what it was trained against (the
stage-2 export and the Stable Diffusion whose latents it predicts, by path relative to the folder or
by hub id) and the sampling settings. The losses live in `mindsemantix.stages.reconstruct`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mindsemantix.export import ExportError, load_export, save_export

EXPORT_KIND = "brain_reconstruct"


@dataclass
class LatentHeadConfig:
    n_tokens: int                    # T: brain tokens read (the Q-Former's queries)
    width: int                       # D: their width
    latent_shape: tuple[int, int, int]  # (C, h, w) of the scaled VAE latent
    token_dim: int = 64              # each token is reduced to this before they are concatenated
    hidden: int = 1024               # the residual MLP's width
    dropout: float = 0.3
    embed_dim: int | None = None     # > 0: also predict a pooled image embedding of this size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatentHeadConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown latent head fields {unknown}; known: {[f.name for f in fields(cls)]}")
        d = dict(d)
        if "latent_shape" in d:
            d["latent_shape"] = tuple(d["latent_shape"])
        return cls(**d)


class LatentHead(nn.Module):
    """Brain representation (B, T, D) -> scaled VAE latent (B, C, h, w), optionally an embedding (B, E).

    Each token is normalised and reduced to `token_dim`, the tokens are concatenated (their order
    carries meaning: query i is always query i), then a linear map plus a residual MLP give the
    latent. The linear path is a ridge-like baseline that trains fast on few samples; the MLP adds
    what is nonlinear. Build with a `LatentHeadConfig`, or with its fields as keywords.
    """

    def __init__(self, config: LatentHeadConfig | None = None, **fields_: Any):
        super().__init__()
        config = config or LatentHeadConfig.from_dict(fields_)
        self.config_ = config
        self.n_tokens, self.width, self.latent_shape = config.n_tokens, config.width, tuple(config.latent_shape)
        flat, out = config.n_tokens * config.token_dim, int(torch.tensor(config.latent_shape).prod())
        self.norm = nn.LayerNorm(config.width)
        self.reduce = nn.Linear(config.width, config.token_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.linear = nn.Linear(flat, out)
        self.mlp = nn.Sequential(nn.Linear(flat, config.hidden), nn.GELU(), nn.Dropout(config.dropout),
                                 nn.Linear(config.hidden, out))
        self.embed = (nn.Sequential(nn.Linear(flat, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.embed_dim))
                      if config.embed_dim else None)

    @property
    def config(self) -> dict[str, Any]:
        """The config as recorded in the export (`head` entry)."""
        return {**asdict(self.config_), "latent_shape": list(self.latent_shape)}

    def forward(self, brain: Tensor) -> dict[str, Tensor]:
        """brain (B, T, D) -> {"latent": (B, C, h, w), "embedding": (B, E) when configured}."""
        if brain.shape[1:] != (self.n_tokens, self.width):
            raise ValueError(f"LatentHead expects (B, {self.n_tokens}, {self.width}), got {tuple(brain.shape)}")
        x = self.dropout(self.reduce(self.norm(brain)).flatten(1))  # (B, T * token_dim)
        out = {"latent": (self.linear(x) + self.mlp(x)).view(-1, *self.latent_shape)}
        if self.embed is not None:
            out["embedding"] = self.embed(x)
        return out

    def save_pretrained(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write `folder/config.json` + `folder/model.safetensors` (kind "brain_reconstruct"); `extra`:
        what the head reads and how it is sampled (`align_export`, `diffusion`, `resolution`, `sampling`, ...)."""
        config = {**(extra or {}), "latent_shape": list(self.latent_shape), "head": self.config}
        return save_export(folder, EXPORT_KIND, config, {f"head.{k}": v for k, v in self.state_dict().items()})

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "LatentHead":
        """The head of a brain_reconstruct export, in eval mode and frozen."""
        config, tensors = load_export(folder, EXPORT_KIND)
        head = cls(LatentHeadConfig.from_dict({"latent_shape": config["latent_shape"], **config["head"]}))
        state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        result = head.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ExportError(f"export {folder}: head weights do not fit (missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")
        return head.eval().requires_grad_(False)


class BrainRepresentation(nn.Module):
    """The frozen stage-2 model's view of the brain: `BrainCaptioner.query_outputs`, the Q-Former's
    query outputs (B, Q, H) — exactly what the LLM reads. (The brain encoder's own tokens differ in
    number between subjects, so a head on them would have to be per subject; the queries are shared.)

    `cache=True` keeps each distinct input's output (on the CPU, keyed by subject and a hash of the
    voxel values): the model is frozen and in eval mode, so an input's output never changes, and a
    head trained for many epochs then runs the stage-2 model once per (sample, repetition) instead of
    once per step. Memory: distinct inputs x Q x H x 4 bytes. Outputs are computed in the batch that
    first meets them, so a resumed run (whose cache starts empty) can differ from the uninterrupted
    one in the last bits; with the cache off resumes are bitwise.
    """

    def __init__(self, captioner: nn.Module, cache: bool = False):
        super().__init__()
        self.captioner = captioner
        self.cache: dict[tuple[str, bytes], Tensor] | None = {} if cache else None

    @classmethod
    def from_export(cls, folder: str | Path, cache: bool = False) -> "BrainRepresentation":
        from mindsemantix.models.captioner import BrainCaptioner

        return cls(BrainCaptioner.from_pretrained(folder, load_llm=False), cache=cache).eval().requires_grad_(False)

    @property
    def subjects(self) -> list[str]:
        return list(self.captioner.brain_encoder.subjects)

    def shape(self) -> tuple[int, int]:
        """(Q, H) of the representation."""
        config = self.captioner.qformer.config
        return config.num_queries, config.hidden_size

    @torch.no_grad()
    def forward(self, fmri: Tensor, subject: str) -> Tensor:
        """(B, V) -> (B, Q, H)."""
        if self.cache is None:
            return self.captioner.query_outputs(fmri, subject)
        rows = fmri.detach().float().cpu().numpy()
        keys = [(subject, hashlib.blake2b(row.tobytes(), digest_size=16).digest()) for row in rows]
        todo: dict[tuple[str, bytes], int] = {}  # missing key -> its first row (a repeat within the batch: once)
        for i, k in enumerate(keys):
            if k not in self.cache:
                todo.setdefault(k, i)
        if todo:
            rows_todo = list(todo.values())
            out = self.captioner.query_outputs(fmri[rows_todo], subject).cpu()
            self.cache.update(zip(todo, out))
        return torch.stack([self.cache[k] for k in keys]).to(fmri.device)


__all__ = ["LatentHead", "LatentHeadConfig", "BrainRepresentation", "EXPORT_KIND"]
