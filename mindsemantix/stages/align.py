"""Stage 2: align the brain with language (BLIP-2's two phases), as one LightningModule `BrainAlign`.

    fmri (B, V_s) --stage-1 BrainEncoder--> brain tokens (B, N, D) --BrainQFormer--> queries (B, Q, H)
       phase "representation": ITC + ITM + ITG against the caption (+ brain-vision alignment), no LLM
       phase "generative":     queries --Linear--> soft prompt of a frozen causal LLM, LM loss on the caption

The generative phase starts from the representation phase's export (`init_from`), as BLIP-2's
second stage starts from its first: a soft prompt learnt from a raw brain representation converges
far more slowly (docs/stage2.md, "Why two phases, and a real LLM"). Both phases are this one class; `phase` picks the default
loss weights and whether the LLM is loaded. Any weight can be set in `loss_weights` (e.g. keep ITC
on in the generative phase).

Frozen parts (the LLM, the vision encoder, the brain encoder unless `train_brain_encoder`) never
enter `state_dict()`, so neither Lightning checkpoints nor exports hold them; they are reloaded from
their source (hub id / path / stage-1 export). Export (docs/formats.md, kind "brain_align"):
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from mindsemantix.export import load_export
from mindsemantix.io import gather_rows, write_bytes_atomic
from mindsemantix.models.brain_encoder import BrainEncoder
from mindsemantix.models.frozen_features import FrozenFeatures
from mindsemantix.models.captioner import (EXPORT_KIND, RERANK_SCORES, TINY_RANDOM_LLM,  # noqa: F401 (re-exported)
                                           BrainCaptioner, LLMSettings, brain_encoder_path, build_bridge, load_llm)
from mindsemantix.models.llm_bridge import GenerationSettings, LLMBridge, LoraSettings, exclude_frozen_weights
from mindsemantix.models.pretrained import SMOLLM2, load_vision_encoder
from mindsemantix.models.qformer import (BrainQFormer, FeatureQueue, QFormerConfig, RidgeReadout,
                                         caption_word_targets, representation_losses, vision_alignment_loss)
from mindsemantix.stages.base import WeightedLossStage, as_dict, settings

log = logging.getLogger(__name__)

PHASES = ("representation", "generative")
LOSSES = ("itc", "itm", "itg", "vision", "lm")


@dataclass(frozen=True)
class LossWeights:
    """Weights of stage 2's losses; a field left null keeps the phase's default (representation:
    itc, itm, itg 1, vision 1 with a vision_encoder, lm 0; generative: lm 1, the others 0).

    Args:
        itc: brain-text contrastive loss (BLIP-2's ITC).
        itm: brain-text matching loss, with hard negatives (ITM).
        itg: the Q-Former's own caption decoder (ITG).
        vision: brain-vision contrastive loss against the frozen vision encoder's features.
        lm: the frozen LLM's caption loss through the soft prompt.
    """

    itc: float | None = None
    itm: float | None = None
    itg: float | None = None
    vision: float | None = None
    lm: float | None = None


def default_loss_weights(phase: str, vision: bool) -> dict[str, float]:
    if phase == "representation":
        return {"itc": 1.0, "itm": 1.0, "itg": 1.0, "vision": 1.0 if vision else 0.0, "lm": 0.0}
    return {"itc": 0.0, "itm": 0.0, "itg": 0.0, "vision": 0.0, "lm": 1.0}


class BrainAlign(WeightedLossStage):
    """Stage-2 LightningModule (all arguments settable from the YAML config).

    Args:
        brain_encoder: stage-1 export folder (kind "brain_encoder"). May be omitted with `init_from`.
        train_brain_encoder: fine-tune the brain encoder (else frozen; subjects it does not know
            still get trained input layers).
        brain_encoder_lr_scale: the brain encoder's learning rate relative to `lr`.
        phase: "representation" (Q-Former alone) or "generative" (through the frozen LLM).
        init_from: a brain_align export to start from (phase 1 -> phase 2, or for predicting).
        qformer: the Q-Former's architecture (fields below); ignored with `init_from`, whose
            architecture it keeps.
        loss_weights: changes to the phase's default loss weights (fields below).
        queue_size: earlier samples kept as extra contrastive negatives (0 = in-batch and other
            ranks only).
        queue_start_step: the step from which the queue is used (null: after warm-up; stale
            features of a model that is still changing fast stall ITC).
        readout_dim: > 0 adds the ridge readout (`RidgeReadout`): per-subject closed-form maps from
            voxels to the word content of the captions (this many frequent tokens), fitted on the
            training split in `setup`, conditioning the queries. 0 = BLIP-2's Q-Former alone.
        llm: the frozen causal LLM: hub id, local folder, `offline:smollm2-135m-instruct`, or
            `random:tiny` (a random 2-layer model for tests and dry runs).
        llm_dtype: the LLM's weight dtype ("float32", "bfloat16", "float16").
        prompt: text after the soft prompt (e.g. "A photo of"); "" for none.
        add_bos: start the LLM's input with its BOS token.
        max_caption_tokens: captions are cut to this many LLM tokens in training.
        lora: LoRA adapters on the LLM, peft LoraConfig fields r, lora_alpha, lora_dropout,
            target_modules, bias (e.g. {r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]});
            null: the LLM untouched.
        query_group: adjacent queries per soft-prompt vector (`LLMBridge`; 1 = BLIP-2).
        vision_encoder: frozen image encoder for the brain-vision loss (null: no vision loss).
        generation: how captions are generated at predict (fields below).
        lr: AdamW's learning rate.
        weight_decay: AdamW's weight decay.
        warmup_steps: steps of linear warm-up before the cosine decay.
        **kwargs: the other optimisation, export and non-finite-loss settings of StageModule.
    """

    frozen_prefixes = ("vision_encoder.",)  # the LLM and brain encoder: see exclude_frozen_weights

    def __init__(self, brain_encoder: str | None = None, train_brain_encoder: bool = False,
                 brain_encoder_lr_scale: float = 0.1, phase: str = "representation", init_from: str | None = None,
                 qformer: QFormerConfig = QFormerConfig(), loss_weights: LossWeights = LossWeights(),
                 queue_size: int = 0, queue_start_step: int | None = None, readout_dim: int = 0, llm: str = SMOLLM2,
                 llm_dtype: str = "float32", prompt: str = "", add_bos: bool = True, max_caption_tokens: int = 32,
                 lora: LoraSettings | None = None, query_group: int = 1, vision_encoder: str | None = None,
                 generation: GenerationSettings = GenerationSettings(), lr: float = 1e-4, weight_decay: float = 0.05,
                 warmup_steps: int = 100, **kwargs: Any):
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, **kwargs)
        # typed settings (a dict from Python or an export is checked here); plain dicts in hyper-parameters
        qformer_config = settings(QFormerConfig, qformer, "qformer") or QFormerConfig()
        weight_changes = settings(LossWeights, loss_weights, "loss_weights") or LossWeights()
        lora = as_dict(settings(LoraSettings, lora, "lora"))
        generation = as_dict(settings(GenerationSettings, generation, "generation") or GenerationSettings())
        qformer, loss_weights = as_dict(qformer_config), as_dict(weight_changes)
        self.save_hyperparameters()
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.phase = phase
        self.weights = {**default_loss_weights(phase, vision_encoder is not None),
                        **{k: v for k, v in loss_weights.items() if v is not None}}
        self.train_brain_encoder = train_brain_encoder
        if generation["rerank_by"] not in RERANK_SCORES:  # before anything is loaded
            raise ValueError(f"generation.rerank_by must be one of {RERANK_SCORES}, got {generation['rerank_by']!r}")

        init_config, init_tensors = load_export(init_from, EXPORT_KIND) if init_from else ({}, {})
        # The LLM: needed for the LM loss and for captions in the generative phase. Continuing a
        # generative run, the LLM side must be the exported one.
        llm_settings = None
        if phase == "generative" or self.weights["lm"] > 0:
            llm_settings = (LLMSettings.from_dict(init_config["llm"]) if init_config.get("phase") == "generative"
                            and init_config.get("llm") else
                            LLMSettings(llm, llm_dtype, prompt, add_bos, max_caption_tokens, lora, query_group))

        # Vision encoder (frozen, features cached per image id): a training target only.
        self.vision_encoder = None
        if self.weights["vision"] > 0:
            if vision_encoder is None:
                raise ValueError("loss_weights.vision > 0 needs a vision_encoder")
            self.vision_encoder = exclude_frozen_weights(load_vision_encoder(vision_encoder).requires_grad_(False))
        self._vision_cache = FrozenFeatures(pooled=lambda image: self.vision_encoder(image).pooled)

        if init_from:  # the export's architecture, weights and brain encoder
            if qformer_config != QFormerConfig():
                log.warning("init_from is set: the Q-Former architecture comes from %s, `qformer` is ignored", init_from)
            self.captioner = BrainCaptioner.from_export_parts(init_from, init_config, init_tensors, load_llm=False,
                                                              brain_encoder=brain_encoder, llm=llm_settings)
            self.captioner.generation = generation
            # True when the weights are no longer the stage-1 export's (then the export stores them)
            self.brain_encoder_changed = bool(init_config.get("brain_encoder", {}).get("fine_tuned"))
            self.brain_encoder_source = (None if self.brain_encoder_changed
                                         else str(brain_encoder_path(init_from, init_config, brain_encoder)))
        elif brain_encoder:
            encoder = exclude_frozen_weights(BrainEncoder.from_pretrained(brain_encoder, with_decoder=False))
            vision_dim = self.vision_encoder.dim if self.vision_encoder is not None else None
            qf = BrainQFormer(qformer_config, encoder.config.width, vision_dim)
            bridge = build_bridge(llm_settings, qf.config.hidden_size, qf.config.num_queries) if llm_settings else None
            self.captioner = BrainCaptioner(encoder, qf, None, bridge, llm_settings, generation)
            self.brain_encoder_changed, self.brain_encoder_source = False, str(brain_encoder)
        else:
            raise ValueError("brain_encoder: give the stage-1 export folder (or init_from a brain_align export)")
        vision_dim = self.qformer.vision_dim
        if self.vision_encoder is not None and vision_dim != self.vision_encoder.dim:
            raise ValueError(f"the Q-Former's vision heads expect {vision_dim}-d features, "
                             f"{vision_encoder} gives {self.vision_encoder.dim}")
        self.brain_encoder.requires_grad_(train_brain_encoder)
        self.captioner.encoder_trains = train_brain_encoder
        self.qformer.set_trainable(itc=self.weights["itc"] > 0, itm=self.weights["itm"] > 0,
                                   itg=self.weights["itg"] > 0, vision=self.weights["vision"] > 0)
        qcfg, E = self.qformer.config, self.qformer.config.embed_dim
        self.itc_queue = FeatureQueue(queue_size, qcfg.num_queries, E)
        self.vision_queue = FeatureQueue(queue_size, qcfg.num_queries, E)

    # -- the model's parts (BrainCaptioner owns them) ------------------------------------------------

    @property
    def brain_encoder(self) -> BrainEncoder:
        return self.captioner.brain_encoder

    @property
    def qformer(self) -> BrainQFormer:
        return self.captioner.qformer

    @property
    def readout(self) -> RidgeReadout | None:
        return self.captioner.readout

    @property
    def bridge(self) -> LLMBridge | None:
        return self.captioner.bridge

    @property
    def generation(self) -> dict[str, Any]:
        return self.captioner.generation

    @property
    def new_subjects(self) -> set[str]:
        """Subjects the brain encoder did not know: their input layers train."""
        return self.captioner.trainable_subjects

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
        from mindsemantix.data.arrays import load_split_arrays

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
            self.captioner.readout = RidgeReadout(token_ids, self.qformer.config.num_queries,
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
        return self.captioner.brain_inputs(fmri, subject)

    def query_outputs(self, fmri: Tensor, subject: str) -> Tensor:
        """(B, V) -> (B, Q, H): the brain representation that stage 3 and the LLM read."""
        return self.captioner.query_outputs(fmri, subject)

    def caption(self, fmri: Tensor, subject: str, **generation: Any) -> list[str]:
        """`BrainCaptioner.caption`: the LLM's captions (reranked per `generation`) or the ITG decoder's."""
        return self.captioner.caption(fmri, subject, **generation)

    def vision_features(self, batch: dict[str, Any]) -> Tensor:
        """(B, vision_dim) pooled features of the seen images, computed once per image id."""
        if "image" not in batch:
            raise KeyError("the brain-vision loss needs the seen images: add `image` to data.init_args.fields")
        return self._vision_cache(batch["image_id"], batch["image"], self.device)["pooled"]

    # -- losses --------------------------------------------------------------------------------------

    def compute_losses(self, batch: dict[str, Any], train: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        w = self.weights
        captions = self.pick_captions(batch["captions"], train)
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

    # -- export (docs/formats.md) --------------------------------------------------------------------

    def export(self, folder: str | Path) -> Path:  # StageModule writes it at the end of fit
        return self.save_export(folder)

    def save_export(self, folder: str | Path) -> Path:
        """The captioner's files; the stage-1 encoder by reference when this stage left it unchanged."""
        fine_tuned = self.brain_encoder_changed or self.train_brain_encoder or bool(self.new_subjects)
        return self.captioner.save_pretrained(folder, brain_encoder_source=None if fine_tuned else self.brain_encoder_source,
                                              extra={"phase": self.phase, "loss_weights": self.weights})

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
        rows = gather_rows(self.rows)
        if trainer.is_global_zero:
            path = self.path or Path(trainer.default_root_dir) / "captions.jsonl"
            by_key = {r["key"]: r["caption"] for r in rows}
            text = "".join(json.dumps({"key": k, "caption": by_key[k]}) + "\n" for k in sorted(by_key))
            write_bytes_atomic(path, text.encode())
            print(f"captions: wrote {len(by_key)} to {path}")


__all__ = ["BrainAlign", "CaptionWriter", "EXPORT_KIND", "default_loss_weights", "load_llm"]
