"""Stage 3: brain -> VAE latent of the seen image, and Stable Diffusion reconstruction.

    fmri (B, V_s) --stage-2 export (frozen)--> brain representation (B, T, D)
                  --LatentHead (trained)-----> scaled VAE latent (B, C, h, w)    [+ image embedding (B, E)]
    predict: decoded caption (stage-2 JSONL) + predicted latent --frozen SD--> three images per key

The trained part is only the head: MSE to the frozen VAE's latent of the seen image (the low-level
path, layout and colour), optionally a batch-contrastive term on that latent, and optionally an
image-embedding target (pooled features of a frozen vision encoder; used at predict time to pick the
best of `n_candidates` img2img samples, as MindEye picks its best of several). Stable Diffusion (the
VAE, UNet, text encoder) and the stage-2 model are frozen and never enter a checkpoint or the export
(docs/formats.md): they are reloaded from their sources, which the export names.

The models are `mindsemantix.models.latent_head` (`LatentHead`, `BrainRepresentation`); this module
holds the losses. `predict` returns, per key, the captions used and the images of each variant; the
`mindsemantix.writers.ReconstructionWriter` callback writes them under `predict_dir`:
    seen/<key>.png, caption_only/<key>.png, latent_only/<key>.png, full/<key>.png
    grid.png          seen | caption only | latent only | full, with reference and decoded captions
    reconstructions.json   per key: captions used; settings; seconds per image per variant
    scores.json       PixCorr / SSIM / 2-way identification per variant against seen/ (`score: true`)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mindsemantix.export import load_export, reference, resolve_reference
from mindsemantix.io import write_json_atomic
from mindsemantix.models.diffusion import VARIANTS, Reconstructor, SamplingConfig, load_stable_diffusion, pipeline_modules
from mindsemantix.models.frozen_features import FrozenFeatures
from mindsemantix.models.latent_head import EXPORT_KIND, BrainRepresentation, LatentHead, LatentHeadConfig
from mindsemantix.precision import fp32_unless_fast
from mindsemantix.stages.base import StageModule, as_dict, settings

log = logging.getLogger(__name__)

REFERENCE_CAPTIONS = "reference"  # `captions: reference` prompts with a reference caption (an oracle)


class LatentCache:
    """The scaled VAE latents of every seen image of some datasets, computed once in batches and kept
    as a memory-mapped `.npy` (N, C, h, w) float32 + a JSON of the image ids, under a name made from
    the datasets' manifests, the VAE (config, source, a checksum of its weights) and the resolution,
    so another VAE or resolution never reads it. Written atomically (the JSON last)."""

    def __init__(self, path: Path):
        self.path = path                       # <folder>/<key>: <key>.npy + <key>.json
        self.rows: dict[int, int] = {}
        self.array: np.ndarray | None = None

    @classmethod
    def for_datasets(cls, roots, reconstructor: Reconstructor, source: str, folder: str | None = None) -> "LatentCache":
        vae = reconstructor.vae
        h = hashlib.sha256()
        for root in roots:
            h.update((Path(root) / "manifest.json").read_bytes())
        params = list(vae.parameters())
        h.update(json.dumps({"vae": dict(vae.config), "source": str(source), "resolution": reconstructor.resolution,
                             "dtype": str(vae.dtype)}, sort_keys=True, default=str).encode())
        for p in (params[0], params[-1]):  # a cheap checksum of the weights: first and last tensors
            h.update(p.detach().float().cpu().numpy().tobytes())
        if folder is None:
            folder = Path(roots[0]) / ".mindsemantix-latents"
            if not os.access(Path(roots[0]), os.W_OK):
                folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mindsemantix" / "latents"
        return cls(Path(folder) / h.hexdigest()[:24])

    def exists(self) -> bool:
        return self.path.with_suffix(".json").is_file() and self.path.with_suffix(".npy").is_file()

    @torch.no_grad()
    def build(self, roots, reconstructor: Reconstructor, batch_size: int = 16) -> None:
        from tqdm.auto import tqdm

        from mindsemantix.data.shards import FIELD_EXT, SampleReader, ShardDataset

        refs: dict[int, Any] = {}  # image id -> one sample showing it
        for root in roots:
            dataset = ShardDataset(root, verify="none")
            for split in dataset.splits:
                for ref in dataset.samples(split):
                    if FIELD_EXT["image"] in ref.members and ref.image_id >= 0:  # image-less corpora have none
                        refs.setdefault(ref.image_id, ref)
        ids = sorted(refs)
        C, h, w = reconstructor.latent_shape
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(ids), C, h, w))
        reader = SampleReader()
        try:
            for start in tqdm(range(0, len(ids), batch_size), desc="stage 3: VAE latents of the seen images",
                              unit="batch", leave=False):
                chunk = ids[start:start + batch_size]
                images = torch.stack([torch.from_numpy(reader.image(refs[i])).permute(2, 0, 1) for i in chunk])
                out[start:start + len(chunk)] = reconstructor.encode_images(images).float().cpu().numpy()
        finally:
            reader.close()
        out.flush()
        del out
        os.replace(tmp, self.path.with_suffix(".npy"))
        write_json_atomic(self.path.with_suffix(".json"), {"image_ids": ids, "resolution": reconstructor.resolution})
        log.info("latent cache: %d images -> %s", len(ids), self.path.with_suffix(".npy"))

    def open(self) -> "LatentCache":
        ids = json.loads(self.path.with_suffix(".json").read_text())["image_ids"]
        self.rows = {int(i): r for r, i in enumerate(ids)}
        self.array = np.load(self.path.with_suffix(".npy"), mmap_mode="r")
        return self

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.rows

    def get(self, ids: list[int]) -> Tensor:
        """(B, C, h, w) float32 latents of these image ids."""
        return torch.from_numpy(np.stack([self.array[self.rows[i]] for i in ids]))


def latent_infonce(pred: Tensor, target: Tensor, image_ids: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between predicted and true latents (B, C, h, w): sample i's positive is its
    own image's latent, its negatives the other images in the batch (samples of the same image —
    another subject's, a repeat — are left out, not counted as negatives)."""
    p = nn.functional.normalize(pred.flatten(1).float(), dim=-1)
    t = nn.functional.normalize(target.flatten(1).float(), dim=-1)
    logits = p @ t.T / temperature                                                     # (B, B)
    ids = image_ids.to(logits.device)
    same_image = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same_image, float("-inf"))
    labels = torch.arange(len(ids), device=logits.device)
    return (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)) / 2


@dataclass(frozen=True)
class LatentHeadSettings:
    """The latent head's chosen sizes (`LatentHeadConfig` less what the data and models fix).

    Args:
        token_dim: each brain token is reduced to this many values before they are concatenated.
        hidden: width of the residual MLP.
        dropout: dropout on the reduced tokens and in the MLP.
    """

    token_dim: int = 64
    hidden: int = 1024
    dropout: float = 0.3


# ---------------------------------------------------------------------------------------------
# The LightningModule


class BrainReconstruct(StageModule):
    """Stage-3 LightningModule (all arguments settable from the YAML config).

    Args:
        align_export: the stage-2 export folder (kind "brain_align"); frozen.
        diffusion: Stable Diffusion, hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`) or a local
            diffusers folder (`data/toyworld/toy_sd`, from data_recipes/toy_diffusion.py); frozen.
        diffusion_dtype: "float32" | "float16" | "bfloat16" for the SD weights (fp16 on GPUs).
        resolution: image size of everything stage 3 makes: the seen images are resized to it before
            the VAE encodes them, the latent is resolution / 8 (SD) on a side, and images are sampled
            at it (default: the UNet's native size, 512 for SD 1.5).
        latent_cache: where the seen images' VAE latents are computed once, in batches, before
            training (a memory-mapped `.npy` per dataset, VAE and resolution): "auto" = a
            `.mindsemantix-latents/` folder in the dataset (or the user cache folder where it is
            read-only), a folder, or null (encode each image when first met, kept in memory).
        head: the latent head's sizes (fields below).
        contrastive_weight: weight of a batch-contrastive term on the latent (symmetric InfoNCE
            between predicted and true latents, flattened, cosine / `contrastive_temperature`; other
            samples of the same image are not negatives). MSE alone regresses to a blurred average
            that looks alike for many images; the contrastive term makes each predicted latent nearer
            its own image's than the others' in the batch, as MindEye trains its retrieval and
            low-level heads (docs/stage3.md, "The contrastive latent head"). 0: MSE only.
        contrastive_temperature: the temperature of that term.
        cache_brain: keep the frozen stage-2 model's output per distinct input (BrainRepresentation),
            so a head trained for many epochs does not rerun it every step. Costs host memory
            (distinct inputs x Q x H x 4 bytes); resumes then match the uninterrupted run to float
            round-off, not bitwise.
        image_embedding: frozen vision encoder (`offline:efficientnet-lite0`, a CLIP folder) whose
            pooled features of the seen image the head also predicts (null: no embedding target).
        embedding_weight: the embedding loss's weight (cosine distance).
        n_candidates: img2img samples per key (seeds `key`, `key#1`, ...; 1: plain seeded img2img),
            combined by `combine_candidates`.
        combine_candidates: "mean": the candidates' pixel average, a Monte Carlo estimate of the
            posterior mean of the image given the latent and the caption (one sample adds detail the
            brain did not determine, which PixCorr / SSIM punish; the mean keeps what the caption and
            the latent agree on). "best": the one whose vision features are closest to the predicted
            embedding (MindEye's best-of-n; needs `image_embedding`).
        captions: stage-2 captions JSONL ({"key", "caption"} per line) used as prompts at predict;
            "reference" uses the first reference caption (an oracle, for checking stage 3 alone).
        sampling: how SD samples (fields below).
        scheduler: "ddim" (deterministic given the noise), "pndm", "euler", "dpm".
        predict_dir: where predict's images go (default `<trainer.default_root_dir>/predict`).
        variants: which images predict makes ("caption_only", "latent_only", "full").
        grid_rows: keys shown in predict's `grid.png`.
        score: predict also scores the images against the seen ones (`scores.json`).
        init_from: a brain_reconstruct export whose head to load (predict from an export).
        lr: AdamW's learning rate.
        weight_decay: AdamW's weight decay.
        warmup_steps: steps of linear warm-up before the cosine decay.
        **kwargs: the other optimisation, export and non-finite-loss settings of StageModule.
    """

    frozen_prefixes = ("brain.", "sd.", "vision.")

    def __init__(self, align_export: str, diffusion: str = "data/toyworld/toy_sd", diffusion_dtype: str = "float32",
                 resolution: int | None = None, head: LatentHeadSettings = LatentHeadSettings(),
                 contrastive_weight: float = 0.0, contrastive_temperature: float = 0.1, cache_brain: bool = False,
                 latent_cache: str | None = "auto",
                 image_embedding: str | None = None, embedding_weight: float = 0.0, n_candidates: int = 1,
                 combine_candidates: str = "mean", captions: str | None = None,
                 sampling: SamplingConfig = SamplingConfig(), scheduler: str = "ddim",
                 predict_dir: str | None = None, variants: list[str] | None = None,
                 grid_rows: int = 8, score: bool = True, init_from: str | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.05, warmup_steps: int = 50, **kwargs: Any):
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, **kwargs)
        # typed settings (a dict from Python or an export is checked here); plain dicts in hyper-parameters
        head = as_dict(settings(LatentHeadSettings, head, "head"))
        sampling = as_dict(settings(SamplingConfig, sampling, "sampling"))
        self.save_hyperparameters()
        # a bad setting fails here, before the stage-2 model and SD are loaded
        if contrastive_weight < 0 or contrastive_temperature <= 0:
            raise ValueError(f"contrastive_weight must be >= 0 and contrastive_temperature > 0, got "
                             f"{contrastive_weight} and {contrastive_temperature}")
        init_config, init_tensors = load_export(init_from, EXPORT_KIND) if init_from else ({}, {})
        if init_from:  # the export fixes what the head was trained on
            # The head reads the stage-2 model it was trained with. An explicit align_export (a moved
            # folder; a path recorded relative to another working directory) is used as given, with a
            # warning when it is not the folder the export names: a different stage-2 model makes the
            # head's inputs meaningless.
            recorded = resolve_reference(init_config.get("align_export") or "", init_from)
            if recorded and Path(recorded).resolve() != Path(align_export).resolve():
                log.warning("align_export %s is not the stage-2 export %s that the head in %s was trained on; "
                            "using %s", align_export, recorded, init_from, align_export)
            resolution = init_config["resolution"]
            image_embedding = init_config.get("image_embedding")

        self.align_export, self.diffusion_source = str(align_export), str(diffusion)
        self.brain = BrainRepresentation.from_export(align_export, cache=cache_brain)
        self.contrastive_weight, self.contrastive_temperature = contrastive_weight, contrastive_temperature

        pipe = load_stable_diffusion(diffusion, dtype=getattr(torch, diffusion_dtype), scheduler=scheduler)
        self.reconstructor = Reconstructor(pipe, SamplingConfig(**(sampling or {})), resolution=resolution)
        self.sd = nn.ModuleDict(pipeline_modules(pipe))  # registered so .to(device) moves them; frozen
        self.resolution = self.reconstructor.resolution
        self.latent_shape = self.reconstructor.latent_shape

        self.vision = None
        if image_embedding:
            from mindsemantix.models.pretrained import load_vision_encoder

            self.vision = load_vision_encoder(image_embedding).requires_grad_(False).eval()
        self.image_embedding, self.embedding_weight, self.n_candidates = image_embedding, embedding_weight, n_candidates
        if n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
        if combine_candidates not in ("mean", "best"):
            raise ValueError(f"combine_candidates must be 'mean' or 'best', got {combine_candidates!r}")
        if combine_candidates == "best" and n_candidates > 1 and not image_embedding:
            raise ValueError("combine_candidates: best picks by the predicted image embedding; set image_embedding "
                             "(e.g. offline:efficientnet-lite0), or use mean")
        self.combine_candidates = combine_candidates

        T, D = self.brain.shape()
        head_cfg = {k: v for k, v in (init_config.get("head") or head or {}).items()
                    if k not in ("n_tokens", "width", "latent_shape", "embed_dim")}
        self.head = LatentHead(LatentHeadConfig(n_tokens=T, width=D, latent_shape=self.latent_shape,
                                                embed_dim=self.vision.dim if self.vision else None, **head_cfg))
        if init_from:
            self.head.load_state_dict({k[len("head."):]: v for k, v in init_tensors.items() if k.startswith("head.")})

        self.captions_source = captions
        self._predict_dir, self.grid_rows, self.score = predict_dir, grid_rows, score
        self.variants = list(variants or VARIANTS)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; known: {list(VARIANTS)}")
        self._targets = FrozenFeatures(latent=self.reconstructor.encode_images,
                                       **({"embedding": lambda image: self.vision(image).pooled} if self.vision else {}))
        self.latent_cache_setting = latent_cache
        self.latent_cache: LatentCache | None = None
        self._captions: dict[str, str] | None = None

    # -- frozen parts stay in eval mode --------------------------------------------------------------

    def train(self, mode: bool = True) -> "BrainReconstruct":
        super().train(mode)
        for frozen in (self.brain, self.sd, self.vision):
            if frozen is not None:
                frozen.eval()
        return self

    def setup(self, stage: str) -> None:
        """Before fit / validate / test: the seen images' latents, computed once per dataset (local
        rank 0 computes, the others wait and read the same file)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "predict" or self.latent_cache_setting is None or not hasattr(datamodule, "roots"):
            return
        cache = LatentCache.for_datasets(datamodule.roots, self.reconstructor, self.diffusion_source,
                                         None if self.latent_cache_setting == "auto" else self.latent_cache_setting)
        # one builder per node (the cache folder may be node-local); two on a shared file system
        # write the same bytes, each to its own temporary file, renamed into place
        if self.trainer.local_rank == 0 and not cache.exists():
            cache.build(datamodule.roots, self.reconstructor)
        self.trainer.strategy.barrier("latent cache")
        self.latent_cache = cache.open()

    # -- forward pieces ------------------------------------------------------------------------------

    def forward(self, fmri: Tensor, subject: str) -> dict[str, Tensor]:
        """(B, V) -> {"latent": (B, C, h, w), "embedding": (B, E) if configured}."""
        return self.head(self.brain(fmri, subject).float())

    @torch.no_grad()
    def targets(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Scaled VAE latents (B, C, h, w) of the seen images (+ their pooled vision features),
        computed once per image id and kept on the CPU."""
        if "image" not in batch:
            raise KeyError("stage 3 needs the seen images: add `image` to data.init_args.fields")
        ids = batch["image_id"].tolist()
        if self.latent_cache is not None and self.vision is None and all(i in self.latent_cache for i in ids):
            return self.latent_cache.get(ids).to(self.device), None
        with fp32_unless_fast(self.device.type, "conv"):  # the VAE: bf16 only where convolutions pay
            found = self._targets(batch["image_id"], batch["image"], self.device)
        return found["latent"], found.get("embedding")

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        pred = self(batch["fmri"], batch["subject"])
        latent, embed = self.targets(batch)
        losses = {"latent_mse": nn.functional.mse_loss(pred["latent"], latent)}
        loss = losses["latent_mse"]
        if self.contrastive_weight > 0 and len(latent) > 1:
            losses["latent_nce"] = latent_infonce(pred["latent"], latent, batch["image_id"], self.contrastive_temperature)
            loss = loss + self.contrastive_weight * losses["latent_nce"]
        if self.vision is not None and self.embedding_weight > 0:
            losses["embedding_cos"] = 1 - nn.functional.cosine_similarity(pred["embedding"], embed, dim=-1).mean()
            loss = loss + self.embedding_weight * losses["embedding_cos"]
        losses["loss"] = loss
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        losses = self.compute_losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(batch["key"]), prog_bar=True)
        return self.guard_loss(losses["loss"], batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.compute_losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=len(batch["key"]), sync_dist=True,
                      prog_bar=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.compute_losses(batch)
        self.log_dict({f"test/{k}": v for k, v in losses.items()}, batch_size=len(batch["key"]), sync_dist=True)

    # -- predict: reconstructions --------------------------------------------------------------------

    def load_captions(self) -> dict[str, str] | None:
        if self.captions_source in (None, REFERENCE_CAPTIONS):
            return None
        path = Path(self.captions_source)
        if not path.is_file():
            raise FileNotFoundError(f"captions: {path} does not exist (stage 2's predict writes it)")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {r["key"]: r["caption"] for r in rows}

    def prompts(self, batch: dict[str, Any]) -> list[str] | None:
        keys = batch["key"]
        if self.captions_source is None:
            return None
        if self.captions_source == REFERENCE_CAPTIONS:
            if "captions" not in batch:
                raise KeyError("captions: reference needs `captions` in data.init_args.fields")
            return [caps[0] for caps in batch["captions"]]
        if self._captions is None:
            self._captions = self.load_captions()
        missing = [k for k in keys if k not in self._captions]
        if missing:
            raise KeyError(f"{self.captions_source} has no caption for {missing[:5]} ({len(missing)} keys); run "
                           "stage 2's predict on the same split")
        return [self._captions[k] for k in keys]

    @property
    def predict_dir(self) -> Path:
        """`predict_dir`, default `<trainer.default_root_dir>/predict`."""
        if self._predict_dir:
            return Path(self._predict_dir)
        return Path(self.trainer.default_root_dir) / "predict"

    def on_predict_start(self) -> None:
        if not any(getattr(c, "writes_reconstructions", False) for c in self.trainer.callbacks):
            raise ValueError("stage-3 predict writes its images through a callback: add "
                             "`- class_path: mindsemantix.writers.ReconstructionWriter` to trainer.callbacks")

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per key: {"key", "decoded", "reference", "seen": uint8 (3, H, W) or None, "images":
        {variant: uint8 (3, R, R)}, "seconds": {variant: seconds per image}}; a writer callback saves them."""
        keys, prompts = list(batch["key"]), self.prompts(batch)
        pred = self(batch["fmri"], batch["subject"])
        latents = pred["latent"]
        variants = [v for v in self.variants if prompts is not None or v == "latent_only"]
        images: dict[str, Tensor] = {}
        seconds: dict[str, float] = {}
        for v in variants:
            start = time.perf_counter()
            with fp32_unless_fast(self.device.type, "conv"):  # SD sampling: bf16 only where its kind of work pays
                if v == "full" and self.n_candidates > 1:
                    images[v] = self.combine(keys, prompts, latents, pred.get("embedding"))
                else:
                    images.update(self.reconstructor.reconstruct(keys, prompts, latents, [v]))
            seconds[v] = (time.perf_counter() - start) / len(keys)
        seen = batch.get("image")
        return [{"key": key, "decoded": prompts[i] if prompts else None,
                 "reference": batch["captions"][i][0] if "captions" in batch else None,
                 "seen": None if seen is None else seen[i].cpu(),
                 "images": {v: imgs[i].cpu() for v, imgs in images.items()}, "seconds": seconds}
                for i, key in enumerate(keys)]

    def combine(self, keys: list[str], prompts: list[str], latents: Tensor, embedding: Tensor | None) -> Tensor:
        """img2img with `n_candidates` seeds per key, combined per `combine_candidates` -> uint8 (B, 3, R, R)."""
        if self.combine_candidates == "mean":
            return self.reconstructor.full_mean(prompts, latents, keys, self.n_candidates)
        stacked = self.reconstructor.full_candidates(prompts, latents, keys, self.n_candidates)  # (B, n, 3, R, R)
        feats = self.vision(stacked.flatten(0, 1).to(self.device)).pooled.float().view(len(keys), self.n_candidates, -1)
        sim = nn.functional.cosine_similarity(feats, embedding.float()[:, None], dim=-1)  # (B, n)
        return stacked[torch.arange(len(keys)), sim.argmax(1).cpu()]

    def describe(self) -> dict[str, Any]:
        """The settings a set of reconstructions was made with (for `reconstructions.json`)."""
        s = self.reconstructor.sampling
        return {"diffusion": self.diffusion_source, "align_export": self.align_export,
                "captions": self.captions_source, "resolution": self.resolution, "sampling": vars(s),
                "scheduler": type(self.reconstructor.text2img.scheduler).__name__,
                "n_candidates": self.n_candidates, "combine_candidates": self.combine_candidates,
                "device": str(self.device), "title": f"img2img strength {s.strength}, {s.num_inference_steps} steps, "
                f"guidance {s.guidance_scale}" + (f"; full = {self.combine_candidates} of {self.n_candidates} samples"
                                                  if self.n_candidates > 1 else "")}

    # -- export (docs/formats.md) -----------------------------------------------------------------------

    def export(self, folder: str | Path) -> Path:
        return self.head.save_pretrained(folder, extra={
            "align_export": reference(self.align_export, folder), "diffusion": reference(self.diffusion_source, folder),
            "resolution": self.resolution, "image_embedding": self.image_embedding,
            "sampling": vars(self.reconstructor.sampling), "scheduler": self.hparams.scheduler,
            "n_candidates": self.n_candidates, "combine_candidates": self.combine_candidates})

    @classmethod
    def from_export(cls, folder: str | Path, **overrides: Any) -> "BrainReconstruct":
        """A ready model (eval mode) from a brain_reconstruct export; the frozen parts come from the
        sources it names (override `diffusion` / `align_export` if they moved)."""
        config, _ = load_export(folder, EXPORT_KIND)
        kwargs = {"align_export": resolve_reference(config["align_export"], folder),
                  "diffusion": resolve_reference(config["diffusion"], folder),
                  "sampling": config.get("sampling"), "init_from": str(folder),
                  **{k: config[k] for k in ("scheduler", "n_candidates", "combine_candidates") if k in config}}
        return cls(**{**kwargs, **overrides}).eval()


__all__ = ["BrainReconstruct", "BrainRepresentation", "LatentHead", "latent_infonce", "EXPORT_KIND"]
