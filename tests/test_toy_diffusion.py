"""The toy Stable Diffusion recipe (data_recipes/toy_diffusion.py): the prompt-faithfulness measure,
reading an NSD-layout tree without its test images, and a micro end-to-end run that saves a
diffusers folder which loads as SD 1.5 would."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mindsemantix.simulate.captions import canonical_caption, describe
from mindsemantix.simulate.scenes import render_scenes, sample_scene

ROOT = Path(__file__).resolve().parents[1]


def _load_recipe():
    spec = importlib.util.spec_from_file_location("toy_diffusion", ROOT / "data_recipes" / "toy_diffusion.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_diffusion"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


T = _load_recipe()


def scenes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_faithfulness_measure_recognises_true_renderings_and_not_others():
    s = scenes(40)
    images = render_scenes(s, 32)
    exact = T.attribute_accuracy(images, s)
    for attr in ("background", "colour", "shape"):
        assert exact[attr]["accuracy"] == 1.0                     # the truth is the nearest of its counterfactuals
    assert exact["place"]["accuracy"] >= 0.9 and exact["size"]["accuracy"] >= 0.9  # jittered vs cell centres
    shuffled = T.attribute_accuracy(np.roll(images, 1, axis=0), s)  # every image paired with another scene
    assert shuffled["mean"]["accuracy"] < exact["mean"]["accuracy"] - 0.4
    assert exact["colour"]["chance"] == pytest.approx(1 / 8) and exact["background"]["chance"] == pytest.approx(1 / 4)


def write_tiny_study(root: Path, n_images: int = 12, shared: tuple[int, ...] = (2, 5, 7, 11), size: int = 32) -> Path:
    """An NSD-layout tree with only what the recipe reads: expdesign, stim info, imgBrick, COCO
    captions and the simulator's truth.json."""
    from mindsemantix.data.nsd import NSDLayout
    from mindsemantix.simulate import nsd_layout

    layout = NSDLayout(root)
    s = scenes(n_images, seed=3)
    rng = np.random.default_rng(0)
    coco_id = np.arange(100, 100 + n_images)
    is_shared = np.isin(np.arange(n_images), shared)
    nsd_layout.write_expdesign(layout.expdesign, np.arange(1, n_images + 1), np.arange(1, n_images + 1)[None],
                               np.array(shared) + 1, 1)
    nsd_layout.write_stim_info(layout.stim_info, coco_id, ["train2017"] * n_images, is_shared,
                               np.ones((1, n_images), bool), np.zeros((1, n_images, 3), np.int64))
    nsd_layout.write_stimuli(layout.stimuli, render_scenes(s, size))
    nsd_layout.write_coco_captions(layout.annotations, coco_id, ["train2017"] * n_images,
                                   [describe(x, rng, 3) for x in s], size)
    truth = {"images": [{"nsd_id": i, "shared": bool(is_shared[i]), "novel": False, "scene": x.to_dict(),
                         "canonical_caption": canonical_caption(x)} for i, x in enumerate(s)]}
    (root / "toyworld_truth").mkdir(parents=True)
    (root / "toyworld_truth" / "truth.json").write_text(json.dumps(truth))
    return root


def test_training_set_excludes_the_shared_test_images(tmp_path):
    root = write_tiny_study(tmp_path / "nsd")
    data, test = T.load_study(root, resolution=16)
    assert data.images.shape == (8, 16, 16, 3) and data.images.dtype == np.uint8
    assert sorted(data.image_ids.tolist()) == [0, 1, 3, 4, 6, 8, 9, 10]  # sharedix never trained on
    assert test["nsd_ids"] == [2, 5, 7, 11] and len(test["scenes"]) == 4  # ... but used to measure faithfulness
    assert all(len(c) == 3 for c in data.captions) and all(c and c.endswith(".") for c in data.canonical)


def test_micro_recipe_saves_a_diffusers_folder_that_loads_like_sd15(tmp_path):
    from mindsemantix.models.diffusion import Reconstructor, SamplingConfig, load_stable_diffusion

    root = write_tiny_study(tmp_path / "nsd")
    recipe = dataclasses.replace(T.SCALES["tiny"], vae_steps=3, unet_steps=3, vae_batch=4, unet_batch=4,
                                 warmup_steps=1, eval_scenes=4, eval_steps=2)
    summary = T.build(root, tmp_path / "toy_sd", recipe, progress=False)
    out = tmp_path / "toy_sd"
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "samples.png", "toy_sd.json"):
        assert (out / part).exists()
    assert summary["provenance"]["n_train_images"] == 8
    f = summary["faithfulness"]
    assert f["n_scenes"] == 4 and f["scenes"] == "shared test images of the study"
    assert set(f["text2img"]) >= {"background", "colour", "shape", "mean"} and "vae_reconstruction" in f

    pipe = load_stable_diffusion(str(out))                       # StableDiffusionPipeline, local_files_only
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.tokenizer.model_max_length == recipe.model.max_length
    assert pipe.vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])  # set from the data
    rec = Reconstructor(pipe, SamplingConfig(num_inference_steps=2))
    images = rec.reconstruct(["a-000001"], ["a red circle."], torch.zeros(1, *rec.latent_shape))
    assert images["full"].shape == (1, 3, 16, 16) and rec.latent_shape == (4, 8, 8)

    # a second run with the same recipe and data finds the folder complete and trains nothing
    again = T.build(root, out, recipe, progress=False)
    assert again["train_seconds"] == summary["train_seconds"]


def test_unet_training_saves_the_moving_average_of_the_weights():
    """With ema_decay the weights left in the pipeline are the average (decay ramping up as
    (1 + n) / (10 + n)) of the raw weights after each step, not the last raw weights."""
    from mindsemantix.models.diffusion import small_stable_diffusion

    recipe = dataclasses.replace(T.SCALES["tiny"], unet_steps=6, unet_batch=4, warmup_steps=1, ema_decay=0.5)
    pipe = small_stable_diffusion(recipe.model, seed=0)
    latent = torch.randn(5, 4, 8, 8)
    params = lambda: [p.detach().clone() for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())]
    expected, raw = params(), []

    def on_step(step: int) -> None:  # after step n: average <- lerp(average, raw, 1 - min(decay, (1 + n) / (10 + n)))
        raw[:] = params()
        n = step - 1
        for e, p in zip(expected, raw):
            e.lerp_(p, 1 - min(recipe.ema_decay, (1 + n) / (10 + n)))

    T.train_unet(pipe, latent, torch.full_like(latent, 0.1), [["a red circle."]] * 5, [None] * 5, recipe,
                 torch.device("cpu"), progress=False, on_step=on_step)
    final = params()
    assert all(torch.allclose(f, e, atol=1e-6) for f, e in zip(final, expected))
    assert max((f - r).abs().max().item() for f, r in zip(final, raw)) > 1e-4  # not the last raw weights
