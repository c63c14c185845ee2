"""Stage 3 (BrainReconstruct) with tiny random SD parts and a tiny stage-2 export: training,
checkpoints and exports without frozen weights, the export round trip, and predict's outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from mindsemantix.data.datamodule import BrainDataModule
from mindsemantix.export import load_export
from mindsemantix.models.diffusion import load_png
from mindsemantix.stages.reconstruct import BrainReconstruct, LatentHead
SAMPLING = {"num_inference_steps": 2, "strength": 0.5, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def stage3_inputs(tmp_path_factory):
    """A tiny dataset (2 subjects, 16 px images), a stage-2 export over a tiny stage-1 encoder that
    knows both subjects, a tiny random SD folder, and stage 2's captions for the test keys."""
    from conftest import make_tiny_dataset
    from helpers import write_tiny_exports

    root = tmp_path_factory.mktemp("stage3")
    data = make_tiny_dataset(root / "data", n_images={"train": 12, "val": 4, "test": 5}, image_size=16)
    exports = write_tiny_exports(root, data)
    dm = BrainDataModule(str(data), batch_size=4, fields=["captions", "image"])
    dm.setup()
    keys = sorted(r.key for r in dm.split_refs("test"))
    (root / "captions.jsonl").write_text("".join(json.dumps({"key": k, "caption": f"decoded {k}"}) + "\n" for k in keys))
    return {"root": root, "data": str(data), "align": exports["align"], "sd": exports["sd"],
            "captions": str(root / "captions.jsonl"), "test_keys": keys}


def datamodule(s) -> BrainDataModule:
    return BrainDataModule(s["data"], batch_size=4, eval_batch_size=3, fields=["captions", "image"])


def model(s, **kwargs) -> BrainReconstruct:
    torch.manual_seed(0)
    return BrainReconstruct(**{"align_export": s["align"], "diffusion": s["sd"], "captions": s["captions"],
                               "sampling": SAMPLING, "head": {"hidden": 32, "token_dim": 8}, "warmup_steps": 1,
                               "predict_dir": str(s["root"] / "predict"), "score": False, **kwargs})


def trainer(root: Path, steps: int = 0, **kwargs) -> L.Trainer:
    from mindsemantix.writers import ReconstructionWriter

    return L.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=str(root), logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=1, callbacks=[ReconstructionWriter()], **kwargs)


def test_latent_head_shapes():
    head = LatentHead(n_tokens=4, width=32, latent_shape=(4, 8, 8), token_dim=8, hidden=16, embed_dim=12)
    out = head(torch.randn(3, 4, 32))
    assert out["latent"].shape == (3, 4, 8, 8) and out["embedding"].shape == (3, 12)
    with pytest.raises(ValueError, match="expects"):
        head(torch.randn(3, 5, 32))


def test_fit_keeps_frozen_parts_out_of_checkpoints_and_export(stage3_inputs):
    s = stage3_inputs
    m = model(s, export_dir=str(s["root"] / "fit" / "export"))
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"head"}                                        # SD and the stage-2 model are frozen
    assert m.latent_shape == (4, 8, 8)                                  # the tiny VAE's latent of a 16 px image
    before = {k: v.clone() for k, v in m.head.state_dict().items()}
    frozen_before = m.sd["unet"].conv_in.weight.clone()
    t = trainer(s["root"] / "fit", 3, val_check_interval=2)
    t.fit(m, datamodule=datamodule(s))
    assert {"train/latent_mse", "val/latent_mse"} <= set(t.callback_metrics)
    assert any(not torch.equal(before[k], v) for k, v in m.head.state_dict().items())  # the head trained
    assert torch.equal(frozen_before, m.sd["unet"].conv_in.weight)     # SD did not
    assert m.latent_cache is not None and len(m.latent_cache.rows) == 12 + 4 + 5  # VAE latents, once per image id

    state = torch.load(next((s["root"] / "fit").rglob("*.ckpt")), weights_only=True)["state_dict"]
    assert state and all(k.startswith("head.") for k in state)          # no sd.*, brain.* in the checkpoint
    config, tensors = load_export(s["root"] / "fit" / "export", "brain_reconstruct")
    assert set(tensors) == {f"head.{k}" for k in m.head.state_dict()}
    # what the head reads, recorded relative to the export folder (the run can move as a whole)
    export_dir = s["root"] / "fit" / "export"
    assert config["diffusion"].startswith("../") and config["align_export"].startswith("../")
    assert (export_dir / config["diffusion"]).resolve() == Path(s["sd"]).resolve()
    assert (export_dir / config["align_export"]).resolve() == Path(s["align"]).resolve()
    assert config["latent_shape"] == [4, 8, 8]

    # resuming: a fresh model loads the checkpoint's state dict strictly (frozen keys may be absent)
    fresh = model(s)
    fresh.load_state_dict(state)
    for k, v in fresh.head.state_dict().items():
        assert torch.equal(state[f"head.{k}"], v)

    # the export rebuilds the same model: same predicted latents for the same brains
    rebuilt = BrainReconstruct.from_export(s["root"] / "fit" / "export", predict_dir=str(s["root"] / "p2"))
    dm = datamodule(s)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch["fmri"], batch["subject"])["latent"],
                                   m(batch["fmri"], batch["subject"])["latent"])


def test_predict_writes_three_variants_per_key_grid_and_timings(stage3_inputs):
    s = stage3_inputs
    m = model(s, grid_rows=3)
    outputs = trainer(s["root"] / "pred").predict(m, datamodule=datamodule(s))
    out = s["root"] / "predict"
    for variant in ("seen", "caption_only", "latent_only", "full"):
        assert sorted(p.stem for p in (out / variant).glob("*.png")) == s["test_keys"]
        assert load_png(next((out / variant).glob("*.png"))).shape == (3, 16, 16)
    assert (out / "grid.png").is_file()
    info = json.loads((out / "reconstructions.json").read_text())
    assert [r["key"] for r in info["records"]] == s["test_keys"]
    assert all(r["decoded"] == f"decoded {r['key']}" for r in info["records"])  # stage 2's captions as prompts
    assert set(info["seconds_per_image"]) == {"caption_only", "latent_only", "full"}
    assert sum(len(rows) for rows in outputs) == len(s["test_keys"])
    # predicting again gives identical images (seeded per key)
    first = {p.name: load_png(p) for p in (out / "full").glob("*.png")}
    trainer(s["root"] / "pred").predict(m, datamodule=datamodule(s))
    assert all(torch.equal(load_png(out / "full" / name), img) for name, img in first.items())


def test_missing_captions_fail_clearly(stage3_inputs, tmp_path):
    s = stage3_inputs
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"key": s["test_keys"][0], "caption": "x"}) + "\n")
    m = model(s, captions=str(partial), predict_dir=str(tmp_path / "p"))
    with pytest.raises(KeyError, match="no caption for"):
        trainer(tmp_path / "t").predict(m, datamodule=datamodule(s))


def test_full_averages_candidates_and_best_needs_an_embedding(stage3_inputs, tmp_path):
    """combine_candidates mean: each full PNG is the pixel mean of the img2img samples seeded key,
    key#1, key#2 (not one of them, not another seed's); best without an embedding fails at once."""
    s = stage3_inputs
    m = model(s, n_candidates=3, variants=["full"], predict_dir=str(tmp_path / "p"))
    trainer(tmp_path / "t").predict(m, datamodule=datamodule(s))
    batch = next(iter(datamodule(s).predict_dataloader()))
    keys = list(batch["key"])
    m.eval()  # predict ran in eval mode (the head has dropout); Lightning restores train mode afterwards
    with torch.no_grad():
        latents = m(batch["fmri"], batch["subject"])["latent"]
    prompts = m.prompts(batch)
    samples = torch.stack([m.reconstructor.full(prompts, latents, [f"{k}#{j}" if j else k for k in keys])
                           for j in range(3)]).float()  # (3, B, 3, R, R)
    assert not torch.equal(samples[0], samples[1])  # the seeds differ, so the mean is not a sample
    written = torch.stack([load_png(tmp_path / "p" / "full" / f"{k}.png") for k in keys]).float()
    assert (written - samples.mean(0)).abs().max() <= 0.5 + 1e-4
    assert (written - samples[0]).abs().max() > 1
    info = json.loads((tmp_path / "p" / "reconstructions.json").read_text())
    assert (info["n_candidates"], info["combine_candidates"]) == (3, "mean")
    with pytest.raises(ValueError, match="image_embedding"):
        model(s, n_candidates=2, combine_candidates="best")
    with pytest.raises(ValueError, match="combine_candidates"):
        model(s, combine_candidates="median")


def test_an_explicit_align_export_wins_over_the_recorded_one(stage3_inputs, tmp_path, caplog):
    """from_export(..., align_export=moved) uses the moved stage-2 export (the documented override for
    moved folders, and a relative path recorded from another working directory); a folder that is not
    the recorded one is named in a warning."""
    import shutil

    s = stage3_inputs
    model(s).export(tmp_path / "export")
    moved = tmp_path / "moved_align"
    shutil.copytree(s["align"], moved)
    shutil.copytree(s["root"] / "stage1", tmp_path / "stage1")  # it refers to its stage-1 export as ../stage1
    with caplog.at_level("WARNING", logger="mindsemantix.stages.reconstruct"):
        rebuilt = BrainReconstruct.from_export(tmp_path / "export", align_export=str(moved), diffusion=s["sd"])
    assert rebuilt.align_export == str(moved)
    assert any("trained on" in r.getMessage() and str(moved) in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mindsemantix.stages.reconstruct"):
        same = BrainReconstruct.from_export(tmp_path / "export")  # the recorded folder: no warning
    assert same.align_export == s["align"] and not caplog.records


def test_latent_infonce_scores_each_latent_against_the_other_images_only():
    """The contrastive term: a hand computation of the symmetric InfoNCE; matched latents score lower
    than shuffled ones; a second sample of the same image is neither the positive nor a negative."""
    from mindsemantix.stages.reconstruct import latent_infonce

    torch.manual_seed(0)
    target = torch.randn(4, 2, 3, 3)
    pred = target + 0.3 * torch.randn_like(target)
    ids = torch.tensor([10, 11, 12, 13])
    p = torch.nn.functional.normalize(pred.flatten(1), dim=-1)
    t = torch.nn.functional.normalize(target.flatten(1), dim=-1)
    logits = p @ t.T / 0.1
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(4))
                + torch.nn.functional.cross_entropy(logits.T, torch.arange(4))) / 2
    torch.testing.assert_close(latent_infonce(pred, target, ids, 0.1), expected)
    assert latent_infonce(pred, target, ids, 0.1) < latent_infonce(pred[[1, 2, 3, 0]], target, ids, 0.1)
    # samples 0 and 1 show the same image: each one's logit for the other is dropped
    dup = torch.tensor([10, 10, 12, 13])
    masked = logits.clone()
    masked[0, 1] = masked[1, 0] = float("-inf")
    expected_dup = (torch.nn.functional.cross_entropy(masked, torch.arange(4))
                    + torch.nn.functional.cross_entropy(masked.T, torch.arange(4))) / 2
    torch.testing.assert_close(latent_infonce(pred, target, dup, 0.1), expected_dup)
    assert not torch.isclose(expected_dup, expected)


def test_brain_cache_runs_the_frozen_model_once_per_distinct_input(stage3_inputs):
    """cache_brain: the same outputs as without the cache; the stage-2 model runs once per distinct
    (subject, voxel values) — not again for a seen input, once for a repeat inside a batch."""
    from mindsemantix.stages.reconstruct import BrainRepresentation

    s = stage3_inputs
    plain = BrainRepresentation.from_export(s["align"])
    cached = BrainRepresentation.from_export(s["align"], cache=True)
    calls = []
    original = cached.captioner.query_outputs
    cached.captioner.query_outputs = lambda fmri, subject: calls.append(len(fmri)) or original(fmri, subject)
    dm = datamodule(s)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    x, subject = batch["fmri"], batch["subject"]
    torch.testing.assert_close(cached(x, subject), plain(x, subject))
    assert calls == [len(x)]
    torch.testing.assert_close(cached(x[[1, 0]], subject), plain(x[[1, 0]], subject))  # seen inputs: no call
    assert calls == [len(x)]
    new = torch.cat([x[:1] + 1.0, x[:1] + 1.0, x[1:2]])  # one new input, twice, and a seen one
    out = cached(new, subject)
    assert calls == [len(x), 1] and torch.equal(out[0], out[1])
    torch.testing.assert_close(out[0], plain(x[:1] + 1.0, subject)[0])
    assert len(cached.cache) == len(x) + 1


def test_fit_with_the_contrastive_term_and_the_cache(stage3_inputs, tmp_path):
    s = stage3_inputs
    m = model(s, contrastive_weight=0.5, cache_brain=True)
    t = trainer(tmp_path / "fit", 4, val_check_interval=2)
    t.fit(m, datamodule=datamodule(s))
    assert {"train/latent_nce", "val/latent_nce"} <= set(t.callback_metrics)
    loss, mse, nce = (float(t.callback_metrics[f"val/{k}"]) for k in ("loss", "latent_mse", "latent_nce"))
    assert loss == pytest.approx(mse + 0.5 * nce, rel=1e-5)
    dm = datamodule(s)
    dm.setup()
    n_val = len(dm.split_refs("val"))
    # one entry per distinct input met: at most 4 steps x 4 training samples + the val samples (seen twice)
    assert n_val < len(m.brain.cache) <= 4 * 4 + n_val
    assert all(v.shape == m.brain.shape() for v in m.brain.cache.values())
    with pytest.raises(ValueError, match="contrastive_temperature"):
        model(s, contrastive_weight=0.1, contrastive_temperature=0.0)


def test_resolution_sets_the_latent_the_targets_and_the_images(stage3_inputs, tmp_path):
    """`resolution` is real: 32 px on a SD whose native size is 16 gives 16x16 latents, targets encoded
    from the seen images resized to 32, and 32 px reconstructions; a size the UNet cannot take is refused."""
    s = stage3_inputs
    m = model(s, resolution=32, variants=["latent_only", "full"], predict_dir=str(tmp_path / "p"))
    assert m.latent_shape == (4, 16, 16) and m.resolution == 32
    dm = datamodule(s)
    dm.setup()
    latents, _ = m.targets(next(iter(dm.train_dataloader())))
    assert latents.shape[1:] == (4, 16, 16)
    trainer(tmp_path / "t").predict(m, datamodule=datamodule(s))
    assert load_png(next((tmp_path / "p" / "full").glob("*.png"))).shape == (3, 32, 32)
    assert load_png(next((tmp_path / "p" / "latent_only").glob("*.png"))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="multiple of 4"):
        model(s, resolution=18)


def test_seen_image_latents_are_computed_once_in_batches_and_memory_mapped(stage3_inputs, tmp_path):
    from mindsemantix.stages.reconstruct import LatentCache

    s = stage3_inputs
    data = Path(s["data"])
    shutil.rmtree(data / ".mindsemantix-latents", ignore_errors=True)
    calls = []

    def counted(m):
        original = m.reconstructor.encode_images
        m.reconstructor.encode_images = lambda images: calls.append(len(images)) or original(images)
        return m

    m = counted(model(s))
    trainer(tmp_path / "a", 2, val_check_interval=2).fit(m, datamodule=datamodule(s))
    n_images = 12 + 4 + 5                                             # both subjects saw the same image ids
    assert sum(calls) == n_images and max(calls) == 16                # every seen image once, in batches
    files = list((data / ".mindsemantix-latents").glob("*.npy"))
    assert len(files) == 1 and isinstance(m.latent_cache.array, np.memmap)
    dm = datamodule(s)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    one = m.reconstructor.encode_images(batch["image"][:1])[0]        # alone, as the targets were before
    torch.testing.assert_close(m.latent_cache.get([int(batch["image_id"][0])])[0], one.float(), atol=1e-5, rtol=1e-4)
    calls.clear()
    again = counted(model(s))                                         # a restart / another run on the same data
    trainer(tmp_path / "b", 2, val_check_interval=2).fit(again, datamodule=datamodule(s))
    assert calls == []                                                # read from the cache, nothing re-encoded
    # another resolution is another cache, never a wrong one
    assert LatentCache.for_datasets([data], model(s, resolution=32).reconstructor, s["sd"]).path != \
        LatentCache.for_datasets([data], m.reconstructor, s["sd"]).path
