"""The trained stage-2 model: fMRI -> caption, as one plain `nn.Module` that owns its files.

    fmri (B, V_s) --BrainEncoder--> brain tokens (B, N, D) --BrainQFormer (+ ridge readout bias)-->
        query outputs (B, Q, H) --LLMBridge--> soft prompt of a frozen causal LLM --> caption

`BrainCaptioner` holds the brain encoder, the Q-Former, the optional ridge readout and the optional
LLM bridge; `caption(fmri, subject, **generation)` writes captions (with BLIP-style reranking of the
LLM's candidates by the Q-Former), `query_outputs(fmri, subject)` is what stage 3 reads.
`save_pretrained(folder)` / `from_pretrained(folder)` write and read the stage-2 export
(docs/architecture.md, "Exports"; kind "brain_align"): the trained tensors, and the frozen parts
(the LLM, the Q-Former's tokenizer) by name. The stage-1 encoder is stored inside the folder, or —
for the stage hand-off when stage 2 did not change it — referenced by a path relative to the folder.
The stage-2 LightningModule (`mindsemantix.stages.align.BrainAlign`) builds one of these and adds
the losses; nothing here needs Lightning.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mindsemantix.export import ExportError, load_export, reference, resolve_reference, save_export
from mindsemantix.models.brain_encoder import BrainEncoder, BrainEncoderConfig
from mindsemantix.models.llm_bridge import LLMBridge, exclude_frozen_weights, tiny_random_causal_lm
from mindsemantix.models.pretrained import SMOLLM2, load_causal_lm
from mindsemantix.models.qformer import BrainQFormer, QFormerConfig, RidgeReadout

log = logging.getLogger(__name__)

EXPORT_KIND = "brain_align"
TINY_RANDOM_LLM = "random:tiny"  # a 2-layer random Llama: tests and dry runs only
RERANK_SCORES = ("itc", "itm")  # how `generation.rerank` picks among the LLM's candidates
DEFAULT_GENERATION = {"max_new_tokens": 30, "min_new_tokens": 1, "num_beams": 1, "do_sample": False}


@dataclass
class LLMSettings:
    """The frozen causal LLM and how the queries prompt it (see `LLMBridge`)."""

    name: str = SMOLLM2            # hub id, local folder, `offline:smollm2-135m-instruct`, `random:tiny`
    dtype: str = "float32"         # weight dtype of the frozen LLM
    prompt: str = ""               # text after the soft prompt
    add_bos: bool = True
    max_caption_tokens: int = 32
    lora: dict[str, Any] | None = None  # peft LoraConfig fields; None: the LLM untouched
    query_group: int = 1           # adjacent queries per soft-prompt vector (1 = BLIP-2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LLMSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})  # exports also record hidden_size


def load_llm(name_or_path: str, dtype: str = "float32"):
    """(model, tokenizer) through the project's loader; `random:tiny` builds a random test model."""
    if name_or_path == TINY_RANDOM_LLM:
        return tiny_random_causal_lm()
    return load_causal_lm(name_or_path, dtype=getattr(torch, dtype))


def build_bridge(settings: LLMSettings, query_width: int, num_queries: int) -> LLMBridge:
    if num_queries % settings.query_group:
        raise ValueError(f"query_group {settings.query_group} must divide the Q-Former's {num_queries} queries")
    model, tokenizer = load_llm(settings.name, settings.dtype)
    return LLMBridge(model, tokenizer, query_width, prompt=settings.prompt, add_bos=settings.add_bos,
                     max_caption_tokens=settings.max_caption_tokens, lora=settings.lora,
                     query_group=settings.query_group)


class BrainCaptioner(nn.Module):
    """fMRI -> query outputs -> caption. Build from its parts, or `from_pretrained(folder)`.

    brain_encoder: the stage-1 `BrainEncoder` (without MAE decoder); qformer: `BrainQFormer`;
    readout: per-subject ridge readout conditioning the queries (None: BLIP-2's Q-Former alone);
    bridge: the frozen LLM and its projection (None: captions from the Q-Former's ITG decoder);
    llm: the settings `bridge` was built from (recorded in the files); generation: default
    `LLMBridge.generate` settings plus `rerank` / `rerank_by` (see `caption`).
    """

    def __init__(self, brain_encoder: BrainEncoder, qformer: BrainQFormer, readout: RidgeReadout | None = None,
                 bridge: LLMBridge | None = None, llm: LLMSettings | None = None,
                 generation: dict[str, Any] | None = None):
        super().__init__()
        self.brain_encoder, self.qformer, self.readout, self.bridge = brain_encoder, qformer, readout, bridge
        self.llm = llm if bridge is not None else None
        self.generation = {**DEFAULT_GENERATION, **(generation or {})}
        if self.generation.get("rerank_by", "itc") not in RERANK_SCORES:
            raise ValueError(f"generation.rerank_by must be one of {RERANK_SCORES}, got {self.generation['rerank_by']!r}")
        # autograd through the encoder only where something in it trains (set by the training stage)
        self.encoder_trains = False
        self.trainable_subjects: set[str] = set()  # subjects whose encoder input layer trains

    @property
    def subjects(self) -> list[str]:
        return list(self.brain_encoder.subjects)

    # -- forward pieces --------------------------------------------------------------------------

    def brain_inputs(self, fmri: Tensor, subject: str) -> tuple[Tensor, Tensor | None]:
        """(B, V) -> brain tokens (B, N, D) and the readout's query bias (B, Q, H) or None. No
        autograd graph through the encoder unless it (or this subject's input layer) trains."""
        bias = self.readout(fmri, subject) if self.readout is not None else None
        trains = self.encoder_trains or subject in self.trainable_subjects
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            tokens = self.brain_encoder.forward_features(fmri, subject)
        return tokens, bias

    def query_outputs(self, fmri: Tensor, subject: str) -> Tensor:
        """(B, V) -> (B, Q, H): the brain representation that the LLM and stage 3 read."""
        return self.qformer.encode_brain(*self.brain_inputs(fmri, subject))

    @torch.no_grad()
    def caption(self, fmri: Tensor, subject: str, **generation: Any) -> list[str]:
        """One caption per sample: the LLM's (with a bridge) or the ITG decoder's (greedy).

        `rerank: K` has the LLM propose K captions (its K best beams, or K samples with
        `do_sample`) and keeps the one the Q-Former scores as the best match to this brain response,
        as BLIP ranks candidates: `rerank_by: itc` (default) by the brain-text contrastive
        similarity, `itm` by the matching head (only if a phase trained it)."""
        brain, bias = self.brain_inputs(fmri, subject)
        if self.bridge is None:
            return self.qformer.generate(brain, query_bias=bias)
        settings = {**self.generation, **generation}
        K, by = int(settings.pop("rerank", 0) or 0), settings.pop("rerank_by", "itc")
        if by not in RERANK_SCORES:
            raise ValueError(f"rerank_by must be one of {RERANK_SCORES}, got {by!r}")
        query_out = self.qformer.encode_brain(brain, bias)                            # (B, Q, H)
        if K <= 1:
            return self.bridge.generate(query_out, **settings)
        if not settings.get("do_sample"):
            settings["num_beams"] = max(K, settings.get("num_beams", 1))
        candidates = self.bridge.generate(query_out, **settings, num_return_sequences=K)  # B*K, sample-major
        scores = (self.itc_scores(query_out, candidates) if by == "itc"
                  else self.itm_scores(brain, bias, candidates))                       # (B*K,)
        best = scores.view(-1, K).argmax(1)                                            # (B,)
        return [candidates[i * K + j] for i, j in enumerate(best.tolist())]

    @torch.no_grad()
    def itc_scores(self, query_out: Tensor, candidates: list[str]) -> Tensor:
        """Brain-text similarity (max over queries of the cosine, as ITC) of each of K candidates per
        sample: query_out (B, Q, H), B*K captions sample-major -> (B*K,)."""
        ids, mask = self.qformer.tokenize([c or "." for c in candidates], query_out.device)      # (B*K, T)
        text = self.qformer.text_embedding(self.qformer.encode_text(ids, mask), mask)           # (B*K, E)
        brain = self.qformer.brain_embedding(query_out)                                         # (B, Q, E)
        brain = brain.repeat_interleave(len(candidates) // len(query_out), dim=0)               # (B*K, Q, E)
        return torch.einsum("nqe,ne->nq", brain, text).amax(1)

    @torch.no_grad()
    def itm_scores(self, brain: Tensor, bias: Tensor | None, candidates: list[str]) -> Tensor:
        """ITM match probability of each of K candidates per sample: brain (B, N, D) -> (B*K,)."""
        K = len(candidates) // len(brain)
        ids, mask = self.qformer.tokenize([c or "." for c in candidates], brain.device)         # (B*K, T)
        repeat = lambda x: None if x is None else x.repeat_interleave(K, dim=0)  # noqa: E731
        query_out, _ = self.qformer.encode_joint(repeat(brain), ids, mask, causal=False, query_bias=repeat(bias))
        return self.qformer.itm_logits(query_out).softmax(-1)[:, 1]

    # -- files -----------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, *, brain_encoder_source: str | Path | None = None,
                        extra: dict[str, Any] | None = None) -> Path:
        """Write `folder/config.json` + `folder/model.safetensors` (kind "brain_align").

        The brain encoder's tensors go inside, unless `brain_encoder_source` names the stage-1
        export they are unchanged from: then the config refers to it by a path relative to `folder`
        (the stage hand-off; moving the run folder as a whole keeps it loadable). `extra`: further
        config entries (the stage records its phase and loss weights)."""
        folder = Path(folder)
        tensors = {f"qformer.{k}": v for k, v in self.qformer.state_dict().items()}
        if brain_encoder_source is None:
            brain_cfg: dict[str, Any] = {"source": None, "fine_tuned": True, "config": asdict(self.brain_encoder.config),
                                         "subjects": self.brain_encoder.subjects}
            tensors.update({f"brain_encoder.{k}": v for k, v in all_tensors(self.brain_encoder).items()})
        else:
            brain_cfg = {"source": reference(brain_encoder_source, folder), "fine_tuned": False}
        config: dict[str, Any] = {
            "phase": "generative" if self.bridge is not None else "representation",
            **(extra or {}),
            "qformer": self.qformer.config.to_dict(), "vision_dim": self.qformer.vision_dim,
            "brain_width": self.brain_encoder.config.width, "brain_encoder": brain_cfg,
            "generation": self.generation,
        }
        if self.readout is not None:
            tensors.update({f"readout.{k}": v for k, v in self.readout.state_dict().items()})
            config["readout"] = {"dim": self.readout.dim, "subjects": {s: int(m.weight.shape[0])
                                                                       for s, m in self.readout.maps.items()}}
        if self.bridge is not None:
            # the projection and the LoRA adapters, trained; the LLM's own weights come from its source.
            # Not bridge.state_dict(): that leaves out whatever is frozen now (all of it after from_pretrained)
            tensors.update({f"bridge.{k}": v for k, v in all_tensors(self.bridge).items()
                            if not k.startswith("llm.") or ".lora_" in k})
            config["llm"] = {**asdict(self.llm), "hidden_size": self.bridge.proj.out_features}
        return save_export(folder, EXPORT_KIND, config, tensors)

    @classmethod
    def from_pretrained(cls, folder: str | Path, load_llm: bool = True, brain_encoder: str | Path | None = None,
                        load_text_weights: bool = False) -> "BrainCaptioner":
        """Rebuild from a brain_align export, frozen and in eval mode. `load_llm=False` skips the LLM
        (query outputs and ITG captions only). `brain_encoder` overrides the stage-1 export the
        folder refers to (exports written before paths were relative may name a folder that moved)."""
        config, tensors = load_export(folder, EXPORT_KIND)
        model = cls.from_export_parts(folder, config, tensors, load_llm=load_llm, brain_encoder=brain_encoder,
                                      load_text_weights=load_text_weights)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_export_parts(cls, folder: str | Path, config: dict[str, Any], tensors: dict[str, Tensor], *,
                          load_llm: bool = True, brain_encoder: str | Path | None = None,
                          load_text_weights: bool = False, llm: LLMSettings | None = None) -> "BrainCaptioner":
        """`from_pretrained` on an export already read (the stage continues training from it).
        `llm` builds the bridge from these settings instead of the export's (phase 1 -> phase 2)."""
        encoder = load_brain_encoder(folder, config, tensors, override=brain_encoder)
        exclude_frozen_weights(encoder)
        # frozen parts a bundle carries inside are named relative to the folder ("./frozen/...")
        qcfg = {k: resolve_reference(v, folder) if k in ("tokenizer", "text_init") and isinstance(v, str) else v
                for k, v in config["qformer"].items()}
        qformer = BrainQFormer(QFormerConfig.from_dict(qcfg), encoder.config.width,
                               config.get("vision_dim"), load_text_weights=load_text_weights)
        load_prefixed(qformer, tensors, "qformer.", folder)
        readout = None
        if "readout.token_ids" in tensors:
            readout = RidgeReadout(tensors["readout.token_ids"], qformer.config.num_queries, qformer.config.hidden_size)
            for name, n_voxels in config["readout"]["subjects"].items():
                readout.add_subject(name, n_voxels)
            load_prefixed(readout, tensors, "readout.", folder)
        bridge = None
        if llm is None and load_llm and config.get("llm"):
            llm = LLMSettings.from_dict({**config["llm"], "name": resolve_reference(config["llm"]["name"], folder)})
        if llm is not None:
            bridge = build_bridge(llm, qformer.config.hidden_size, qformer.config.num_queries)
            if any(k.startswith("bridge.") for k in tensors):
                load_prefixed(bridge, tensors, "bridge.", folder)
        return cls(encoder, qformer, readout, bridge, llm, config.get("generation"))


def load_brain_encoder(folder: str | Path, config: dict[str, Any], tensors: dict[str, Tensor],
                       override: str | Path | None = None) -> BrainEncoder:
    """The brain encoder a brain_align export holds, or the stage-1 export it refers to (a path
    relative to the export folder; absolute in exports written before that)."""
    cfg = config.get("brain_encoder", {})
    if cfg.get("fine_tuned"):  # the export's own (fine-tuned) encoder wins over any stage-1 export
        encoder = BrainEncoder(BrainEncoderConfig.from_dict(cfg["config"]), with_decoder=False)
        state = {k[len("brain_encoder."):]: v for k, v in tensors.items() if k.startswith("brain_encoder.")}
        for s in cfg["subjects"]:
            encoder.add_subject(s, state[f"tokenizers.{s}.coords_mm"])
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ExportError(f"export {folder}: brain encoder weights do not fit (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
        return encoder
    return BrainEncoder.from_pretrained(brain_encoder_path(folder, config, override), with_decoder=False)


def brain_encoder_path(folder: str | Path, config: dict[str, Any], override: str | Path | None = None) -> Path:
    """The stage-1 export a brain_align export refers to: `override`, else its recorded path
    (relative to the export folder; absolute in exports written before paths were relative)."""
    if override:
        return Path(override)
    source = config.get("brain_encoder", {}).get("source")
    if not source:
        raise ExportError(f"export {folder} holds no brain encoder and names no stage-1 export")
    return Path(resolve_reference(source, folder))


def load_prefixed(module: nn.Module, tensors: dict[str, Tensor], prefix: str, folder: str | Path) -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"export {folder}: {prefix[:-1]} weights do not fit this model (missing "
                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")


def all_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and persistent buffer by state-dict name, bypassing state-dict hooks (which
    leave frozen weights out of checkpoints)."""
    out = {n: p.detach() for n, p in module.named_parameters()}
    for mod_name, mod in module.named_modules():
        for b_name, b in mod.named_buffers(recurse=False):
            if b_name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{b_name}" if mod_name else b_name] = b
    return out


__all__ = ["BrainCaptioner", "LLMSettings", "EXPORT_KIND", "DEFAULT_GENERATION", "RERANK_SCORES",
           "TINY_RANDOM_LLM", "load_llm", "build_bridge", "load_brain_encoder", "all_tensors"]
