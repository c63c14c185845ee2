"""A trained MindSemantix as one object and one folder: fMRI -> captions -> images.

    pipe = MindSemantixPipeline.from_pretrained("bundles/demo")        # or a hub id
    out = pipe(fmri, subject="subj01")                                  # fmri: (N, V) normalised
    out.captions, out.images                                            # list[str], list[PIL.Image]

A bundle folder holds everything a decode needs, with no absolute path in any file, so it can be
copied, moved or uploaded as it is:

    model_index.json       format, subjects (voxels, mask, normalisation), sampling settings, frozen parts
    captioner/             stage 2 (`BrainCaptioner`: brain encoder, Q-Former, readout, LLM projection)
    latent_head/           stage 3 (`LatentHead`)
    diffusion/             the Stable Diffusion it reconstructs with, when it was a local folder
    subjects/<s>.nii.gz    each subject's ROI mask (voxel order = C-order nonzero of the mask)
    README.md              the model card

Frozen parts named by hub id (an LLM, Stable Diffusion) stay names; local folders are copied in.
The normalisation of new scans is `mindsemantix.data.nsd.zscore_session`, as in training
(docs/decode.md).
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mindsemantix.export import load_export, reference, resolve_reference
from mindsemantix.io import atomic_dir, read_format_json
from mindsemantix.models.captioner import BrainCaptioner
from mindsemantix.models.latent_head import LatentHead
from mindsemantix.precision import fp32_unless_fast

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "mindsemantix-bundle/1"
INDEX = "model_index.json"


class BundleError(ValueError):
    """A bundle folder (or a run to bundle) that cannot be used, with the reason."""


@dataclass
class SubjectSpec:
    """What a subject's input must be: `n_voxels` values in the order of its `mask` (a path
    relative to the bundle), in percent signal change z-scored per session as in training."""

    n_voxels: int
    mask: str
    normalisation: dict[str, Any] = field(default_factory=dict)
    held_out_image_ids: list[int] = field(default_factory=list)  # test images: not in the z-score statistics


@dataclass
class DecodeOutput:
    keys: list[str]
    captions: list[str]
    images: list[Any] | None  # PIL images (None with images=False)


class MindSemantixPipeline:
    """Stage 2 + stage 3 of a trained run, ready to decode. Build with `from_pretrained(bundle)` or
    `from_run(run_dir)`; `save_pretrained(folder)` writes a bundle."""

    def __init__(self, captioner: BrainCaptioner, head: LatentHead | None, subjects: dict[str, SubjectSpec],
                 diffusion: str | None = None, settings: dict[str, Any] | None = None, root: Path | None = None,
                 card: dict[str, Any] | None = None, load_diffusion: bool = True):
        self.captioner, self.head, self.subjects = captioner.eval(), head, subjects
        self.diffusion, self.settings, self.root, self.card = diffusion, dict(settings or {}), root, dict(card or {})
        self.reconstructor = None
        if head is not None and diffusion and load_diffusion:
            from mindsemantix.models.diffusion import Reconstructor, SamplingConfig, load_stable_diffusion

            pipe = load_stable_diffusion(diffusion, scheduler=self.settings.get("scheduler", "ddim"))
            self.reconstructor = Reconstructor(pipe, SamplingConfig(**self.settings.get("sampling", {})),
                                               resolution=self.settings.get("resolution"))

    # -- decoding --------------------------------------------------------------------------------

    def autocast(self):
        """bf16 autocast where the stages' `precision: null` used it (same numbers as their predict)."""
        from mindsemantix.cli import bf16_is_fast

        precision = self.settings.get("precision", "auto")
        if precision == "bf16" or (precision == "auto" and bf16_is_fast("cpu", "matmul")):
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    def check_input(self, fmri: Any, subject: str, where: str = "input") -> torch.Tensor:
        if subject not in self.subjects:
            raise BundleError(f"subject {subject!r} is not in this model (it decodes {', '.join(sorted(self.subjects))}); "
                              "a new subject needs `mindsemantix adapt`")
        x = torch.as_tensor(np.asarray(fmri, dtype=np.float32))
        V = self.subjects[subject].n_voxels
        if x.ndim != 2 or x.shape[1] != V:
            raise BundleError(f"{where}: {subject} has {V} voxels; got an array of shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise BundleError(f"{where}: {int((~torch.isfinite(x)).sum())} NaN/inf values")
        return x

    @torch.no_grad()
    def __call__(self, fmri: Any, subject: str, keys: Sequence[str] | None = None, images: bool = True,
                 batch_size: int = 32, progress: bool = False, **generation: Any) -> DecodeOutput:
        """fmri (N, V) normalised voxels of `subject` -> N captions and (with `images`) N images.

        `keys` name the samples; they also seed each image's sampling (default `<subject>-<row>`),
        so the same key gives the same image. `generation` overrides the caption settings."""
        x = self.check_input(fmri, subject)
        keys = list(keys) if keys is not None else [f"{subject}-{i:06d}" for i in range(len(x))]
        if len(keys) != len(x):
            raise BundleError(f"{len(keys)} keys for {len(x)} samples")
        if images and self.reconstructor is None:
            raise BundleError("this pipeline was loaded without Stable Diffusion (load_diffusion=False)")
        from tqdm.auto import tqdm

        captions: list[str] = []
        pictures: list[Any] = []
        with self.autocast():
            for start in tqdm(range(0, len(x), batch_size), desc=f"decoding {subject}", unit="batch", disable=not progress):
                batch, batch_keys = x[start:start + batch_size], keys[start:start + batch_size]
                texts = self.captioner.caption(batch, subject, **generation)
                captions += texts
                if images:
                    latents = self.head(self.captioner.query_outputs(batch, subject).float())["latent"]
                    with fp32_unless_fast("cpu", "conv"):  # as stage 3's predict runs SD
                        full = self.reconstructor.full_mean(texts, latents, batch_keys, int(self.settings.get("n_candidates", 1)))
                    pictures += [to_pil(im) for im in full]
        return DecodeOutput(keys, captions, pictures if images else None)

    # -- files -----------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a self-contained bundle (atomically: a folder that exists is complete)."""
        if self.root is None:
            raise BundleError("this pipeline has no source folder for the subjects' masks")
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            self.captioner.save_pretrained(tmp / "captioner")
            _bring_frozen_parts(tmp / "captioner")
            diffusion = self.diffusion
            if diffusion and Path(diffusion).is_dir():  # a local SD goes inside
                shutil.copytree(diffusion, tmp / "diffusion", ignore=shutil.ignore_patterns(".*"))
                diffusion = "./diffusion"
            if self.head is not None:
                self.head.save_pretrained(tmp / "latent_head", extra={"align_export": "../captioner", "diffusion": diffusion,
                                                                      **{k: v for k, v in self.settings.items() if k != "precision"}})
            subjects = {}
            for name, spec in self.subjects.items():
                (tmp / "subjects").mkdir(exist_ok=True)
                shutil.copyfile(self.root / spec.mask, tmp / "subjects" / f"{name}.nii.gz")
                subjects[name] = {**asdict(spec), "mask": f"subjects/{name}.nii.gz"}
            index = {"format": BUNDLE_FORMAT, "captioner": "captioner",
                     "latent_head": "latent_head" if self.head is not None else None,
                     "diffusion": diffusion, "settings": self.settings, "subjects": subjects, "card": self.card}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            from mindsemantix.model_card import model_card

            (tmp / "README.md").write_text(model_card(index, self.captioner, self.head))
        return folder

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, local_files_only: bool = False, load_diffusion: bool = True,
                        revision: str | None = None) -> "MindSemantixPipeline":
        """Load a bundle folder, or download one from the Hugging Face Hub by id."""
        root = locate_bundle(path_or_hub_id, local_files_only, revision)
        index = read_index(root)
        captioner = BrainCaptioner.from_pretrained(root / index["captioner"])
        head = LatentHead.from_pretrained(root / index["latent_head"]) if index.get("latent_head") else None
        diffusion = resolve_reference(index["diffusion"], root) if index.get("diffusion") else None
        subjects = {name: SubjectSpec(**spec) for name, spec in index["subjects"].items()}
        return cls(captioner, head, subjects, diffusion, index.get("settings"), root, index.get("card"),
                   load_diffusion=load_diffusion)

    def push_to_hub(self, repo_id: str, private: bool = True, token: str | None = None, folder: str | Path | None = None) -> str:
        """Upload the bundle (this pipeline's folder, or `folder`) to a Hub model repository."""
        from huggingface_hub import HfApi

        source = Path(folder) if folder else self.root
        if source is None or not (source / INDEX).is_file():
            raise BundleError("push_to_hub uploads a bundle folder: save_pretrained(DIR) first, or pass folder=DIR")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(source), repo_type="model"))

    @classmethod
    def from_run(cls, run: str | Path, data: str | Path | None = None, load_diffusion: bool = True) -> "MindSemantixPipeline":
        """Stage 2 (`<run>/align/export`) and stage 3 (`<run>/reconstruct/export`) of a run, with the
        subjects of the shard dataset they were trained on (`data`, default: the one the stage-2
        config names)."""
        run = Path(run)
        align, recon = run / "align" / "export", run / "reconstruct" / "export"
        for folder in (align, recon):
            if not (folder / "config.json").is_file():
                raise BundleError(f"{run}: {folder.relative_to(run)} is missing (train the stage first)")
        recon_config, _ = load_export(recon, "brain_reconstruct")
        trained_on = Path(resolve_reference(recon_config["align_export"], recon))
        if trained_on.resolve() != align.resolve():
            raise BundleError(f"{recon}: its head was trained on {trained_on}, not on {align}; bundle a run whose "
                              "stage 3 reads its stage-2 export")
        data_root = Path(data) if data else _data_of(run / "align")
        captioner = BrainCaptioner.from_pretrained(align)
        head = LatentHead.from_pretrained(recon)
        settings = {k: recon_config[k] for k in ("sampling", "scheduler", "n_candidates", "combine_candidates", "resolution")
                    if k in recon_config}
        if settings.get("combine_candidates", "mean") != "mean":
            raise BundleError(f"{recon}: combine_candidates {settings['combine_candidates']!r} needs a vision encoder; "
                              "bundles decode with the mean of the candidates")
        subjects = _subjects_of(data_root, captioner.subjects)
        card = {"run": run.name, "data": _dataset_summary(data_root), "eval": _eval_summary(run)}
        return cls(captioner, head, subjects, resolve_reference(recon_config["diffusion"], recon), settings,
                   data_root, card, load_diffusion=load_diffusion)


def locate_bundle(path_or_hub_id: str | Path, local_files_only: bool = False, revision: str | None = None) -> Path:
    """The local folder of a bundle: the path itself, or the Hub snapshot of an id."""
    root = Path(path_or_hub_id).expanduser()
    if root.is_dir():
        return root
    if Path(path_or_hub_id).is_absolute() or str(path_or_hub_id).startswith((".", "~")):
        raise BundleError(f"{path_or_hub_id}: no such bundle folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_hub_id), revision=revision, local_files_only=local_files_only))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: one message naming it
        raise BundleError(f"{path_or_hub_id}: not a local folder, and the hub copy could not be had "
                          f"({type(e).__name__}: {e})") from e


def read_index(root: Path) -> dict[str, Any]:
    """A bundle's `model_index.json`, checked."""
    index_path = root / INDEX
    if not index_path.is_file():
        raise BundleError(f"{root}: not a MindSemantix bundle ({INDEX} is missing)")
    return read_format_json(index_path, BUNDLE_FORMAT, BundleError)


def to_pil(image: torch.Tensor):
    """uint8 (3, H, W) -> PIL image."""
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def _bring_frozen_parts(folder: Path) -> None:
    """Copy the local folders a saved captioner names (its Q-Former tokenizer / text model, its LLM)
    into `folder/frozen/` and name them relative to it; hub ids and registry names stay."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    slots = [(config["qformer"], "tokenizer"), (config["qformer"], "text_init")]
    if config.get("llm"):
        slots.append((config["llm"], "name"))
    for holder, key in slots:
        value = holder.get(key)
        if value and Path(value).is_dir():
            target = folder / "frozen" / key
            shutil.copytree(value, target)
            holder[key] = reference(target, folder)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _data_of(stage_dir: Path) -> Path:
    """The first shard dataset a stage's saved `config.yaml` names."""
    import yaml

    config = stage_dir / "config.yaml"
    if not config.is_file():
        raise BundleError(f"{stage_dir}: config.yaml is missing; pass the shard dataset with --data")
    data = yaml.safe_load(config.read_text()).get("data") or {}
    datasets = data.get("init_args", data).get("datasets")  # LightningCLI saves the fixed datamodule's args flat
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    if not datasets or not Path(datasets[0]).is_dir():
        raise BundleError(f"{config}: names no shard dataset that exists here ({datasets}); pass it with --data")
    return Path(datasets[0])


def _subjects_of(root: Path, names: Sequence[str]) -> dict[str, SubjectSpec]:
    """Mask, voxel count, normalisation and held-out test images of each subject the model knows."""
    from mindsemantix.data.shards import ShardDataset, read_manifest

    manifest = read_manifest(root)
    dataset = ShardDataset(root, verify="none")
    held_out: dict[str, list[int]] = {}
    if "test" in dataset.splits:
        for ref in dataset.samples("test"):
            subject, image_id = ref.key.rsplit("-", 1)
            held_out.setdefault(subject, []).append(int(image_id))
    normalisation = manifest.get("normalisation", {})
    out = {}
    for name in names:
        entry = manifest["subjects"].get(name)
        if entry is None:
            continue  # a subject of another dataset (e.g. the pretraining corpus): not decodable here
        out[name] = SubjectSpec(int(entry["n_voxels"]), entry["mask"],
                                {k: v for k, v in normalisation.items() if k in ("scale", "zscore")},
                                sorted(held_out.get(name, [])))
    if not out:
        raise BundleError(f"{root}: none of the model's subjects ({', '.join(names)}) is in this dataset")
    return out


def _dataset_summary(root: Path) -> dict[str, Any]:
    from mindsemantix.data.shards import read_manifest

    manifest = read_manifest(root)
    return {"dataset": manifest.get("dataset"), "subjects": sorted(manifest["subjects"]),
            "samples": {split: info["n_samples"] for split, info in manifest["splits"].items()}}


def _eval_summary(run: Path) -> dict[str, Any] | None:
    """The report's metrics of this run, if `make eval` wrote them (`reports/<run>/eval.json`)."""
    for candidate in (run.parent.parent / "reports" / run.name / "eval.json", run / "eval.json"):
        if candidate.is_file():
            report = json.loads(candidate.read_text())
            return {"model": report.get("metrics"), "baselines": report.get("baselines")}
    return None


__all__ = ["MindSemantixPipeline", "SubjectSpec", "DecodeOutput", "BundleError", "BUNDLE_FORMAT"]
