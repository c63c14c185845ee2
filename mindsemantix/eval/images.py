"""Image metrics with MindEye's definitions (DESIGN.md, Contract 4): `score_images`, image-folder
reading and the `mindsemantix score-images` command.

Matched against MindEye2's `src/final_evaluations.ipynb` (MedARC-AI/MindEyeV2), re-implemented here:
- PixCorr: both images resized (bilinear) to 425 x 425, all three RGB channels flattened, Pearson
  correlation per (prediction, target) pair, mean over pairs. (MindEye's PixCorr is on RGB, not
  grayscale.) A constant image has no defined correlation: we count it as 0 and report how many.
- SSIM: the same 425 px RGB images to grayscale with scikit-image's `rgb2gray` weights
  (0.2125 R + 0.7154 G + 0.0721 B), then SSIM with Gaussian weights sigma 1.5 (truncated at 3.5
  sigma: an 11 x 11 window), population (not sample) covariance, data range 1, K1 0.01, K2 0.03,
  averaged over the image without the 5-pixel border the window does not cover: the settings
  MindEye passes to `skimage.metrics.structural_similarity`. MindEye2 also passes
  `multichannel=True`, which scikit-image 0.22 (its pinned version) no longer reads: plain 2-D SSIM.
- 2-way identification per feature net: features of all predictions and all targets, Pearson
  correlation r[i, j] between target i and prediction j; prediction j "wins" against target i != j
  when r[i, j] < r[j, j]; the score is the mean over j of its wins / (N - 1). Chance 0.5, ties lose.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from mindsemantix.eval.feature_nets import FeatureNet, build_feature_nets
from mindsemantix.io import write_json_atomic

log = logging.getLogger(__name__)

EVAL_SIZE = 425
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)  # scikit-image rgb2gray (ITU-R BT.709 luma)
SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ImageInputError(ValueError):
    """Bad image input; the message names the file or index and the problem."""


# ---------------------------------------------------------------------------------------------
# Inputs


def as_uint8_list(images: Any, what: str = "images") -> list[torch.Tensor]:
    """uint8 (N,3,H,W) tensor/array, or a list of PIL images / (3,H,W) / (H,W,3) uint8 arrays ->
    list of uint8 (3,H,W) tensors (sizes may differ between images)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        arr = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise ImageInputError(f"{what}: expected (N, 3, H, W), got shape {tuple(arr.shape)}")
        if arr.dtype != torch.uint8:
            raise ImageInputError(f"{what}: expected uint8, got {arr.dtype}")
        return list(arr)
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            im = np.asarray(im.convert("RGB"))
        t = im.cpu() if isinstance(im, torch.Tensor) else torch.from_numpy(np.array(im))  # copy: PIL arrays are read-only
        if t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
            t = t.permute(2, 0, 1)
        if t.ndim != 3 or t.shape[0] != 3 or t.dtype != torch.uint8:
            raise ImageInputError(f"{what}[{i}]: expected a uint8 RGB image, got {t.dtype} {tuple(t.shape)}")
        out.append(t.contiguous())
    return out


def _stack_resized(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """list of uint8 (3,H,W) -> float64 (N,3,size,size) in [0,1], bilinear (antialiased when shrinking)."""
    out = []
    for im in images:
        x = im.unsqueeze(0).double() / 255.0
        if x.shape[-2:] != (size, size):
            shrink = x.shape[-1] > size or x.shape[-2] > size
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                                antialias=shrink)
        out.append(x[0])
    return torch.stack(out)


def _stack_uint8(images: list[torch.Tensor]) -> torch.Tensor:
    """Feature nets resize themselves, but a batch needs one size: bring all to the largest side."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    if all(im.shape[1:] == (h, w) for im in images):
        return torch.stack(images)
    return (_stack_resized(images, max(h, w)) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Metrics (per pair)


def pixcorr_per_image(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """(N,3,S,S) float pairs -> (N,) Pearson r of the flattened RGB images (0 where one is constant)."""
    p = pred.reshape(len(pred), -1).double()
    t = target.reshape(len(target), -1).double()
    p = p - p.mean(1, keepdim=True)
    t = t - t.mean(1, keepdim=True)
    # "constant" with a tolerance: resizing a flat image leaves rounding noise (~1e-17), whose
    # correlation with anything is meaningless
    flat = (p.std(1) < 1e-9) | (t.std(1) < 1e-9)
    r = (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1)).clamp_min(1e-300)
    return torch.where(flat, torch.zeros_like(r), r).numpy()


def rgb_to_gray(x: torch.Tensor) -> np.ndarray:
    """(N,3,S,S) float in [0,1] -> (N,S,S) float64 luminance (scikit-image's rgb2gray weights)."""
    w = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64).view(1, 3, 1, 1)
    return (x.double() * w).sum(1).numpy()


def ssim_gray(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM of two 2-D images (Wang et al. 2004) with Gaussian weights as MindEye uses it."""
    if a.shape != b.shape or a.ndim != 2:
        raise ImageInputError(f"SSIM needs two 2-D images of one shape, got {a.shape} and {b.shape}")
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5: the window is 11 x 11
    if min(a.shape) <= 2 * radius:
        raise ImageInputError(f"image {a.shape} too small for an {2 * radius + 1}-px SSIM window")

    def local_mean(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, sigma=SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")

    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a * mu_a  # population (biased) local variances
    var_b = local_mean(b * b) - mu_b * mu_b
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    inner = ssim_map[radius:-radius, radius:-radius]  # where the window lies fully inside the image
    return float(inner.mean())


def two_way_identification(pred_features: torch.Tensor | np.ndarray, target_features: torch.Tensor | np.ndarray
                           ) -> float:
    """MindEye's 2-way identification from (N, D) feature rows of predictions and targets."""
    # float64 unless the features are huge (AlexNet features.4 of 1000 images: 1.8e8 values)
    big = np.prod(np.shape(pred_features)) > 5e7
    dtype = np.float32 if big else np.float64
    pred = np.asarray(pred_features, dtype=dtype).reshape(len(pred_features), -1)
    target = np.asarray(target_features, dtype=dtype).reshape(len(target_features), -1)
    n = len(pred)
    if n < 2 or len(target) != n:
        raise ImageInputError(f"2-way identification needs N >= 2 pairs, got {n} predictions and {len(target)} targets")

    def standardise(x: np.ndarray) -> np.ndarray:
        x = x - x.mean(1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-30)

    r = standardise(target) @ standardise(pred).T  # r[i, j] = corr(target_i, pred_j), (N, N)
    congruent = np.diag(r)  # corr(target_j, pred_j)
    wins = (r < congruent[None, :]).sum(0)  # over targets i; the diagonal never counts (not <)
    return float(wins.mean() / (n - 1))


# ---------------------------------------------------------------------------------------------
# The scorer


def score_images(pred: Any, target: Any, feature_nets: Sequence[FeatureNet] | None = None, *,
                 weights: Mapping[str, str | os.PathLike | None] | None = None, size: int = EVAL_SIZE
                 ) -> dict[str, Any]:
    """Score reconstructions against the seen images, pair i with pair i.

    pred, target: uint8 (N,3,H,W) tensors/arrays or lists of PIL images (sizes may differ).
    feature_nets: the nets for `TwoWay-<name>`; None builds the offline EfficientNet-Lite0 plus the
      nets whose `weights` paths are given (keys alexnet, inception, effnet_b1, swav, clip).
    Returns {"metrics": {"PixCorr", "SSIM", "TwoWay-<net>"...}, "info": {...}}.
    """
    preds = as_uint8_list(pred, "predictions")
    targets = as_uint8_list(target, "targets")
    if len(preds) != len(targets):
        raise ImageInputError(f"{len(preds)} predictions but {len(targets)} targets")
    if len(preds) < 2:
        raise ImageInputError(f"need at least 2 image pairs, got {len(preds)}")
    unavailable: dict[str, str] = {}
    if feature_nets is None:
        feature_nets, unavailable = build_feature_nets(dict(weights or {}))

    metrics: dict[str, float] = {}
    pixcorr, ssim = [], []
    for start in range(0, len(preds), 64):  # chunks: 64 x 3 x 425 x 425 float64 is ~280 MB
        p = _stack_resized(preds[start:start + 64], size)
        t = _stack_resized(targets[start:start + 64], size)
        pixcorr.extend(pixcorr_per_image(p, t))
        ssim.extend(ssim_gray(a, b) for a, b in zip(rgb_to_gray(p), rgb_to_gray(t)))
    metrics["PixCorr"] = float(np.mean(pixcorr))
    metrics["SSIM"] = float(np.mean(ssim))

    pred_batch, target_batch = _stack_uint8(preds), _stack_uint8(targets)
    for net in feature_nets:
        metrics[f"TwoWay-{net.name}"] = two_way_identification(net.features(pred_batch), net.features(target_batch))

    n_constant = int(sum(float(im.double().std()) == 0.0 for im in preds + targets))
    info = {
        "n_images": len(preds),
        "size": size,
        "pixcorr": f"Pearson r of flattened RGB at {size}x{size} (bilinear), mean over pairs; constant image -> 0",
        "ssim": (f"grayscale {GRAY_WEIGHTS} at {size}x{size}, Gaussian sigma {SSIM_SIGMA} (truncate {SSIM_TRUNCATE}), "
                 f"population covariance, data range 1, K1 {SSIM_K1}, K2 {SSIM_K2}"),
        "two_way": "MindEye: corr(target_i, pred_j) < corr(target_j, pred_j) over i != j, mean / (N-1)",
        "feature_nets": {net.name: net.description for net in feature_nets},
        "feature_nets_unavailable": unavailable,
        "n_constant_images": n_constant,
    }
    return {"metrics": metrics, "info": info}


# ---------------------------------------------------------------------------------------------
# Image folders and the CLI


def read_image_folder(folder: str | os.PathLike, keys: Sequence[str] | Mapping[str, Any] | None = None
                      ) -> dict[str, Image.Image]:
    """{key: RGB PIL image} from `<folder>/<key>.png` (or .jpg); with `keys`, exactly those keys."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"{folder}: not a folder")
    files = {f.stem: f for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()}
    if keys is not None:
        missing = [k for k in keys if k not in files]
        if missing:
            raise ImageInputError(f"{folder}: no image for {len(missing)} key(s): "
                                  + ", ".join(repr(k) for k in missing[:5]) + (", ..." if len(missing) > 5 else ""))
        files = {k: files[k] for k in keys}
    if not files:
        raise ImageInputError(f"{folder}: no .png/.jpg images")
    out = {}
    for key, path in files.items():
        try:
            with Image.open(path) as im:
                out[key] = im.convert("RGB")
        except (OSError, SyntaxError) as e:
            raise ImageInputError(f"{path}: not a readable image ({e})") from e
    return out


def score_image_folders(pred_dir: str | os.PathLike, target_dir: str | os.PathLike, **kwargs) -> dict[str, Any]:
    """Pair `<pred_dir>/<key>.png` with `<target_dir>/<key>.png` over the keys of `pred_dir`."""
    preds = read_image_folder(pred_dir)
    targets = read_image_folder(target_dir, keys=list(preds))
    extra = sorted(set(read_image_folder(target_dir)) - set(preds))
    result = score_images([preds[k] for k in preds], [targets[k] for k in preds], **kwargs)
    result["info"]["keys_without_prediction"] = len(extra)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mindsemantix score-images",
                                description="Image metrics (MindEye definitions) of reconstructions against seen images.")
    p.add_argument("--predictions", required=True, help="folder of reconstructions, one <key>.png per key")
    p.add_argument("--targets", required=True, help="folder of seen images, <key>.png for every predicted key")
    p.add_argument("--out", required=True, help="metrics JSON to write")
    for name, what in [("alexnet", "torchvision AlexNet state dict"), ("inception", "torchvision InceptionV3 state dict"),
                       ("effnet-b1", "torchvision EfficientNet-B1 state dict"), ("swav", "SwAV ResNet-50 checkpoint"),
                       ("clip", "CLIP folder (transformers)")]:
        p.add_argument(f"--{name}", default=None, help=f"{what}, for TwoWay-<net>")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    weights = {"alexnet": args.alexnet, "inception": args.inception, "effnet_b1": args.effnet_b1,
               "swav": args.swav, "clip": args.clip}
    try:
        result = score_image_folders(args.predictions, args.targets, weights=weights)
    except (ImageInputError, RuntimeError, OSError) as e:
        print(f"score-images: error: {e}", file=sys.stderr)
        return 2
    result["info"].update({"predictions": str(args.predictions), "targets": str(args.targets)})
    write_json_atomic(args.out, result)
    for name, value in result["metrics"].items():
        print(f"{name:26s} {value:.4f}")
    for name, reason in result["info"]["feature_nets_unavailable"].items():
        print(f"  (no TwoWay-{name}: {reason})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
