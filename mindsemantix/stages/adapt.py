"""A new subject for a trained bundle (`stages/adapt.yaml`, `mindsemantix adapt`), as one
LightningModule `BrainAdapt`.

    bundle (subjects A, B) + the new subject's shards (its first N sessions)
        -> new input layers: brain-encoder tokenizer (from the mask's voxel coordinates) and ridge readout
        -> train those layers alone, everything shared frozen
        -> bundle (subjects A, B, NEW): the old files, plus the new subject's tensors and mask

What trains and against what: the new subject's tokenizer (its per-patch voxel maps and subject
embedding) by stage 2's representation losses (ITC and ITG against the subject's captions) through
the frozen Q-Former; its ridge readout is fitted in closed form on the same limited training data,
as stage 2 fits every subject's (`BrainAlign.fit_readout`). The Q-Former, the LLM bridge and the
stage-3 head are shared and read only the Q-Former's query outputs, so a new subject decodes once its
brain tokens make the frozen Q-Former produce query outputs where the old subjects' lie for the same
content: the losses that shaped those query outputs in stage 2 are the direct way to get there, and
neither needs the LLM or Stable Diffusion (a stage-3 latent loss would need SD's VAE on every image).
The stage-3 head has no subject part. The old subjects' tensors are copied, not re-saved, so they
decode bitwise as before.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save_file
from torch import Tensor

from mindsemantix.export import EXPORT_FORMAT
from mindsemantix.io import atomic_dir
from mindsemantix.models.captioner import EXPORT_KIND, BrainCaptioner, all_tensors
from mindsemantix.models.qformer import caption_word_targets, representation_losses
from mindsemantix.stages.base import WeightedLossStage

log = logging.getLogger(__name__)

INDEX = "model_index.json"  # the bundle's index (mindsemantix.pipeline, which stages do not import)


class AdaptError(ValueError):
    """A bundle or data that adapt cannot use, with the reason."""


class BrainAdapt(WeightedLossStage):
    """Adds one subject to a trained bundle and trains only its input layers.

    Args:
        bundle: the trained bundle folder (`mindsemantix bundle`).
        subject: the new subject's name in the shard dataset (not in the bundle).
        itc: weight of the brain-text contrastive loss against the subject's captions.
        itg: weight of the Q-Former's caption-decoder loss (brain-grounded generation).
        lr: AdamW's learning rate (the new layers start from scratch: higher than stage 2's).
        weight_decay: AdamW's weight decay.
        warmup_steps: steps of linear warm-up before the cosine decay.
        **kwargs: the other optimisation and non-finite-loss settings of StageModule; `export_dir`
            is where the new bundle is written (default `<default_root_dir>/bundle`).
    """

    def __init__(self, bundle: str, subject: str, itc: float = 1.0, itg: float = 1.0, lr: float = 3e-3,
                 weight_decay: float = 0.05, warmup_steps: int = 20, **kwargs: Any):
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, **kwargs)
        self.weights = {"itc": itc, "itg": itg}
        self.save_hyperparameters()
        if itc <= 0 and itg <= 0:
            raise ValueError("adapt needs itc > 0 or itg > 0: nothing else trains the new subject")
        self.bundle = Path(bundle)
        index_path = self.bundle / INDEX
        if not index_path.is_file():
            raise AdaptError(f"{bundle}: not a MindSemantix bundle ({INDEX} is missing)")
        self.index = json.loads(index_path.read_text())
        if subject in self.index.get("subjects", {}):
            raise AdaptError(f"{bundle}: subject {subject!r} is already in this bundle; give the new subject another name")
        self.subject = subject
        # the shared model, frozen and in eval mode; no LLM: the losses do not need it
        self.captioner = BrainCaptioner.from_pretrained(self.bundle / self.index["captioner"], load_llm=False)

    # -- set-up ------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """The new subject's tokenizer (trainable) and its ridge readout (fitted here, on the
        datamodule's training samples: with `max_sessions`, the first sessions only)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "subject_info"):
            return
        info = datamodule.subject_info()
        if self.subject not in info:
            raise AdaptError(f"subject {self.subject!r} is not in the data ({', '.join(sorted(info)) or 'no subjects'}); "
                             "set data.subjects to it")
        others = sorted(set(info) - {self.subject})
        if others:
            raise AdaptError(f"adapt trains one new subject; the data also serves {others} (set data.subjects: "
                             f"[{self.subject}])")
        encoder = self.captioner.brain_encoder
        encoder.add_subject(self.subject, info[self.subject].coords_mm)
        for p in encoder.subject_parameters(self.subject):
            p.requires_grad_(True)
        self.captioner.trainable_subjects.add(self.subject)
        if self.captioner.readout is not None and not self.captioner.readout.fitted(self.subject):
            self.fit_readout(datamodule)

    def fit_readout(self, datamodule) -> None:
        """The subject's ridge map from voxels to its captions' word content, in closed form on the
        training samples the datamodule serves (mean of the kept repetitions, as stage 2)."""
        from mindsemantix.data.datamodule import SampleSet

        refs = datamodule.split_refs("train")
        samples = SampleSet(refs, ["captions"], "mean", datamodule.seed, None, "raise", kept=datamodule.kept)
        rows = [samples[(i, 0)] for i in range(len(samples))]
        x = np.stack([r["fmri"] for r in rows])                                     # (N, V)
        readout = self.captioner.readout
        _, targets = caption_word_targets([r["captions"] for r in rows], self.captioner.qformer.tokenizer,
                                          readout.token_ids.cpu())                   # (N, K)
        alpha = readout.fit_subject(self.subject, x, targets.numpy())
        log.info("ridge readout for %s: %d samples, %d voxels, penalty %.3g", self.subject, len(x), x.shape[1], alpha)

    def train(self, mode: bool = True) -> "BrainAdapt":
        """The shared model stays in eval mode (no dropout): only the new input layer trains."""
        super().train(mode)
        self.captioner.eval()
        return self

    # -- losses --------------------------------------------------------------------------------------

    def compute_losses(self, batch: dict[str, Any], train: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if batch["subject"] != self.subject:
            raise AdaptError(f"a batch of {batch['subject']!r}: adapt trains {self.subject!r} only")
        captions = self.pick_captions(batch["captions"], train)                     # as stage 2
        brain, bias = self.captioner.brain_inputs(batch["fmri"], self.subject)      # (B, N, D), (B, Q, H)
        rep = representation_losses(self.captioner.qformer, brain, captions, batch["image_id"].to(self.device),
                                    itc=self.weights["itc"] > 0, itm=False, itg=self.weights["itg"] > 0, query_bias=bias)
        return rep.losses, rep.metrics

    # -- the new bundle --------------------------------------------------------------------------------

    def resolved_export_dir(self) -> Path:
        return Path(self.export_dir) if self.export_dir else Path(self.trainer.default_root_dir) / "bundle"

    def export(self, folder: str | Path) -> Path:
        """Write the adapted bundle to `folder`; returns its captioner folder (where the training
        record goes)."""
        return write_adapted_bundle(self.bundle, folder, self.subject, self.captioner, self.trainer.datamodule,
                                    {"steps": int(self.global_step),
                                     "max_sessions": getattr(self.trainer.datamodule, "max_sessions", None)})


def write_adapted_bundle(bundle: Path, folder: str | Path, subject: str, captioner: BrainCaptioner, datamodule,
                         record: dict[str, Any]) -> Path:
    """`bundle` copied to `folder` (atomically) with `subject` added: its tokenizer and readout
    tensors appended to the captioner's files (the old tensors are copied byte for byte), its mask,
    and its entry in the index (voxels, mask, normalisation, held-out test image ids)."""
    from mindsemantix.data.shards import read_manifest

    folder = Path(folder)
    if folder.resolve() == bundle.resolve():
        raise AdaptError(f"{folder}: write the adapted bundle to a new folder, not over the bundle it adapts")
    info = datamodule.subject_info()[subject]
    new = {f"brain_encoder.tokenizers.{subject}.{k}": v
           for k, v in all_tensors(captioner.brain_encoder.tokenizers[subject]).items()}
    if captioner.readout is not None:
        new.update({f"readout.maps.{subject}.{k}": v for k, v in all_tensors(captioner.readout.maps[subject]).items()})
    held_out = sorted(int(ref.key.rsplit("-", 1)[1]) for ref in datamodule.split_refs("test") if ref.subject == subject) \
        if _has_split(datamodule, "test") else []
    manifest = read_manifest(_dataset_root(datamodule, subject))
    normalisation = {k: v for k, v in manifest.get("normalisation", {}).items() if k in ("scale", "zscore")}
    with atomic_dir(folder) as tmp:
        shutil.copytree(bundle, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
        index = json.loads((tmp / INDEX).read_text())
        cap = tmp / index["captioner"]
        tensors = load_file(str(cap / "model.safetensors"))
        tensors.update({k: v.detach().contiguous().cpu() for k, v in new.items()})
        save_file(tensors, str(cap / "model.safetensors"), metadata={"format": EXPORT_FORMAT, "kind": EXPORT_KIND})
        config = json.loads((cap / "config.json").read_text())
        config["brain_encoder"]["subjects"] = [*config["brain_encoder"]["subjects"], subject]
        if captioner.readout is not None:
            config["readout"]["subjects"][subject] = int(info.n_voxels)
        (cap / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(info.mask_path, tmp / "subjects" / f"{subject}.nii.gz")
        index["subjects"][subject] = {"n_voxels": int(info.n_voxels), "mask": f"subjects/{subject}.nii.gz",
                                      "normalisation": normalisation, "held_out_image_ids": held_out}
        index.setdefault("card", {}).setdefault("adapted", {})[subject] = {"from": bundle.name, **record}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        with open(tmp / "README.md", "a") as card:
            card.write(f"\n## Adapted subject {subject}\n\nAdded by `mindsemantix adapt` from `{bundle.name}`: its "
                       f"input layers trained on {record.get('max_sessions') or 'all'} session(s) of its data "
                       f"({record['steps']} steps), everything shared unchanged (docs/transfer.md).\n")
    return folder / "captioner"


def _has_split(datamodule, split: str) -> bool:
    return any(split in ds.splits for ds in datamodule._datasets_ready())


def _dataset_root(datamodule, subject: str) -> Path:
    for ds in datamodule._datasets_ready():
        if subject in ds.subjects:
            return Path(ds.root)
    raise AdaptError(f"subject {subject!r} is in none of the datasets")


__all__ = ["BrainAdapt", "AdaptError", "write_adapted_bundle"]
