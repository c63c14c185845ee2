"""Baselines (chance, ridge retrieval) on plain arrays and on shards, and the report (docs/formats.md)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mindsemantix.eval import baselines as B
from mindsemantix.eval import report as R


def test_chance_captions_are_seeded_training_captions():
    train = {f"t{i}": [f"caption {i} a", f"caption {i} b"] for i in range(20)}
    a = B.chance_captions(["x", "y", "z"], train, seed=1)
    assert a == B.chance_captions(["z", "x", "y"], train, seed=1)  # order of keys does not matter
    assert set(a) == {"x", "y", "z"}
    assert all(c in {c for caps in train.values() for c in caps} for c in a.values())
    assert a != B.chance_captions(["x", "y", "z"], train, seed=2)


def test_derangement_never_pairs_an_image_with_itself():
    for seed in range(20):
        d = B.derangement([f"k{i}" for i in range(7)], seed)
        assert sorted(d) == sorted(d.values()) and all(k != v for k, v in d.items())
    with pytest.raises(ValueError):
        B.derangement(["only"])


def test_ridge_recovers_a_linear_map_and_picks_the_penalty_by_leave_one_out():
    rng = np.random.default_rng(0)
    for n, v in [(60, 200), (150, 40)]:  # more voxels than samples (as with fMRI), and fewer
        x = rng.normal(size=(n, v))
        w = rng.normal(size=(v, 5))
        y = x @ w + 3.0
        y_noisy = y + rng.normal(scale=30.0, size=y.shape)
        clean, noisy = B.fit_ridge(x, y), B.fit_ridge(x, y_noisy)
        assert noisy.alpha > clean.alpha  # more noise -> more shrinkage
        x_new = rng.normal(size=(10, v))
        assert np.corrcoef(clean.predict(x_new).ravel(), (x_new @ w + 3.0).ravel())[0, 1] > 0.5

        # independent computation: the normal equations of ridge with an unpenalised intercept, and
        # the leave-one-out error by refitting without each sample
        def ridge(xa, ya, a):
            xm, ym = xa.mean(0), ya.mean(0)
            wa = np.linalg.solve((xa - xm).T @ (xa - xm) + a * np.eye(xa.shape[1]), (xa - xm).T @ (ya - ym))
            return lambda xb: (xb - xm) @ wa + ym

        scale = np.mean(np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2)
        for fit, target in ((clean, y), (noisy, y_noisy)):
            a = fit.alpha * scale
            np.testing.assert_allclose(fit.predict(x_new), ridge(x, target, a)(x_new), atol=1e-6)
            loo = np.mean([(ridge(np.delete(x, i, 0), np.delete(target, i, 0), a)(x[i:i + 1]) - target[i]) ** 2
                           for i in range(n)])
            assert fit.loo_mse[fit.alpha] == pytest.approx(loo, rel=1e-6)

        # one decomposition of x serves several fits (the caption and image baselines of a subject)
        svd = B.CentredSVD.of(x)
        for fit, target in ((clean, y), (noisy, y_noisy)):
            shared = B.fit_ridge(svd, target)
            assert shared.alpha == fit.alpha and shared.loo_mse == fit.loo_mse
            np.testing.assert_array_equal(shared.weights, fit.weights)
        with pytest.raises(ValueError, match="N = "):
            B.fit_ridge(svd, y[:-1])


class WordCounts:
    """Stand-in sentence encoder: normalised word counts."""

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, sentences):
        out = torch.zeros(len(sentences), len(self.vocab))
        for i, s in enumerate(sentences):
            for word in s.split():
                out[i, self.vocab.index(word)] += 1
        return torch.nn.functional.normalize(out, dim=-1)


def test_ridge_retrieval_returns_the_caption_the_voxels_encode():
    rng = np.random.default_rng(1)
    words = ["dog", "cat", "car", "tree", "boat", "house"]
    enc = WordCounts(words)
    captions = [[f"{words[i % 6]} {words[(i * 5 + 1) % 6]}"] for i in range(48)]
    targets = B.caption_targets(captions, enc)  # (48, 6)
    mixing = rng.normal(size=(6, 40))
    x = targets @ mixing + rng.normal(scale=0.01, size=(48, 40))  # voxels linearly encode the caption
    preds, fit = B.ridge_caption_retrieval(x[:40], captions[:40], x[40:], enc)
    # (word counts cannot tell "dog cat" from "cat dog": compare the words)
    assert [sorted(p.split()) for p in preds] == [sorted(c[0].split()) for c in captions[40:]]
    assert fit.weights.shape == (40, 6)
    with pytest.raises(ValueError, match="caption lists"):
        B.ridge_caption_retrieval(x[:40], captions[:39], x[40:], enc)


def test_load_split_arrays_from_shards(tiny_dataset):
    test = B.load_split_arrays(tiny_dataset, "test", images=True)
    assert sorted(test) == ["subj01", "subj02"]
    arr = test["subj01"]
    assert arr.x.shape == (4, 40) and len(arr.keys) == 4 and arr.keys == sorted(arr.keys)
    image_id = int(arr.keys[0].rsplit("-", 1)[1])
    # the fixture's fMRI is image/1000 + voxel/1e4 + repetition (0, 1, 2): mean over repetitions adds 1
    np.testing.assert_allclose(arr.x[0], image_id / 1000 + np.arange(40) / 1e4 + 1.0, atol=2e-3)  # float16 storage
    assert arr.captions[0][0] == f"image {image_id} caption 0" and arr.images[0].shape == (16, 16, 3)


def _fake_metrics_csv(path):
    path.parent.mkdir(parents=True)
    rows = ["epoch,step,train/loss,val/loss"] + [f"0,{s},{2.0 / (s + 1)}," for s in range(0, 50, 5)] + ["0,49,,0.4"]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_baselines_and_report_end_to_end(tiny_dataset, tmp_path, monkeypatch):
    # Without java on PATH: no tokenizer JVM per caption set (the Java path is checked against
    # pycocoevalcap in test_eval_captions.py); the report must say which implementations it used.
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    bdir = tmp_path / "baselines"
    assert B.main(["--data", str(tiny_dataset), "--out", str(bdir), "--seed", "3"]) == 0
    refs = [json.loads(line) for line in (bdir / "references.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in refs]
    assert len(keys) == 8 and all((bdir / "seen" / f"{k}.png").is_file() for k in keys)
    for name in ("chance", "ridge_retrieval"):
        preds = [json.loads(line) for line in (bdir / f"{name}.jsonl").read_text().splitlines()]
        assert [p["key"] for p in preds] == keys and all(p["caption"].startswith("image ") for p in preds)
    chance_imgs = {k: np.asarray(Image.open(bdir / "chance_images" / f"{k}.png")) for k in keys}
    seen_imgs = {k: np.asarray(Image.open(bdir / "seen" / f"{k}.png")) for k in keys}
    assert sum(np.array_equal(chance_imgs[k], seen_imgs[k]) for k in keys) < len(keys)

    # The fixture's stimuli are flat colours (no defined pixel correlation): textured ones instead,
    # shuffled the same way for the chance images. The model: perfect reconstructions, first
    # reference as its caption.
    rng = np.random.default_rng(0)
    textured = {k: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for k in keys}
    B.write_image_folder(bdir / "seen", textured)
    B.write_image_folder(bdir / "chance_images", {k: textured[src] for k, src in B.derangement(keys, 3).items()})
    model_imgs = tmp_path / "model_recons"
    shutil.copytree(bdir / "seen", model_imgs)
    model_caps = tmp_path / "model.jsonl"
    model_caps.write_text("".join(json.dumps({"key": r["key"], "caption": r["captions"][0]}) + "\n" for r in refs))
    csv_path = _fake_metrics_csv(tmp_path / "runs" / "pretrain" / "metrics.csv")

    out = tmp_path / "reports" / "run1"
    argv = ["--out", str(out), "--run", "run1", "--predictions", str(model_caps), "--baselines-dir", str(bdir),
            "--images", f"model={model_imgs}", "--metrics-csv", str(csv_path), "--meteor", "off", "--seed", "3",
            "--sentence-encoder", "none"]  # SentenceSim: tested in test_eval_captions.py
    assert R.main(argv) == 0

    ev = json.loads((out / "eval.json").read_text())
    assert {"metrics", "baselines", "ceiling", "versions"} <= set(ev)
    assert ev["metrics"]["BLEU-1"] == pytest.approx(1.0) and ev["metrics"]["PixCorr"] == pytest.approx(1.0)
    assert ev["metrics"]["TwoWay-EfficientNetLite0"] == 1.0 and "SentenceSim" not in ev["metrics"]
    assert list(ev["baselines"]) == ["chance", "ridge_retrieval"]
    assert {"BLEU-4", "PixCorr", "SSIM"} <= set(ev["baselines"]["chance"])  # caption and image chance in one
    assert abs(ev["baselines"]["chance"]["PixCorr"]) < 0.3 and ev["baselines"]["chance"]["BLEU-4"] < 0.9
    assert "BLEU-1" in ev["ceiling"] and ev["versions"]["seed"] == 3 and ev["versions"]["packages"]["torch"]
    assert ev["implementations"]["captions"]["meteor_impl"].startswith("unavailable")
    assert ev["implementations"]["captions"]["tokenizer_impl"].startswith("nltk") and ev["versions"]["java"] is None

    # paired differences: image by image, over the same keys, for the metrics that are means over images
    paired = ev["paired"]
    assert set(paired) == {"chance", "ridge_retrieval"}
    assert {"PixCorr", "SSIM", "TwoWay-EfficientNetLite0", "ROUGE-L", "CIDEr"} <= set(paired["chance"])
    assert "BLEU-4" not in paired["chance"]  # a corpus statistic: no per-image values
    for metric in ("PixCorr", "CIDEr"):
        e = paired["chance"][metric]
        assert e["difference"] == pytest.approx(ev["metrics"][metric] - ev["baselines"]["chance"][metric], abs=1e-9)
        assert e["n"] == 8 and e["low"] <= e["difference"] <= e["high"]
    assert paired["chance"]["PixCorr"]["low"] > 0.5  # perfect reconstructions against shuffled textures
    assert set(paired["ridge_retrieval"]) == {"ROUGE-L", "CIDEr"}  # a caption baseline: caption metrics only

    md = (out / "eval.md").read_text()
    assert "## Model minus each baseline, image by image" in md and "| model minus | chance | ridge_retrieval |" in md
    assert "| metric | model | chance | ridge_retrieval | ceiling (refs vs refs) |" in md
    assert "not comparable to the simulated study" in md and "UMBRAE" in md and "MindEye2" in md
    assert "METEOR: unavailable: turned off" in md and "no TwoWay-AlexNet: no weights given" in md
    for picture in ("metrics.png", "samples.png", "curves.png"):
        assert f"![{picture}]({picture})" in md
        with Image.open(out / picture) as im:
            assert im.format == "PNG" and im.size[0] > 200
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes left no temp files


def test_lightning_csv_reader(tmp_path):
    series = R.read_lightning_csv(_fake_metrics_csv(tmp_path / "a" / "metrics.csv"))
    assert set(series) == {"train/loss", "val/loss"}
    steps, values = series["val/loss"]
    assert steps.tolist() == [49.0] and values.tolist() == [0.4]
    assert len(series["train/loss"][1]) == 10


def test_anchor_numbers_are_fractions_with_sources():
    for anchor in R.ANCHORS_NSD:
        assert anchor["source"] and anchor["task"] in ("captions", "images")
        for name, value in anchor["metrics"].items():
            assert 0 <= value <= 1, (anchor["method"], name)


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 1.0, 400)
    mean, low, high = R.paired_bootstrap(d)
    assert mean == pytest.approx(d.mean()) and low < mean < high
    # the normal-theory 95% interval of a mean: +-1.96 standard errors
    assert (high - low) == pytest.approx(2 * 1.96 * d.std() / np.sqrt(len(d)), rel=0.1)
    assert R.paired_bootstrap(d) == (mean, low, high)  # seeded
    assert R.paired_bootstrap(np.full(50, 0.25)) == pytest.approx((0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match="at least 2"):
        R.paired_bootstrap(np.array([1.0]))


def test_paired_differences_pair_images_by_key_and_give_a_verdict():
    model = {"PixCorr": {"a": 0.5, "b": 0.6, "c": 0.7}, "SSIM": {"a": 0.5}}
    baseline = {"PixCorr": {"c": 0.6, "b": 0.5, "a": 0.4, "z": 9.0}, "SSIM": {"a": 0.4}, "CIDEr": {"a": 1.0}}
    out = R.paired_differences(model, baseline)
    assert set(out) == {"PixCorr"}  # SSIM: one common image; CIDEr: not scored for the model
    assert out["PixCorr"]["n"] == 3 and out["PixCorr"]["difference"] == pytest.approx(0.1)
    assert R.paired_verdict(out["PixCorr"]) == "above"
    assert R.paired_verdict({"low": -0.01, "high": 0.02}) == "level"
    assert R.paired_verdict({"low": -0.03, "high": -0.01}) == "below"
    table = R.paired_table({"baselines": {"x": {}}, "paired": {"x": out}})
    assert "| PixCorr | +0.100 [+0.100, +0.100] |" in table
