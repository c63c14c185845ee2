"""Image metrics with MindEye's definitions (docs/formats.md, report files): `score_images`, image-folder
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from mindsemantix.eval.feature_nets import FeatureNet, build_feature_nets

log = logging.getLogger(__name__)

EVAL_SIZE = 425
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)  # scikit-image rgb2gray (ITU-R BT.709 luma)
SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5: the window is 11 x 11
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
    """list of uint8 (3,H,W) -> float64 (N,3,size,size) in [0,1], bilinear (antialiased when shrinking).

    Images of one size are resized as one batch (each output pixel is computed alone: the same
    values as image by image, several times faster)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(i)
    out = None
    for shape, index in by_shape.items():
        x = torch.stack([images[i] for i in index]).double() / 255.0
        if shape[-2:] != (size, size):
            shrink = shape[-1] > size or shape[-2] > size
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                                antialias=shrink)
        if len(by_shape) == 1:
            return x
        if out is None:
            out = torch.empty(len(images), *x.shape[1:], dtype=x.dtype)
        out[index] = x
    return out


def _stack_uint8(images: list[torch.Tensor]) -> torch.Tensor:
    """Feature nets resize themselves, but a batch needs one size: bring all to the largest side."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    if all(im.shape[1:] == (h, w) for im in images):
        return torch.stack(images)
    return (_stack_resized(images, max(h, w)) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Metrics (per pair)


def _centred_rows(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N,3,S,S) -> the flattened images less their means (N, 3*S*S), "constant" flags, norms (N,)."""
    x = images.reshape(len(images), -1).double()
    x = x - x.mean(1, keepdim=True)
    # "constant" with a tolerance: resizing a flat image leaves rounding noise (~1e-17), whose
    # correlation with anything is meaningless
    return x, x.std(1) < 1e-9, x.norm(dim=1)


def pixcorr_per_image(pred: torch.Tensor, target: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                      ) -> np.ndarray:
    """(N,3,S,S) float pairs -> (N,) Pearson r of the flattened RGB images (0 where one is constant).
    `target` may be given as its `_centred_rows`, to share them between prediction sets."""
    p, p_flat, p_norm = _centred_rows(pred)
    t, t_flat, t_norm = target if isinstance(target, tuple) else _centred_rows(target)
    r = (p * t).sum(1) / (p_norm * t_norm).clamp_min(1e-300)
    return torch.where(p_flat | t_flat, torch.zeros_like(r), r).numpy()


def rgb_to_gray(x: torch.Tensor) -> np.ndarray:
    """(N,3,S,S) float in [0,1] -> (N,S,S) float64 luminance (scikit-image's rgb2gray weights)."""
    w = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64).view(1, 3, 1, 1)
    return (x.double() * w).sum(1).numpy()


def _local_mean(x: np.ndarray) -> np.ndarray:
    return gaussian_filter(x, sigma=SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")


def _ssim_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, local mean of x, local mean of x^2): one image's share of SSIM, float64."""
    x = np.asarray(x, dtype=np.float64)
    return x, _local_mean(x), _local_mean(x * x)


def _ssim_from_moments(a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray],
                       data_range: float = 1.0) -> float:
    (a, mu_a, sq_a), (b, mu_b, sq_b) = a, b
    var_a = sq_a - mu_a * mu_a  # population (biased) local variances
    var_b = sq_b - mu_b * mu_b
    cov = _local_mean(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    inner = ssim_map[SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS]  # where the window lies fully inside the image
    return float(inner.mean())


def _check_ssim_shapes(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 2:
        raise ImageInputError(f"SSIM needs two 2-D images of one shape, got {a.shape} and {b.shape}")
    if min(a.shape) <= 2 * SSIM_RADIUS:
        raise ImageInputError(f"image {a.shape} too small for an {2 * SSIM_RADIUS + 1}-px SSIM window")


def two_way_identification(pred_features: torch.Tensor | np.ndarray, target_features: torch.Tensor | np.ndarray
                           ) -> float:
    """MindEye's 2-way identification from (N, D) feature rows of predictions and targets."""
    return float(two_way_per_image(pred_features, target_features).mean())


def two_way_per_image(pred_features: torch.Tensor | np.ndarray, target_features: torch.Tensor | np.ndarray
                      ) -> np.ndarray:
    """(N,): for each prediction j, the share of the other targets i that correlate with it less than
    its own target does; the mean is MindEye's 2-way identification."""
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
    return wins / (n - 1)


# ---------------------------------------------------------------------------------------------
# The scorer


def score_images(pred: Any, target: Any, feature_nets: Sequence[FeatureNet] | None = None, *,
                 weights: Mapping[str, str | os.PathLike | None] | None = None, size: int = EVAL_SIZE
                 ) -> dict[str, Any]:
    """Score reconstructions against the seen images, pair i with pair i.

    pred, target: uint8 (N,3,H,W) tensors/arrays or lists of PIL images (sizes may differ).
    feature_nets: the nets for `TwoWay-<name>`; None builds the offline EfficientNet-Lite0 plus the
      nets whose `weights` paths are given (keys alexnet, inception, effnet_b1, swav, clip).
    Returns {"metrics": {"PixCorr", "SSIM", "TwoWay-<net>"...}, "info": {...}, "per_image": {metric: [N
    values, pair i first]}} (each metric is the mean of its per-image values).
    """
    return score_image_sets({"": pred}, target, feature_nets, weights=weights, size=size)[""]


def score_image_sets(predictions: Mapping[str, Any], target: Any, feature_nets: Sequence[FeatureNet] | None = None,
                     *, weights: Mapping[str, str | os.PathLike | None] | None = None, size: int = EVAL_SIZE
                     ) -> dict[str, dict[str, Any]]:
    """`score_images` of several prediction sets against the same targets: {name: pred} -> {name: result}.

    The targets are resized and their SSIM share (local means) computed once for all sets, and the
    per-image SSIM work runs on torch's thread count (SciPy's filters and NumPy release the GIL).
    Every number is the one `score_images` gives for that set alone.
    """
    what = {name: f"{name} predictions".strip() for name in predictions}  # score_images: "predictions"
    sets = {name: as_uint8_list(pred, what[name]) for name, pred in predictions.items()}
    targets = as_uint8_list(target, "targets")
    for name, preds in sets.items():
        if len(preds) != len(targets):
            raise ImageInputError(f"{len(preds)} {what[name]} but {len(targets)} targets")
    if len(targets) < 2:
        raise ImageInputError(f"need at least 2 image pairs, got {len(targets)}")
    unavailable: dict[str, str] = {}
    if feature_nets is None:
        feature_nets, unavailable = build_feature_nets(dict(weights or {}))

    pixcorr: dict[str, list[float]] = {name: [] for name in sets}
    ssim: dict[str, list[float]] = {name: [] for name in sets}
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for start in range(0, len(targets), 64):  # chunks: 64 x 3 x 425 x 425 float64 is ~280 MB
            t = _stack_resized(targets[start:start + 64], size)
            t_gray = rgb_to_gray(t)
            _check_ssim_shapes(t_gray[0], t_gray[0])
            t_moments = list(pool.map(_ssim_moments, t_gray))
            t_rows = _centred_rows(t)
            del t
            for name, preds in sets.items():
                p = _stack_resized(preds[start:start + 64], size)
                pixcorr[name].extend(pixcorr_per_image(p, t_rows))
                p_moments = pool.map(_ssim_moments, rgb_to_gray(p))
                ssim[name].extend(pool.map(_ssim_from_moments, p_moments, t_moments))

    results = {}
    target_batch = _stack_uint8(targets)
    for name, preds in sets.items():
        per_image = {"PixCorr": np.asarray(pixcorr[name], dtype=np.float64),
                     "SSIM": np.asarray(ssim[name], dtype=np.float64)}
        pred_batch = _stack_uint8(preds)
        for net in feature_nets:  # a net keeps features per image: the targets' are computed once
            per_image[f"TwoWay-{net.name}"] = two_way_per_image(net.features(pred_batch), net.features(target_batch))
        metrics = {k: float(v.mean()) for k, v in per_image.items()}
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
        results[name] = {"metrics": metrics, "info": info, "per_image": {k: v.tolist() for k, v in per_image.items()}}
    return results


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
    return score_image_folder_sets({"": pred_dir}, target_dir, **kwargs)[""]


def score_image_folder_sets(pred_dirs: Mapping[str, str | os.PathLike], target_dir: str | os.PathLike, **kwargs
                            ) -> dict[str, dict[str, Any]]:
    """`score_image_folders` of several prediction folders against one target folder, {name: result}:
    folders with the same keys are scored together (`score_image_sets`)."""
    preds = {name: read_image_folder(folder) for name, folder in pred_dirs.items()}
    by_keys: dict[tuple[str, ...], list[str]] = {}
    for name, images in preds.items():
        by_keys.setdefault(tuple(images), []).append(name)
    results = {}
    for keys, names in by_keys.items():
        targets = read_image_folder(target_dir, keys=keys)
        extra = set(read_image_folder(target_dir)) - set(keys)
        scored = score_image_sets({n: [preds[n][k] for k in keys] for n in names}, [targets[k] for k in keys], **kwargs)
        for name, result in scored.items():
            result["info"]["keys_without_prediction"] = len(extra)
            result["keys"] = list(keys)  # the order of `per_image`
            results[name] = result
    return {name: results[name] for name in pred_dirs}


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
    p.add_argument("--allow-missing", action="store_true",
                   help="score the targets that have a prediction even when others have none (the count is printed)")
    return p


def image_keys(folder: str | os.PathLike) -> set[str]:
    """Keys (file stems) of a folder's images, without decoding them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"{folder}: not a folder")
    return {f.stem for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()}


def check_coverage(pred_dir: str | os.PathLike, target_dir: str | os.PathLike, allow_missing: bool) -> int:
    """How many targets have no prediction; an ImageInputError unless `allow_missing` (a metric over a
    subset is not the metric over the set)."""
    missing = sorted(image_keys(target_dir) - image_keys(pred_dir))
    if missing and not allow_missing:
        raise ImageInputError(f"{pred_dir}: no prediction for {len(missing)} of the targets in {target_dir} ("
                              + ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
                              + "); pass --allow-missing to score only the predicted ones")
    return len(missing)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    weights = {"alexnet": args.alexnet, "inception": args.inception, "effnet_b1": args.effnet_b1,
               "swav": args.swav, "clip": args.clip}
    try:
        n_missing = check_coverage(args.predictions, args.targets, args.allow_missing)
        if n_missing:
            print(f"score-images: {n_missing} target(s) have no prediction; scoring the others (--allow-missing)")
        result = score_image_folders(args.predictions, args.targets, weights=weights)
    except (ImageInputError, RuntimeError, OSError) as e:
        print(f"score-images: error: {e}", file=sys.stderr)
        return 2
    from mindsemantix.eval.captions import write_scores

    write_scores(args.out, result, {"predictions": str(args.predictions), "targets": str(args.targets)},
                 [f"  (no TwoWay-{name}: {reason})" for name, reason in result["info"]["feature_nets_unavailable"].items()])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
