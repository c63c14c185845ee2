"""Stage 2: align the brain with language (BLIP-2's two phases), as one LightningModule `BrainAlign`.

    fmri (B, V_s) --stage-1 BrainEncoder--> brain tokens (B, N, D) --BrainQFormer--> queries (B, Q, H)
       phase "representation": ITC + ITM + ITG against the caption (+ brain-vision alignment), no LLM
       phase "generative":     queries --Linear--> soft prompt of a frozen causal LLM, LM loss on the caption

The generative phase starts from the representation phase's export (`init_from`), as BLIP-2's
second stage starts from its first: a soft prompt learnt from a raw brain representation converges
far more slowly (../shared/MEASURED.md). Both phases are this one class; `phase` picks the default
loss weights and whether the LLM is loaded. Any weight can be set in `loss_weights` (e.g. keep ITC
on in the generative phase).

Frozen parts (the LLM, the vision encoder, the brain encoder unless `train_brain_encoder`) never
enter `state_dict()`, so neither Lightning checkpoints nor exports hold them; they are reloaded from
their source (hub id / path / stage-1 export). Export (Contract 3, kind "brain_align"):
`save_export(folder)` writes the Q-Former, the LLM projection (+ LoRA), the brain encoder if it was
fine-tuned (else a reference to the stage-1 export), and the names and settings needed to rebuild
everything; `BrainAlign.from_export(folder)` rebuilds a ready model (stage 3 uses
`query_outputs(fmri, subject)` and `caption(fmri, subject)`).

Captions: `predict` (with the `CaptionWriter` callback) writes one JSONL line {"key", "caption"} per
sample. In the generative phase they come from the LLM (`generation` settings); in the
representation phase from the Q-Former's own ITG decoder (greedy) — a useful check of phase 1.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from mindsemantix.export import load_export, save_export
from mindsemantix.io import write_bytes_atomic
from mindsemantix.models.brain_encoder import BrainEncoder, BrainEncoderConfig
from mindsemantix.models.llm_bridge import LLMBridge, exclude_frozen_weights, tiny_random_causal_lm
from mindsemantix.models.pretrained import SMOLLM2, load_causal_lm, load_vision_encoder
from mindsemantix.models.qformer import (BrainQFormer, FeatureQueue, QFormerConfig, RidgeReadout,
                                         caption_word_targets, representation_losses, vision_alignment_loss)
from mindsemantix.stages.base import StageModule

log = logging.getLogger(__name__)

EXPORT_KIND = "brain_align"
PHASES = ("representation", "generative")
LOSSES = ("itc", "itm", "itg", "vision", "lm")
TINY_RANDOM_LLM = "random:tiny"  # a 2-layer random Llama: tests and dry runs only
RERANK_SCORES = ("itc", "itm")  # how `generation.rerank` picks among the LLM's candidates
DEFAULT_GENERATION = {"max_new_tokens": 30, "min_new_tokens": 1, "num_beams": 1, "do_sample": False}


def default_loss_weights(phase: str, vision: bool) -> dict[str, float]:
    if phase == "representation":
        return {"itc": 1.0, "itm": 1.0, "itg": 1.0, "vision": 1.0 if vision else 0.0, "lm": 0.0}
    return {"itc": 0.0, "itm": 0.0, "itg": 0.0, "vision": 0.0, "lm": 1.0}


def load_llm(name_or_path: str, dtype: str = "float32"):
    """(model, tokenizer) through the project's loader; `random:tiny` builds a random test model."""
    if name_or_path == TINY_RANDOM_LLM:
        return tiny_random_causal_lm()
    return load_causal_lm(name_or_path, dtype=getattr(torch, dtype))


class BrainAlign(StageModule):
    """Stage-2 LightningModule. Arguments (all settable from the YAML config):

    brain_encoder: stage-1 export folder (kind "brain_encoder"). May be omitted with `init_from`.
    train_brain_encoder: fine-tune it (else frozen; subjects it does not know still get trained
        input layers). brain_encoder_lr_scale: its learning rate relative to `lr`.
    phase: "representation" (Q-Former alone) or "generative" (through the frozen LLM).
    init_from: a brain_align export to start from (phase 1 -> phase 2, or for predicting).
    qformer: QFormerConfig fields (ignored with `init_from`: the architecture is the export's).
    loss_weights: overrides of the phase's defaults, keys itc / itm / itg / vision / lm.
    queue_size: earlier samples kept as extra contrastive negatives (0 = in-batch and other ranks
        only); used from `queue_start_step` on (default: after warm-up; stale features of a model
        that is still changing fast stall ITC).
    readout_dim: > 0 adds the ridge readout (`RidgeReadout`): per-subject closed-form maps from voxels
        to the word content of the captions (this many frequent tokens), fitted on the training split
        in `setup`, conditioning the queries. 0 = BLIP-2's Q-Former alone.
    llm, llm_dtype, prompt, add_bos, max_caption_tokens, lora, query_group: the frozen causal LLM
        (hub id, path, `offline:smollm2-135m-instruct`), its weight dtype, text after the soft
        prompt, caption length limit, optional LoRA (peft LoraConfig fields), adjacent queries per
        soft-prompt vector (`LLMBridge`; 1 = BLIP-2).
    vision_encoder: frozen image encoder for the brain-vision loss (None: no vision loss).
    generation: `LLMBridge.generate` settings (max_new_tokens, num_beams, do_sample, ...).
    lr, weight_decay, warmup_steps, **kwargs: optimisation, `export_dir` (written at the end of
        fit) and the non-finite-loss policy of StageModule.
    """

    frozen_prefixes = ("vision_encoder.",)  # the LLM and brain encoder: see exclude_frozen_weights

    def __init__(self, brain_encoder: str | None = None, train_brain_encoder: bool = False,
                 brain_encoder_lr_scale: float = 0.1, phase: str = "representation", init_from: str | None = None,
                 qformer: dict[str, Any] | None = None, loss_weights: dict[str, float] | None = None,
                 queue_size: int = 0, queue_start_step: int | None = None, readout_dim: int = 0, llm: str = SMOLLM2, llm_dtype: str = "float32", prompt: str = "",
                 add_bos: bool = True, max_caption_tokens: int = 32, lora: dict[str, Any] | None = None,
                 query_group: int = 1, vision_encoder: str | None = None, generation: dict[str, Any] | None = None,
                 lr: float = 1e-4, weight_decay: float = 0.05, warmup_steps: int = 100, **kwargs: Any):
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, **kwargs)
        self.save_hyperparameters()
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        unknown = sorted(set(loss_weights or {}) - set(LOSSES))
        if unknown:
            raise ValueError(f"loss_weights: unknown {unknown}; known: {list(LOSSES)}")
        self.phase = phase
        self.weights = {**default_loss_weights(phase, vision_encoder is not None), **(loss_weights or {})}
        self.generation = {**DEFAULT_GENERATION, **(generation or {})}
        if self.generation.get("rerank_by", "itc") not in RERANK_SCORES:
            raise ValueError(f"generation.rerank_by must be one of {RERANK_SCORES}, got {self.generation['rerank_by']!r}")
        self.train_brain_encoder = train_brain_encoder

        init_config, init_tensors = load_export(init_from, EXPORT_KIND) if init_from else ({}, {})

        # Brain encoder: fine-tuned weights in the init export, else the stage-1 export.
        self.brain_encoder_source = brain_encoder or init_config.get("brain_encoder", {}).get("source")
        # True when the weights are no longer the stage-1 export's (then the export stores them)
        self.brain_encoder_changed = bool(init_config.get("brain_encoder", {}).get("fine_tuned"))
        if self.brain_encoder_changed:
            self.brain_encoder = _brain_encoder_from_tensors(init_config["brain_encoder"], init_tensors, init_from)
        elif self.brain_encoder_source:
            self.brain_encoder = BrainEncoder.from_pretrained(self.brain_encoder_source, with_decoder=False)
        else:
            raise ValueError("brain_encoder: give the stage-1 export folder (or init_from a brain_align export)")
        self.brain_encoder.requires_grad_(train_brain_encoder)
        self.new_subjects: set[str] = set()
        exclude_frozen_weights(self.brain_encoder)

        # Vision encoder (frozen, features cached per image id).
        self.vision_encoder = None
        if self.weights["vision"] > 0:
            if vision_encoder is None:
                raise ValueError("loss_weights.vision > 0 needs a vision_encoder")
            self.vision_encoder = exclude_frozen_weights(load_vision_encoder(vision_encoder).requires_grad_(False))
        self._vision_cache: dict[int, Tensor] = {}

        # Q-Former: the export's architecture when continuing from one.
        if init_from:
            if qformer:
                log.warning("init_from is set: the Q-Former architecture comes from %s, `qformer` is ignored", init_from)
            qcfg = QFormerConfig.from_dict(init_config["qformer"])
            vision_dim = init_config.get("vision_dim")
        else:
            qcfg = QFormerConfig.from_dict(qformer)
            vision_dim = self.vision_encoder.dim if self.vision_encoder is not None else None
        if self.vision_encoder is not None and vision_dim != self.vision_encoder.dim:
            raise ValueError(f"the Q-Former's vision heads expect {vision_dim}-d features, "
                             f"{vision_encoder} gives {self.vision_encoder.dim}")
        self.qformer = BrainQFormer(qcfg, self.brain_encoder.config.width, vision_dim,
                                    load_text_weights=not init_from)
        self.qformer.set_trainable(itc=self.weights["itc"] > 0, itm=self.weights["itm"] > 0,
                                   itg=self.weights["itg"] > 0, vision=self.weights["vision"] > 0)
        if init_from:
            _load_prefixed(self.qformer, init_tensors, "qformer.", init_from)
        self.readout: RidgeReadout | None = None
        if "readout.token_ids" in init_tensors:
            self.readout = RidgeReadout(init_tensors["readout.token_ids"], qcfg.num_queries, self.qformer.config.hidden_size)
            for name, n_voxels in init_config["readout"]["subjects"].items():
                self.readout.add_subject(name, n_voxels)
            _load_prefixed(self.readout, init_tensors, "readout.", init_from)
        E = self.qformer.config.embed_dim
        self.itc_queue = FeatureQueue(queue_size, qcfg.num_queries, E)
        self.vision_queue = FeatureQueue(queue_size, qcfg.num_queries, E)

        # LLM: needed for the LM loss and for captions in the generative phase.
        self.bridge = None
        if phase == "generative" or self.weights["lm"] > 0:
            llm_cfg = init_config.get("llm") if init_config.get("phase") == "generative" else None
            if llm_cfg:  # continuing a generative run: the LLM side must be the exported one
                llm, llm_dtype, prompt, add_bos = llm_cfg["name"], llm_cfg["dtype"], llm_cfg["prompt"], llm_cfg["add_bos"]
                max_caption_tokens, lora = llm_cfg["max_caption_tokens"], llm_cfg["lora"]
                query_group = llm_cfg.get("query_group", 1)
            if qcfg.num_queries % query_group:
                raise ValueError(f"query_group {query_group} must divide the Q-Former's {qcfg.num_queries} queries")
            model, tokenizer = load_llm(llm, llm_dtype)
            self.bridge = LLMBridge(model, tokenizer, self.qformer.config.hidden_size, prompt=prompt, add_bos=add_bos,
                                    max_caption_tokens=max_caption_tokens, lora=lora, query_group=query_group)
            self.llm_settings = {"name": llm, "dtype": llm_dtype, "prompt": prompt, "add_bos": add_bos,
                                 "max_caption_tokens": max_caption_tokens, "lora": lora, "query_group": query_group}
            if any(k.startswith("bridge.") for k in init_tensors):
                _load_prefixed(self.bridge, init_tensors, "bridge.", init_from)

    # -- set-up ------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Subjects of the data that the brain encoder does not know get new (trained) input layers."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "subject_info"):
            return
        for name, info in datamodule.subject_info().items():
            if self.brain_encoder.add_subject(name, info.coords_mm):
                self.new_subjects.add(name)
                for p in self.brain_encoder.subject_parameters(name):
                    p.requires_grad_(True)
                log.info("subject %s is new to the brain encoder: its input layer trains from scratch", name)
        if stage == "fit" and (self.hparams.readout_dim > 0 or self.readout is not None):
            self.fit_readout(datamodule)

    def fit_readout(self, datamodule) -> None:
        """Fit the ridge readout of every subject that has none, on the training split only."""
        from mindsemantix.data.shards import ShardError
        from mindsemantix.eval.baselines import load_split_arrays

        subjects = datamodule.subject_info()
        todo = [s for s in subjects if self.readout is None or not self.readout.fitted(s)]
        if not todo:
            return
        train = {}
        for root in datamodule.roots:
            try:
                arrays = load_split_arrays(root, "train")
            except (ValueError, KeyError, ShardError):  # no training split or no captions: nothing to add
                continue
            train.update({s: a for s, a in arrays.items() if s in todo and a.captions})
        if self.readout is None:  # the readout's vocabulary: frequent tokens of all training captions
            token_ids, _ = caption_word_targets([c for a in train.values() for c in a.captions],
                                                self.qformer.tokenizer, self.hparams.readout_dim)
            self.readout = RidgeReadout(token_ids, self.qformer.config.num_queries,
                                        self.qformer.config.hidden_size).to(self.device)
        for s, a in train.items():
            _, targets = caption_word_targets(a.captions, self.qformer.tokenizer, self.readout.token_ids.cpu())
            alpha = self.readout.fit_subject(s, a.x, targets.numpy())
            log.info("ridge readout for %s: %d samples, %d voxels, penalty %.3g", s, len(a.x), a.x.shape[1], alpha)

    def train(self, mode: bool = True) -> "BrainAlign":
        """Frozen parts stay in eval mode (no dropout, no batch-statistics updates)."""
        super().train(mode)
        if self.bridge is not None:
            self.bridge.llm.eval()
        if self.vision_encoder is not None:
            self.vision_encoder.eval()
        if not self.train_brain_encoder:
            self.brain_encoder.eval()
        return self

    # -- forward pieces ------------------------------------------------------------------------------

    def brain_inputs(self, fmri: Tensor, subject: str) -> tuple[Tensor, Tensor | None]:
        """(B, V) -> brain tokens (B, N, D) and the readout's query bias (B, Q, H) or None."""
        bias = self.readout(fmri, subject) if self.readout is not None else None
        return self.brain_tokens(fmri, subject), bias

    def brain_tokens(self, fmri: Tensor, subject: str) -> Tensor:
        """(B, V) -> (B, N, D); no autograd graph through a frozen encoder."""
        trains = self.train_brain_encoder or subject in self.new_subjects
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            return self.brain_encoder.forward_features(fmri, subject)

    def query_outputs(self, fmri: Tensor, subject: str) -> Tensor:
        """(B, V) -> (B, Q, H): the brain representation that stage 3 and the LLM read."""
        return self.qformer.encode_brain(*self.brain_inputs(fmri, subject))

    @torch.no_grad()
    def caption(self, fmri: Tensor, subject: str, **generation: Any) -> list[str]:
        """One caption per sample: the LLM's (generative phase) or the ITG decoder's.

        `rerank: K` in the generation settings has the LLM propose K captions (its K best beams, or
        K samples with `do_sample`) and keeps the one the Q-Former scores as the best match to this
        brain response, as BLIP ranks candidates: `rerank_by: itc` (default) by the brain-text
        contrastive similarity, `itm` by the matching head (only if a phase trained it)."""
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

    def vision_features(self, batch: dict[str, Any]) -> Tensor:
        """(B, vision_dim) pooled features of the seen images, computed once per image id."""
        if "image" not in batch:
            raise KeyError("the brain-vision loss needs the seen images: add `image` to data.init_args.fields")
        ids = batch["image_id"].tolist()
        todo = [i for i, image_id in enumerate(ids) if image_id not in self._vision_cache]
        if todo:
            # one image at a time: batched convolutions' last bits depend on the batch, and a resumed run
            # meets an image in another batch than the uninterrupted run (exact resume)
            pooled = torch.cat([self.vision_encoder(im[None]).pooled for im in batch["image"][todo]]).float().cpu()
            for i, feat in zip(todo, pooled):
                self._vision_cache[ids[i]] = feat
        return torch.stack([self._vision_cache[i] for i in ids]).to(self.device)

    # -- losses --------------------------------------------------------------------------------------

    def compute_losses(self, batch: dict[str, Any], train: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        w = self.weights
        if train:  # a fresh reference caption per sample and step
            picks = torch.randint(0, 1 << 30, (len(batch["captions"]),)).tolist()
            captions = [c[p % len(c)] for c, p in zip(batch["captions"], picks)]
        else:
            captions = [c[0] for c in batch["captions"]]
        image_ids = batch["image_id"].to(self.device)
        brain, bias = self.brain_inputs(batch["fmri"], batch["subject"])              # (B, N, D), (B, Q, H)
        losses: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}
        start = self.hparams.warmup_steps if self.hparams.queue_start_step is None else self.hparams.queue_start_step
        use_queue = train and self._trainer is not None and self.global_step >= start
        if w["itc"] > 0 or w["itm"] > 0 or w["itg"] > 0:
            rep = representation_losses(self.qformer, brain, captions, image_ids, itc=w["itc"] > 0,
                                        itm=w["itm"] > 0, itg=w["itg"] > 0, queue=self.itc_queue if use_queue else None,
                                        query_bias=bias)
            losses.update(rep.losses)
            metrics.update(rep.metrics)
            if w["itm"] > 0 and "itm" not in rep.losses:  # no negative in this batch: keep DDP's graph whole
                losses["itm"] = sum(p.sum() for p in self.qformer.itm_head.parameters()) * 0.0
            query_out = rep.query_out
        else:
            query_out = self.qformer.encode_brain(brain, bias)                        # (B, Q, H)
        if w["vision"] > 0:
            vis = vision_alignment_loss(self.qformer, query_out, self.vision_features(batch), image_ids,
                                        queue=self.vision_queue if use_queue else None)
            losses["vision"] = vis.loss
            metrics["vision_acc"] = vis.accuracy
        if w["lm"] > 0:
            losses["lm"] = self.bridge.lm_loss(query_out, captions)
        return losses, metrics

    def _step(self, batch: dict[str, Any], stage: str) -> Tensor:
        losses, metrics = self.compute_losses(batch, train=stage == "train")
        total = sum(self.weights[k] * v for k, v in losses.items())
        B = len(batch["key"])
        self.log(f"{stage}/loss", total, prog_bar=True, batch_size=B, sync_dist=stage != "train")
        self.log_dict({f"{stage}/{k}": v for k, v in {**losses, **metrics}.items()}, batch_size=B,
                      sync_dist=stage != "train")
        return total

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        return self.guard_loss(self._step(batch, "train"), batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        captions = self.caption(batch["fmri"], batch["subject"])
        return [{"key": k, "caption": c} for k, c in zip(batch["key"], captions)]

    # -- optimisation ------------------------------------------------------------------------------

    def lr_scales(self) -> dict[int, float]:
        """The brain encoder (when it trains) at lr * brain_encoder_lr_scale."""
        return {id(p): self.hparams.brain_encoder_lr_scale for p in self.brain_encoder.parameters()}

    def decays(self, name: str, param: nn.Parameter) -> bool:
        """No weight decay on biases, norms, query tokens, temperatures and embedding tables."""
        return param.ndim >= 2 and "query_tokens" not in name and "embeddings" not in name

    # -- export (Contract 3) ------------------------------------------------------------------------

    def export(self, folder: str | Path) -> Path:  # StageModule writes it at the end of fit
        return self.save_export(folder)

    def save_export(self, folder: str | Path) -> Path:
        fine_tuned = self.brain_encoder_changed or self.train_brain_encoder or bool(self.new_subjects)
        tensors = {f"qformer.{k}": v for k, v in self.qformer.state_dict().items()}
        brain_cfg: dict[str, Any] = {"source": str(Path(self.brain_encoder_source).resolve()) if self.brain_encoder_source
                                     else None, "fine_tuned": fine_tuned}
        if fine_tuned:  # whole encoder (incl. subject layers it did not have), so stage 3 needs no stage-1 export
            tensors.update({f"brain_encoder.{k}": v for k, v in _all_tensors(self.brain_encoder).items()})
            brain_cfg.update({"config": asdict(self.brain_encoder.config), "subjects": self.brain_encoder.subjects})
        config: dict[str, Any] = {
            "phase": self.phase, "qformer": self.qformer.config.to_dict(), "vision_dim": self.qformer.vision_dim,
            "brain_width": self.brain_encoder.config.width, "brain_encoder": brain_cfg,
            "loss_weights": self.weights, "generation": self.generation,
        }
        if self.readout is not None:
            tensors.update({f"readout.{k}": v for k, v in self.readout.state_dict().items()})
            config["readout"] = {"dim": self.readout.dim, "subjects": {s: int(m.weight.shape[0])
                                                                       for s, m in self.readout.maps.items()}}
        if self.bridge is not None:
            tensors.update({f"bridge.{k}": v for k, v in self.bridge.state_dict().items()})
            config["llm"] = {**self.llm_settings, "hidden_size": self.bridge.proj.out_features}
        return save_export(folder, EXPORT_KIND, config, tensors)

    @classmethod
    def from_export(cls, folder: str | Path, load_llm: bool = True, brain_encoder: str | None = None,
                    **overrides: Any) -> "BrainAlign":
        """A ready model from a brain_align export (eval mode). `load_llm=False` skips the LLM
        (query outputs only). `brain_encoder` overrides the stage-1 export path if it moved."""
        config, _ = load_export(folder, EXPORT_KIND)
        phase = config["phase"] if load_llm else "representation"
        kwargs: dict[str, Any] = {"init_from": str(folder), "phase": phase, "brain_encoder": brain_encoder,
                                  "loss_weights": {k: 0.0 for k in LOSSES}, "generation": config.get("generation")}
        if phase == "generative":
            llm = config["llm"]
            kwargs.update(llm=llm["name"], llm_dtype=llm["dtype"], prompt=llm["prompt"], add_bos=llm["add_bos"],
                          max_caption_tokens=llm["max_caption_tokens"], lora=llm["lora"],
                          query_group=llm.get("query_group", 1))
        return cls(**{**kwargs, **overrides}).eval()


def _all_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and persistent buffer by state-dict name, bypassing state-dict hooks."""
    out = {n: p.detach() for n, p in module.named_parameters()}
    for mod_name, mod in module.named_modules():
        for b_name, b in mod.named_buffers(recurse=False):
            if b_name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{b_name}" if mod_name else b_name] = b
    return out


def _brain_encoder_from_tensors(cfg: dict[str, Any], tensors: dict[str, Tensor], folder: str) -> BrainEncoder:
    """Rebuild a fine-tuned brain encoder stored inside a brain_align export."""
    encoder = BrainEncoder(BrainEncoderConfig.from_dict(cfg["config"]), with_decoder=False)
    state = {k[len("brain_encoder."):]: v for k, v in tensors.items() if k.startswith("brain_encoder.")}
    for s in cfg["subjects"]:
        encoder.add_subject(s, state[f"tokenizers.{s}.coords_mm"])
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"export {folder}: brain encoder weights do not fit (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return encoder


def _load_prefixed(module: nn.Module, tensors: dict[str, Tensor], prefix: str, folder: str) -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"export {folder}: {prefix[:-1]} weights do not fit this model (missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")


class CaptionWriter(Callback):
    """Collects `predict_step` outputs ({"key", "caption"} rows) on every rank and writes them, once,
    sorted by key, to a JSONL file (atomically, from rank 0); default `<default_root_dir>/captions.jsonl`."""

    def __init__(self, path: str | None = None):
        self.path = Path(path) if path else None
        self.rows: list[dict[str, str]] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows.extend(outputs)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self.rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[dict[str, str]] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in (part or [])]
        if trainer.is_global_zero:
            path = self.path or Path(trainer.default_root_dir) / "captions.jsonl"
            by_key = {r["key"]: r["caption"] for r in rows}
            text = "".join(json.dumps({"key": k, "caption": by_key[k]}) + "\n" for k in sorted(by_key))
            write_bytes_atomic(path, text.encode())
            print(f"captions: wrote {len(by_key)} to {path}")


__all__ = ["BrainAlign", "CaptionWriter", "EXPORT_KIND", "default_loss_weights", "load_llm"]
