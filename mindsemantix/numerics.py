"""Numerics shared by the models, the stages and the evaluation: closed-form ridge regression with a
leave-one-out penalty, the masked-voxel correlation of stage 1, and the warm-up + cosine learning-rate
schedule. Plain numpy / torch, no project imports, so every layer can use it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import math

import numpy as np
import torch

DEFAULT_ALPHAS = tuple(10.0 ** np.arange(-2, 7))  # relative to the mean singular value squared, see fit_ridge


@dataclass
class RidgeFit:
    x_mean: np.ndarray  # (V,)
    y_mean: np.ndarray  # (D,)
    weights: np.ndarray  # (V, D)
    alpha: float
    loo_mse: dict[float, float] = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(M, V) -> (M, D)."""
        return (np.asarray(x, dtype=np.float64) - self.x_mean) @ self.weights + self.y_mean


@dataclass
class CentredSVD:
    """What `fit_ridge` needs of x (N, V): its column means and the thin SVD of the centred x, the
    costly part (seconds at N ~ 1000, V ~ 2500). One per subject serves every fit from its voxels:
    the caption and the image baselines."""

    x_mean: np.ndarray  # (V,)
    u: np.ndarray  # (N, k)
    s: np.ndarray  # (k,)
    vt: np.ndarray  # (k, V)

    @classmethod
    def of(cls, x: np.ndarray) -> "CentredSVD":
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"ridge needs x (N, V), got shape {x.shape}")
        x_mean = x.mean(0)
        u, s, vt = np.linalg.svd(x - x_mean, full_matrices=False)  # xc = u diag(s) vt
        return cls(x_mean, u, s, vt)

    def __len__(self) -> int:
        return len(self.u)


@dataclass
class RidgePath:
    """Ridge from x to y with an intercept, at every penalty of a grid at once (through the thin SVD of
    the centred x): `loo` (n_alphas, D) is the exact leave-one-out MSE of each target column at each
    penalty. `alphas` are relative to `scale`, the mean of s^2, so one grid suits any feature count
    and scale."""

    svd: CentredSVD
    y_mean: np.ndarray  # (D,)
    uty: np.ndarray     # (k, D): U^T (y - y_mean)
    scale: float
    alphas: tuple[float, ...]
    loo: np.ndarray     # (n_alphas, D)

    def weights(self, rel: float) -> np.ndarray:
        """(V, D) weights at penalty `rel * scale`: V diag(s / (s^2 + a)) U^T Y."""
        s = self.svd.s
        return self.svd.vt.T @ ((s / (s ** 2 + rel * self.scale))[:, None] * self.uty)

    def fit(self, rel: float) -> RidgeFit:
        loo = dict(zip(map(float, self.alphas), map(float, self.loo.mean(1))))
        return RidgeFit(self.svd.x_mean, self.y_mean, self.weights(rel), float(rel), loo)


def ridge_path(x: np.ndarray | CentredSVD, y: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS) -> RidgePath:
    """Every penalty costs only a rescaling of the SVD (cost min(N,V)^2 max(N,V) once): the hat matrix
    with the (unpenalised) intercept is H = 11^T / N + U diag(s^2 / (s^2 + a)) U^T, and the exact
    leave-one-out residual of sample i is (y_i - (H y)_i) / (1 - H_ii). x may be given as its
    `CentredSVD`, to share it between fits."""
    y = np.asarray(y, dtype=np.float64)
    if not isinstance(x, CentredSVD):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
            raise ValueError(f"ridge needs x (N, V) and y (N, D) with the same N, got {x.shape} and {y.shape}")
    elif y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"ridge needs y (N, D) with the N = {len(x)} of x, got {y.shape}")
    if len(x) < 3:
        raise ValueError(f"ridge needs at least 3 training samples, got {len(x)}")
    svd = x if isinstance(x, CentredSVD) else CentredSVD.of(x)
    u, s = svd.u, svd.s
    y_mean = y.mean(0)
    yc = y - y_mean
    uty = u.T @ yc  # (k, D)
    scale = float(np.mean(s ** 2)) or 1.0
    loo = []
    for rel in alphas:
        shrink = s ** 2 / (s ** 2 + rel * scale)  # (k,)
        h_diag = 1.0 / len(u) + (u ** 2) @ shrink  # (N,); 1/N: the unpenalised intercept's share
        resid = (yc - u @ (shrink[:, None] * uty)) / np.clip(1.0 - h_diag, 1e-12, None)[:, None]
        loo.append((resid ** 2).mean(0))  # (D,)
    return RidgePath(svd, y_mean, uty, scale, tuple(float(a) for a in alphas), np.stack(loo))


def fit_ridge(x: np.ndarray | CentredSVD, y: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS) -> RidgeFit:
    """Ridge from x (N, V) to y (N, D) with an intercept; the one penalty (of `alphas`, relative to the
    mean of s^2) that minimises the leave-one-out MSE over all targets (`ridge_path`)."""
    path = ridge_path(x, y, alphas)
    return path.fit(path.alphas[int(np.argmin(path.loo.mean(1)))])


def masked_pearson(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson correlation over the masked voxels: (B, V) x3 -> (B,)."""
    m = mask.float()
    n = m.sum(1).clamp_min(2)
    p = pred - (pred * m).sum(1, keepdim=True) / n[:, None]
    t = target - (target * m).sum(1, keepdim=True) / n[:, None]
    cov = (p * t * m).sum(1)
    return cov / ((p.pow(2) * m).sum(1).sqrt() * (t.pow(2) * m).sum(1).sqrt()).clamp_min(1e-8)


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """The learning-rate factor of each step (for `LambdaLR`): linear warm-up to 1 over `warmup`
    steps, then cosine decay to `floor` at step `total`, and `floor` after it."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
