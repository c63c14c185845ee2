"""Image scorer: PixCorr / SSIM / 2-way identification against independent computations, the
offline feature net, image folders, the CLI and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mindsemantix.eval import images as I
from mindsemantix.eval.feature_nets import FeatureNet, alexnet_nets, build_feature_nets


def pixels_net() -> FeatureNet:
    """A transparent feature net: 8x8 average-pooled pixels."""
    return FeatureNet("Pixels", lambda x: torch.nn.functional.adaptive_avg_pool2d(x.float(), 8).flatten(1))


def noise(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def test_identical_images_score_one():
    imgs = noise(4, 48, seed=0)
    m = I.score_images(imgs, imgs.clone(), feature_nets=[pixels_net()])["metrics"]
    assert m["PixCorr"] == pytest.approx(1.0, abs=1e-12)
    assert m["SSIM"] == pytest.approx(1.0, abs=1e-12)
    assert m["TwoWay-Pixels"] == 1.0


def test_independent_noise_scores_near_zero():
    # at the evaluation size itself, so no resizing smooths the noise
    m = I.score_images(noise(6, I.EVAL_SIZE, seed=1), noise(6, I.EVAL_SIZE, seed=2), feature_nets=[])["metrics"]
    assert abs(m["PixCorr"]) < 0.01
    assert abs(m["SSIM"]) < 0.03


def test_pixcorr_matches_numpy_corrcoef_on_rgb():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 256, (3, 3, I.EVAL_SIZE, I.EVAL_SIZE), dtype=np.uint8)
    pred = np.clip(target + rng.normal(0, 60, target.shape), 0, 255).astype(np.uint8)
    m = I.score_images(pred, target, feature_nets=[])["metrics"]
    expected = np.mean([np.corrcoef(p.reshape(-1) / 255, t.reshape(-1) / 255)[0, 1] for p, t in zip(pred, target)])
    assert m["PixCorr"] == pytest.approx(expected, abs=1e-10)
    assert 0.5 < m["PixCorr"] < 0.95


def test_ssim_matches_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    from skimage.color import rgb2gray

    rng = np.random.default_rng(4)
    target = rng.random((2, 3, I.EVAL_SIZE, I.EVAL_SIZE))
    pred = np.clip(target + rng.normal(0, 0.2, target.shape), 0, 1)
    as_u8 = lambda x: (x * 255).round().astype(np.uint8)  # noqa: E731
    m = I.score_images(as_u8(pred), as_u8(target), feature_nets=[])["metrics"]
    # MindEye's call: rgb2gray, then structural_similarity(recon, image, gaussian_weights=True, sigma=1.5,
    # use_sample_covariance=False, data_range=1.0)
    expected = np.mean([skimage_metrics.structural_similarity(
        rgb2gray(p.transpose(1, 2, 0) / 255.0), rgb2gray(t.transpose(1, 2, 0) / 255.0), gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False, data_range=1.0) for p, t in zip(as_u8(pred), as_u8(target))])
    assert m["SSIM"] == pytest.approx(expected, abs=1e-10)
    assert 0.1 < m["SSIM"] < 0.9


def test_resizing_to_425_before_pixel_metrics():
    # a smooth image survives the up-sampling: nearly the same PixCorr at 48 px and after resizing
    y, x = np.mgrid[0:48, 0:48] / 47.0
    target = (np.stack([x, y, x * y]) * 255).astype(np.uint8)[None].repeat(2, 0)
    pred = (np.stack([x, y, 1 - x * y]) * 255).astype(np.uint8)[None].repeat(2, 0)
    m = I.score_images(pred, target, feature_nets=[])
    assert m["info"]["size"] == 425
    direct = np.corrcoef(pred[0].reshape(-1).astype(float), target[0].reshape(-1).astype(float))[0, 1]
    assert m["metrics"]["PixCorr"] == pytest.approx(direct, abs=0.02)


def brute_force_two_way(pred: np.ndarray, target: np.ndarray) -> float:
    """MindEye's definition written out pair by pair with np.corrcoef."""
    n = len(pred)
    correct = 0
    for j in range(n):
        congruent = np.corrcoef(target[j], pred[j])[0, 1]
        correct += sum(np.corrcoef(target[i], pred[j])[0, 1] < congruent for i in range(n) if i != j)
    return correct / (n * (n - 1))


def test_two_way_identification_definition():
    rng = np.random.default_rng(5)
    target = rng.normal(size=(30, 50))
    pred = target + rng.normal(scale=2.0, size=target.shape)  # partly informative
    assert I.two_way_identification(pred, target) == pytest.approx(brute_force_two_way(pred, target), abs=1e-12)
    assert I.two_way_identification(target, target) == 1.0
    per_image = I.two_way_per_image(pred, target)  # prediction j: share of the other targets it beats
    r = np.corrcoef(target, pred)[:30, 30:]
    assert per_image[3] == pytest.approx(np.mean([r[i, 3] < r[3, 3] for i in range(30) if i != 3]))
    assert per_image.mean() == pytest.approx(I.two_way_identification(pred, target), abs=1e-12)
    shuffled = [I.two_way_identification(rng.normal(size=(200, 64)), rng.normal(size=(200, 64))) for _ in range(3)]
    assert np.mean(shuffled) == pytest.approx(0.5, abs=0.03)


def test_two_way_of_shuffled_predictions_is_chance():
    imgs = noise(40, 16, seed=6)
    order = torch.from_numpy(np.random.default_rng(7).permutation(40))
    result = I.score_images(imgs[order], imgs, feature_nets=[pixels_net()], size=32)  # small: fast
    m = result["metrics"]
    assert m["TwoWay-Pixels"] == pytest.approx(0.5, abs=0.12)
    assert set(result["per_image"]) == {"PixCorr", "SSIM", "TwoWay-Pixels"}
    for metric, values in result["per_image"].items():  # each metric is the mean of its per-image values
        assert len(values) == 40 and np.mean(values) == pytest.approx(m[metric], abs=1e-12), metric


def test_offline_efficientnet_lite0_net():
    nets, unavailable = build_feature_nets()
    assert [n.name for n in nets] == ["EfficientNetLite0"]
    assert set(unavailable) == {"AlexNet", "InceptionV3", "CLIP", "EffNetB1", "SwAV"}
    imgs = noise(3, 40, seed=8)
    feats = nets[0].features(imgs)
    assert feats.shape == (3, 1280) and torch.isfinite(feats).all()
    result = I.score_images(imgs, imgs.clone())  # default nets: the offline one
    assert result["metrics"]["TwoWay-EfficientNetLite0"] == 1.0
    assert "EfficientNetLite0" in result["info"]["feature_nets"]


def test_alexnet_layers_load_torchvision_state_dict(tmp_path):
    from mindsemantix.eval.feature_nets import AlexNetTrunk

    torch.manual_seed(0)
    trunk = AlexNetTrunk()
    state = {**trunk.state_dict(), "classifier.1.weight": torch.zeros(2, 2)}  # torchvision keys incl. the head
    torch.save(state, tmp_path / "alexnet.pth")
    nets = alexnet_nets(tmp_path / "alexnet.pth")
    assert [n.name for n in nets] == ["AlexNet2", "AlexNet5"]
    imgs = noise(2, 64, seed=9)
    assert nets[0].features(imgs).shape == (2, 192 * 31 * 31)  # features.4 at 256 px
    assert nets[1].features(imgs).shape == (2, 256 * 15 * 15)  # features.11
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError):
        alexnet_nets(tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="not found"):
        build_feature_nets({"alexnet": tmp_path / "missing.pth"}, offline=False)


def test_several_sets_score_as_each_set_alone(tmp_path):
    # score_image_sets shares the targets' work between sets; each number must be the one of the set alone
    target = noise(70, 24, seed=20)  # more than one chunk of 64
    sets = {"a": noise(70, 16, seed=21), "b": target.flip(0), "c": target[torch.randperm(70)]}
    together = I.score_image_sets(sets, target, feature_nets=[pixels_net()], size=48)
    for name, pred in sets.items():
        alone = I.score_images(pred, target, feature_nets=[pixels_net()], size=48)
        assert together[name] == alone, name  # exactly: same floats, same info

    # images of one size are resized together: the same pixels as one by one
    mixed = [noise(1, n, seed=n)[0] for n in (16, 16, 30, 60, 16)]
    one_by_one = torch.cat([torch.nn.functional.interpolate(im[None].double() / 255.0, size=(48, 48), mode="bilinear",
                                                            align_corners=False, antialias=im.shape[-1] > 48)
                            for im in mixed])
    assert torch.equal(I._stack_resized(mixed, 48), one_by_one)

    # folders: sets with other keys are scored on their own, each with its own targets
    for name, images in {"seen": target[:4], "p1": sets["a"][:4], "p2": sets["b"][:4], "p3": sets["c"][:3]}.items():
        (tmp_path / name).mkdir()
        for i, im in enumerate(images):
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / name / f"k{i}.png")
    folders = {n: tmp_path / n for n in ("p1", "p2", "p3")}
    results = I.score_image_folder_sets(folders, tmp_path / "seen", feature_nets=[pixels_net()])
    assert list(results) == ["p1", "p2", "p3"]
    for name, folder in folders.items():
        assert results[name] == I.score_image_folders(folder, tmp_path / "seen", feature_nets=[pixels_net()])
    assert results["p3"]["info"]["n_images"] == 3 and results["p3"]["info"]["keys_without_prediction"] == 1


def test_pil_lists_and_mixed_sizes():
    rng = np.random.default_rng(10)
    pil = [Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)) for i in range(3)]
    m = I.score_images(pil, [im.copy() for im in pil], feature_nets=[pixels_net()])["metrics"]
    assert m["PixCorr"] == pytest.approx(1.0) and m["TwoWay-Pixels"] == 1.0


@pytest.mark.parametrize("pred, target, message", [
    (torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "predictions: expected uint8"),
    (torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), r"expected \(N, 3, H, W\)"),
    (torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "3 predictions but 2"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "at least 2"),
    ([np.zeros((8, 8), np.uint8)] * 2, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), r"predictions\[0\]"),
])
def test_bad_inputs(pred, target, message):
    with pytest.raises(I.ImageInputError, match=message):
        I.score_images(pred, target, feature_nets=[])


def test_constant_prediction_counts_as_zero_correlation():
    target = noise(2, 32, seed=11)
    result = I.score_images(torch.full_like(target, 128), target, feature_nets=[])
    assert result["metrics"]["PixCorr"] == 0.0 and result["info"]["n_constant_images"] == 2


def test_cli_on_folders(tmp_path, capsys):
    rng = np.random.default_rng(12)
    (tmp_path / "pred").mkdir()
    (tmp_path / "seen").mkdir()
    for k in range(4):
        im = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(im).save(tmp_path / "seen" / f"subj01-{k:06d}.png")
        Image.fromarray(im).save(tmp_path / "pred" / f"subj01-{k:06d}.png")
    Image.fromarray(im).save(tmp_path / "seen" / "subj01-000099.png")  # a target without prediction: --allow-missing
    out = tmp_path / "M.json"
    assert I.main(["--predictions", str(tmp_path / "pred"), "--targets", str(tmp_path / "seen"), "--out", str(out),
                   "--allow-missing"]) == 0
    written = json.loads(out.read_text())
    assert written["metrics"]["PixCorr"] == pytest.approx(1.0) and written["metrics"]["TwoWay-EfficientNetLite0"] == 1.0
    assert written["info"]["keys_without_prediction"] == 1

    (tmp_path / "seen" / "subj01-000002.png").unlink()
    assert I.main(["--predictions", str(tmp_path / "pred"), "--targets", str(tmp_path / "seen"),
                   "--out", str(tmp_path / "x.json"), "--allow-missing"]) == 2
    assert "no image for 1 key(s): 'subj01-000002'" in capsys.readouterr().err
    (tmp_path / "pred" / "subj01-000003.png").write_bytes(b"not a png")
    with pytest.raises(I.ImageInputError, match=r"subj01-000003\.png: not a readable image"):
        I.read_image_folder(tmp_path / "pred")
