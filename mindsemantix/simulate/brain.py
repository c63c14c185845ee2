"""Simulated brains: subject anatomy in real brain geometry, a nonlinear voxel code, and noise.

Anatomy. Every subject is nilearn's bundled MNI152 (2009) grey-matter template under a random
affine warp (scale, rotation, shift) and sampled on its own coarse functional grid, so subjects
differ in grid shape, orientation and voxel count. The visual ROI (written like NSD's
`nsdgeneral`: -1 outside the brain, 0 brain, 1 ROI) is occipito-temporal grey matter: posterior to
y = -50 mm and between z = -18 and 30 mm in MNI space (boundaries jittered per subject; about
100 cm^3, ~2-3k voxels at 4 mm; NSD's nsdgeneral is ~15k voxels at 1.8 mm, similar volume).

Encoding. Each ROI voxel mixes five response components, weighted by its place in the visual
hierarchy (distance from the occipital pole):
  * low level (V1-V3): a retinotopic Gaussian population receptive field (pRF) driven by local
    contrast energy and one colour-opponent channel, with compressive spatial summation,
    response = drive ** n, n < 1 (Kay et al. 2013; Dumoulin & Wandell 2008), divided by a
    normalisation pool of the whole image's contrast (Carandini & Heeger 2012). Retinotopy follows
    the anatomy: contralateral hemifield, dorsal -> lower field, eccentricity grows anteriorly.
  * mid level (V4-like): object-level conjunction of hue tuning (von Mises on the hue circle) and
    broad curvature tuning, in a larger pRF.
  * high level (LO / ventral temporal): tuning to object identity in a semantic shape space, weaker
    hue tuning and size tuning, in large, foveally biased receptive fields.
  * numerosity: log-Gaussian tuning to the number of objects (Harvey et al. 2013).
  * scene: preference for the background / layout (scene-selective cortex; Epstein & Kanwisher
    1998).
Objects are pooled half MAX, half average (Riesenhuber & Poggio 1999; Zoccolan et al. 2005), and
every voxel ends in a saturating sigmoid. The code is therefore nonlinear at three levels
(tuning curves, multiplicative conjunctions, saturation): a linear decoder gets part of it, not all.

Noise. Single-trial betas in percent signal change = session gain x (mean response + signal +
noise) + session offset; the noise is partly independent per voxel and partly shared through a
few spatially smooth factors; its size sets each voxel's noise-ceiling SNR (ncsnr, Allen et al.
2022), drawn around 0.35.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import nibabel as nib
import numpy as np
from scipy import ndimage

from .scenes import BACKGROUNDS, COLOURS, SHAPES, Scene

# Semantic features of the shapes: roundness, number of corners / 12, concavity, pointiness.
SHAPE_FEATURES = np.array([
    [1.0, 0.00, 0.0, 0.0],  # circle
    [0.0, 0.33, 0.0, 0.2],  # square
    [0.0, 0.25, 0.0, 0.6],  # triangle
    [0.0, 0.83, 0.8, 1.0],  # star
    [0.0, 1.00, 0.6, 0.1],  # cross
    [0.7, 0.10, 0.4, 0.4],  # heart
], dtype=np.float64)
HUE_DEGREES = {"red": 0, "orange": 30, "yellow": 55, "green": 120, "blue": 225, "purple": 275,
               "pink": 330, "white": None}  # white is achromatic
MAP_SIZE = 32  # low-level feature maps are computed at 32 x 32
N_CHROMA_CHANNELS = 6  # colour-opponent directions an early voxel can prefer


# ----------------------------------------------------------------------------------------------
# Anatomy


@functools.lru_cache(maxsize=1)
def _mni_maps():
    """(grey-matter probability image, brain mask image) of nilearn's MNI152 at 2 mm."""
    from nilearn import datasets

    return datasets.load_mni152_gm_template(resolution=2), datasets.load_mni152_brain_mask(resolution=2)


# Occipito-temporal visual cortex in MNI mm: grey matter behind y = -50, between z = -18 (above the
# cerebellum) and z = 30 (below most of parietal cortex).
VISUAL_REGION = {"y_max": -50.0, "z_min": -18.0, "z_max": 30.0, "grey_matter": 0.5}


def _visual_region(gm: np.ndarray, mni: np.ndarray, jitter: np.random.Generator | None = None) -> np.ndarray:
    """Boolean ROI from grey-matter probability (...) and MNI coordinates (..., 3); `jitter` moves
    the boundaries by a few mm (subjects' ROIs differ)."""
    r = VISUAL_REGION
    dy, dz0, dz1 = (jitter.normal(0, [2, 2, 3]) if jitter is not None else (0, 0, 0))
    return ((gm > r["grey_matter"]) & (mni[..., 1] < r["y_max"] + dy)
            & (mni[..., 2] > r["z_min"] + dz0) & (mni[..., 2] < r["z_max"] + dz1))


def mni_visual_roi() -> nib.Nifti1Image:
    """The simulator's visual ROI on the MNI152 2 mm grid (uint8 0/1): a stand-in nsdgeneral for
    MNI-space data such as HCP's MNINonLinear runs."""
    gm_img, brain_img = _mni_maps()
    gm = np.asarray(gm_img.dataobj, dtype=np.float32)
    ijk = np.indices(gm.shape).reshape(3, -1).T
    mni = nib.affines.apply_affine(gm_img.affine, ijk).reshape(*gm.shape, 3)
    roi = _visual_region(gm, mni) & (np.asarray(brain_img.dataobj) > 0)
    return nib.Nifti1Image(roi.astype(np.uint8), gm_img.affine)


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclasses.dataclass
class Anatomy:
    name: str
    affine: np.ndarray  # (4, 4) voxel index -> subject mm
    labels: np.ndarray  # (X, Y, Z) int16: -1 outside the brain, 0 brain, 1 visual ROI
    mni_from_voxel: np.ndarray  # (4, 4) voxel index -> MNI mm (the inverse warp)

    @property
    def roi_index(self) -> tuple[np.ndarray, ...]:
        """Voxel order of the ROI: C order of np.nonzero, as every reader of the mask gets it."""
        return np.nonzero(self.labels == 1)

    @property
    def n_voxels(self) -> int:
        return int((self.labels == 1).sum())

    def band_index(self, width: int = 2) -> tuple[np.ndarray, ...]:
        """Non-ROI brain voxels within `width` voxels of the ROI. They get noise-only betas, so a
        reader that takes the wrong mask value reads wrong (but plausible) numbers."""
        near = ndimage.binary_dilation(self.labels == 1, iterations=width)
        return np.nonzero(near & (self.labels == 0))

    def mni_mm(self, index: tuple[np.ndarray, ...]) -> np.ndarray:
        """(V, 3) MNI coordinates of the given voxels."""
        ijk = np.stack(index, axis=1).astype(np.float64)
        return ijk @ self.mni_from_voxel[:3, :3].T + self.mni_from_voxel[:3, 3]


def make_anatomy(name: str, rng: np.random.Generator, voxel_size: float) -> Anatomy:
    """One subject: the MNI template under a random affine warp, on a `voxel_size` mm grid."""
    gm_img, brain_img = _mni_maps()
    # subject mm <- MNI mm: brains differ by about +-8% in extent, a few degrees and millimetres
    subject_from_mni = np.eye(4)
    subject_from_mni[:3, :3] = _rotation(np.radians(rng.normal(0, 3, 3))) @ np.diag(rng.uniform(0.92, 1.08, 3))
    subject_from_mni[:3, 3] = rng.normal(0, 4, 3)

    # The grid is the bounding box of the warped brain plus a margin, in LAS orientation (x flipped,
    # as scanner-space NIfTIs often are).
    brain_ijk = np.argwhere(np.asarray(brain_img.dataobj) > 0)
    brain_mni = brain_ijk @ brain_img.affine[:3, :3].T + brain_img.affine[:3, 3]
    brain_subject = brain_mni @ subject_from_mni[:3, :3].T + subject_from_mni[:3, 3]
    lo, hi = brain_subject.min(0) - 2 * voxel_size, brain_subject.max(0) + 2 * voxel_size
    shape = tuple(int(n) for n in np.ceil((hi - lo) / voxel_size).astype(int) + 1)
    affine = np.array([[-voxel_size, 0, 0, hi[0]],
                       [0, voxel_size, 0, lo[1]],
                       [0, 0, voxel_size, lo[2]],
                       [0, 0, 0, 1]])
    mni_from_voxel = np.linalg.inv(subject_from_mni) @ affine

    # Sample the MNI maps at every subject voxel (trilinear: subject voxel -> MNI mm -> MNI voxel)
    ijk = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    mni_flat = ijk @ mni_from_voxel[:3, :3].T + mni_from_voxel[:3, 3]  # (X*Y*Z, 3) MNI mm

    def sample(img: nib.Nifti1Image) -> np.ndarray:
        coords = nib.affines.apply_affine(np.linalg.inv(img.affine), mni_flat).T
        data = np.asarray(img.dataobj, dtype=np.float32)
        return ndimage.map_coordinates(data, coords, order=1).reshape(shape)

    gm = sample(gm_img)  # grey-matter probability
    brain = sample(brain_img) > 0.5
    mni = mni_flat.reshape(*shape, 3)
    roi = brain & _visual_region(gm, mni, jitter=rng)

    labels = np.full(shape, -1, dtype=np.int16)
    labels[brain] = 0
    labels[roi] = 1
    return Anatomy(name, affine, labels, mni_from_voxel)


# ----------------------------------------------------------------------------------------------
# Encoding model


def _hue_tuning(preferred_deg: np.ndarray, kappa: np.ndarray, white_response: np.ndarray) -> np.ndarray:
    """(V, n_colours) von Mises tuning on the hue circle; white (achromatic) gets its own value."""
    out = np.empty((len(preferred_deg), len(COLOURS)))
    for c, name in enumerate(COLOURS):
        hue = HUE_DEGREES[name]
        if hue is None:
            out[:, c] = white_response
        else:
            out[:, c] = np.exp(kappa * (np.cos(np.radians(hue - preferred_deg)) - 1))
    return out


@dataclasses.dataclass
class EncodingModel:
    """One subject's voxel code. All arrays have the subject's ROI voxels (V) first."""

    hierarchy: np.ndarray  # (V,) 0 = occipital pole (V1) .. 1 = ventral temporal / parietal
    rf_xy: np.ndarray  # (V, 2) pRF centre in image coordinates [0, 1]
    rf_sigma: np.ndarray  # (V,) pRF size (image widths)
    css_exponent: np.ndarray  # (V,) compressive spatial summation exponent
    c50: np.ndarray  # (V,) semi-saturation constant of the normalisation
    chroma_channel: np.ndarray  # (V,) int, preferred colour-opponent direction
    chroma_weight: np.ndarray  # (V,)
    mid_shape: np.ndarray  # (V, n_shapes) broad curvature tuning
    mid_colour: np.ndarray  # (V, n_colours) sharp hue tuning
    high_shape: np.ndarray  # (V, n_shapes) object-identity tuning
    high_colour: np.ndarray  # (V, n_colours) weak hue tuning
    size_preference: np.ndarray  # (V,) preferred object radius
    count_preference: np.ndarray  # (V,) preferred numerosity
    scene_tuning: np.ndarray  # (V, n_backgrounds + 2) background + layout (horizontal/vertical)
    component_weights: np.ndarray  # (V, 5) low, mid, high, numerosity, scene
    sigmoid_gain: np.ndarray  # (V,)
    sigmoid_threshold: np.ndarray  # (V,)
    # calibration (set by `calibrate`): component means/sds and the final mean/sd
    component_stats: np.ndarray | None = None  # (2, 5, V)
    output_stats: np.ndarray | None = None  # (2, V)

    @property
    def n_voxels(self) -> int:
        return len(self.hierarchy)

    # -- components ------------------------------------------------------------------------------

    def _low(self, images: np.ndarray) -> np.ndarray:
        contrast, chroma = low_level_maps(images)  # (N, P), (N, C, P) with P = MAP_SIZE**2
        g = np.linspace(0.5 / MAP_SIZE, 1 - 0.5 / MAP_SIZE, MAP_SIZE, dtype=np.float32)
        gx, gy = np.meshgrid(g, g)  # pixel centres; rows are y
        d2 = (gx.reshape(1, -1) - self.rf_xy[:, :1]) ** 2 + (gy.reshape(1, -1) - self.rf_xy[:, 1:]) ** 2
        rf = np.exp(-d2 / (2 * self.rf_sigma[:, None] ** 2)).astype(np.float32)
        rf /= rf.sum(1, keepdims=True)  # (V, P)
        drive = contrast @ rf.T  # (N, V)
        for c in range(N_CHROMA_CHANNELS):
            sel = self.chroma_channel == c
            drive[:, sel] += self.chroma_weight[sel] * (chroma[:, c] @ rf[sel].T)
        # compressive summation, divided by a normalisation pool (the whole image's contrast):
        # busy backgrounds suppress the response to objects (Carandini & Heeger 2012)
        n = self.css_exponent
        pool = contrast.mean(1, keepdims=True)  # (N, 1)
        return np.maximum(drive, 0) ** n / (self.c50**n + pool**n)

    def _objects(self, scenes: list[Scene], shape_tuning, colour_tuning, rf_scale) -> np.ndarray:
        """(N, V) object responses, pooled half MAX, half mean over each scene's objects."""
        objects = object_table(scenes)  # each (N, K) with K = most objects in a scene
        sigma2 = (self.rf_sigma * rf_scale) ** 2
        out = np.empty((len(scenes), self.n_voxels))
        for start in range(0, len(scenes), 128):  # chunks keep the (n, K, V) arrays small
            o = {k: a[start : start + 128, :, None] for k, a in objects.items()}  # (n, K, 1)
            d2 = (o["x"] - self.rf_xy[:, 0]) ** 2 + (o["y"] - self.rf_xy[:, 1]) ** 2
            # an object drives a pRF according to its overlap: widen the pRF by the object's radius
            rf = np.exp(-d2 / (2 * (sigma2 + o["radius"] ** 2)))
            size = np.exp(-np.log(o["radius"] / self.size_preference) ** 2 / (2 * 0.6**2))
            tuning = shape_tuning.T[o["shape"][..., 0]] * colour_tuning.T[o["colour"][..., 0]]
            drive = rf * size * tuning * o["present"]  # (n, K, V); absent objects give 0
            n_present = o["present"].sum(1)  # (n, 1)
            out[start : start + 128] = 0.5 * drive.max(1) + 0.5 * drive.sum(1) / n_present
        return out

    def _numerosity(self, scenes: list[Scene]) -> np.ndarray:
        counts = np.array([s.count for s in scenes], dtype=np.float32)
        return np.exp(-np.log(counts[:, None] / self.count_preference[None]) ** 2 / (2 * 0.35**2))

    def _scene(self, scenes: list[Scene]) -> np.ndarray:
        onehot = np.zeros((len(scenes), len(BACKGROUNDS) + 2))
        for n, s in enumerate(scenes):
            onehot[n, BACKGROUNDS.index(s.background)] = 1
            if s.layout == "pair":  # layout: side-by-side vs stacked arrangements
                onehot[n, len(BACKGROUNDS) + (s.relation in ("above", "below"))] = 1
        return onehot @ self.scene_tuning.T

    def components(self, scenes: list[Scene], images: np.ndarray) -> np.ndarray:
        """(5, N, V) raw component responses."""
        return np.stack([
            self._low(images),
            self._objects(scenes, self.mid_shape, self.mid_colour, rf_scale=1.5),
            self._objects(scenes, self.high_shape, self.high_colour, rf_scale=1.0),
            self._numerosity(scenes),
            self._scene(scenes),
        ])

    def _combine(self, comps: np.ndarray) -> np.ndarray:
        mean, sd = self.component_stats
        z = (comps - mean[:, None]) / sd[:, None]  # (5, N, V)
        w = self.component_weights.T[:, None, :]  # (5, 1, V)
        mixed = (w * z).sum(0) / np.sqrt((w**2).sum(0))
        return 1 / (1 + np.exp(-self.sigmoid_gain * (mixed - self.sigmoid_threshold)))  # saturation

    def calibrate(self, scenes: list[Scene], images: np.ndarray) -> None:
        """Fix the normalisation constants on a calibration set, so that a voxel's response to an
        image never depends on which other images a subject happens to see."""
        comps = self.components(scenes, images)
        self.component_stats = np.stack([comps.mean(1), comps.std(1) + 1e-9])
        out = self._combine(comps)
        self.output_stats = np.stack([out.mean(0), out.std(0) + 1e-9])

    def response(self, scenes: list[Scene], images: np.ndarray) -> np.ndarray:
        """(N, V) noise-free response, about zero mean and unit SD over the calibration set."""
        if self.component_stats is None:
            raise RuntimeError("EncodingModel.calibrate must run before response")
        out = self._combine(self.components(scenes, images))
        return ((out - self.output_stats[0]) / self.output_stats[1]).astype(np.float32)


def object_table(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Objects of each scene as padded arrays (N, K): x, y, radius, shape, colour, present."""
    k = max(s.count for s in scenes)
    n = len(scenes)
    table = {"x": np.zeros((n, k), np.float32), "y": np.zeros((n, k), np.float32),
             "radius": np.ones((n, k), np.float32), "shape": np.zeros((n, k), dtype=int),
             "colour": np.zeros((n, k), dtype=int), "present": np.zeros((n, k), np.float32)}
    shape_index = {s: i for i, s in enumerate(SHAPES)}
    colour_index = {c: i for i, c in enumerate(COLOURS)}
    for n, scene in enumerate(scenes):
        for j, o in enumerate(scene.objects):
            table["x"][n, j], table["y"][n, j], table["radius"][n, j] = o.x, o.y, o.radius
            table["shape"][n, j], table["colour"][n, j] = shape_index[o.shape], colour_index[o.colour]
            table["present"][n, j] = 1
    return table


def low_level_maps(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local contrast energy (N, P) and half-rectified colour-opponent maps (N, C, P) at 32 x 32.

    images: (N, H, W, 3) uint8 with H, W multiples of 32.
    """
    n, h, w, _ = images.shape
    f = images.reshape(n, MAP_SIZE, h // MAP_SIZE, MAP_SIZE, w // MAP_SIZE, 3).mean((2, 4),
                                                                                  dtype=np.float32)
    f /= 255.0
    lum = f @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (N, 32, 32)
    local_mean = ndimage.gaussian_filter(lum, (0, 1.5, 1.5))
    local_sq = ndimage.gaussian_filter(lum**2, (0, 1.5, 1.5))
    contrast = np.sqrt(np.maximum(local_sq - local_mean**2, 0))  # local RMS contrast
    rg = f[..., 0] - f[..., 1]
    by = f[..., 2] - 0.5 * (f[..., 0] + f[..., 1])
    angles = np.linspace(0, 2 * np.pi, N_CHROMA_CHANNELS, endpoint=False)
    chroma = np.stack([np.maximum(np.cos(a) * rg + np.sin(a) * by, 0) for a in angles], axis=1)
    return contrast.reshape(n, -1), chroma.reshape(n, N_CHROMA_CHANNELS, -1)


def make_encoding_model(anatomy: Anatomy, rng: np.random.Generator) -> EncodingModel:
    """Draw a subject's voxel code from its anatomy; tuning differs between subjects."""
    mni = anatomy.mni_mm(anatomy.roi_index)  # (V, 3)
    v = len(mni)
    x, y, z = mni.T
    # hierarchy: distance from the occipital pole of the same hemisphere
    pole = np.stack([np.sign(x) * 12, np.full(v, -100.0), np.full(v, 2.0)], axis=1)
    distance = np.linalg.norm(mni - pole, axis=1)
    hierarchy = np.clip((distance - 12) / 50 + rng.normal(0, 0.05, v), 0, 1)

    # retinotopy: contralateral field; dorsal of the calcarine sulcus -> lower field; eccentricity
    # grows anteriorly; higher areas are foveally biased. Subjects differ in map rotation / scale.
    side = np.where(x < 0, 1.0, -1.0)
    calcarine_z = 2 + 0.15 * (y + 100)
    polar = np.clip((z - calcarine_z) / 12, -1, 1) * np.radians(80) + np.radians(rng.normal(0, 10))
    eccentricity = 0.6 * np.clip((y + 100) / 40, 0, 1) ** 1.2 * rng.uniform(0.85, 1.15)
    eccentricity *= 1 - 0.4 * hierarchy
    rf_xy = np.stack([0.5 + side * eccentricity * np.cos(polar),
                      0.5 + eccentricity * np.sin(polar)], axis=1)
    rf_xy = np.clip(rf_xy + rng.normal(0, 0.03, (v, 2)), 0.02, 0.98)
    rf_sigma = 0.03 + 0.25 * eccentricity + 0.3 * hierarchy  # pRF size grows with both

    n_shapes = len(SHAPES)
    # mid level: broad tuning along the round <-> pointy axis, sharp hue tuning
    curvature = SHAPE_FEATURES[:, 0] - SHAPE_FEATURES[:, 3]
    preferred_curvature = rng.uniform(-1, 1, v)
    mid_shape = np.exp(-(curvature[None] - preferred_curvature[:, None]) ** 2 / (2 * 0.5**2))
    mid_colour = _hue_tuning(rng.uniform(0, 360, v), rng.uniform(1, 4, v), rng.uniform(0, 1, v))
    # high level: identity tuning around a preferred shape in semantic feature space, weak hue
    preferred = SHAPE_FEATURES[rng.integers(n_shapes, size=v)] + rng.normal(0, 0.15, (v, 4))
    width = rng.uniform(0.25, 0.5, v)
    d2 = ((SHAPE_FEATURES[None] - preferred[:, None]) ** 2).sum(-1)
    high_shape = 0.05 + np.exp(-d2 / (2 * width[:, None] ** 2))
    high_colour = _hue_tuning(rng.uniform(0, 360, v), rng.uniform(0, 1.5, v), rng.uniform(0.3, 1, v))

    # Component weights follow the hierarchy; a subject-specific share of high-level voxels is
    # numerosity- or scene-selective instead of object-selective.
    specialisation = rng.choice(3, size=v, p=[0.65, 0.15, 0.20])  # object, numerosity, scene
    high = hierarchy**2
    weights = np.stack([
        (1 - hierarchy) ** 2,
        2 * hierarchy * (1 - hierarchy),
        high * np.where(specialisation == 0, 1.0, 0.3),
        high * np.where(specialisation == 1, 0.9, 0.0),
        high * np.where(specialisation == 2, 0.9, 0.0),
    ], axis=1) * rng.uniform(0.7, 1.3, (v, 5))

    return EncodingModel(**{k: (a.astype(np.float32) if a.dtype == np.float64 else a) for k, a in dict(
        hierarchy=hierarchy,
        rf_xy=rf_xy,
        rf_sigma=rf_sigma,
        css_exponent=rng.uniform(0.3, 0.7, v),
        c50=rng.uniform(0.03, 0.12, v),
        chroma_channel=rng.integers(N_CHROMA_CHANNELS, size=v),
        chroma_weight=rng.uniform(0, 2, v) * rng.uniform(0.5, 1.5),
        mid_shape=mid_shape,
        mid_colour=mid_colour,
        high_shape=high_shape,
        high_colour=high_colour,
        size_preference=np.where(rng.random(v) < 0.5, 0.085, 0.175) * rng.uniform(0.8, 1.25, v),
        count_preference=rng.uniform(0.8, 3.5, v),
        scene_tuning=rng.normal(0, 1, (v, len(BACKGROUNDS) + 2)),
        component_weights=weights,
        sigmoid_gain=rng.uniform(1.0, 2.5, v),
        sigmoid_threshold=rng.uniform(-0.5, 1.0, v),
    ).items()})  # float32 halves the cost of computing responses


# ----------------------------------------------------------------------------------------------
# Noise, sessions and the noise ceiling


@dataclasses.dataclass
class NoiseModel:
    """Per-voxel noise parameters (percent signal change) for ROI + band voxels (V_all)."""

    mean_response: np.ndarray  # (V_all,) mean evoked response
    noise_sd: np.ndarray  # (V_all,) single-trial noise SD
    signal_sd: np.ndarray  # (V_all,) SD of the stimulus-driven part; 0 outside the ROI
    shared_loadings: np.ndarray  # (K, V_all) spatially smooth loadings of shared noise factors
    shared_fraction: float  # share of noise variance carried by the shared factors


def make_noise_model(
    rng: np.random.Generator,
    anatomy: Anatomy,
    voxel_index: tuple[np.ndarray, ...],
    n_roi: int,
    ncsnr_median: float,
    n_factors: int = 4,
    shared_fraction: float = 0.3,
) -> NoiseModel:
    """Noise for the voxels at `voxel_index` (the ROI's n_roi voxels first, then the band)."""
    n = len(voxel_index[0])
    noise_sd = rng.uniform(1.5, 3.0, n)
    # ncsnr varies between voxels (about a tenth carry almost no signal, as at the ROI's edges)
    ncsnr = np.exp(rng.normal(np.log(ncsnr_median), 0.45, n))
    ncsnr[rng.random(n) < 0.1] *= 0.1
    ncsnr[n_roi:] = 0
    loadings = np.empty((n_factors, n))
    for k in range(n_factors):
        field = ndimage.gaussian_filter(rng.normal(size=anatomy.labels.shape), 2.0)
        field = field[voxel_index]
        loadings[k] = (field - field.mean()) / field.std()
    loadings /= np.sqrt((loadings**2).sum(0, keepdims=True))  # unit shared variance per voxel
    return NoiseModel(
        mean_response=rng.uniform(0.5, 2.5, n),
        noise_sd=noise_sd,
        signal_sd=np.clip(ncsnr, 0, 1.5) * noise_sd,
        shared_loadings=loadings,
        shared_fraction=shared_fraction,
    )


def simulate_betas(
    rng: np.random.Generator,
    noise: NoiseModel,
    signal: np.ndarray,
    trial_image: np.ndarray,
    trials_per_session: int,
) -> np.ndarray:
    """Single-trial betas in percent signal change, (T, V_all) float32.

    signal: (n_images, V_all) unit-SD noise-free responses (zeros for non-ROI voxels);
    trial_image: (T,) row of `signal` shown on each trial, in trial order.
    Generated one session at a time, which keeps the float64 temporaries small.
    """
    t, v = len(trial_image), signal.shape[1]
    k = noise.shared_loadings.shape[0]
    out = np.empty((t, v), dtype=np.float32)
    for start in range(0, t, trials_per_session):
        images = trial_image[start : start + trials_per_session]
        n = len(images)
        independent = rng.normal(size=(n, v)) * math.sqrt(1 - noise.shared_fraction)
        shared = (rng.normal(size=(n, k)) @ noise.shared_loadings) * math.sqrt(noise.shared_fraction)
        response = noise.mean_response + noise.signal_sd * signal[images] + noise.noise_sd * (independent + shared)
        # each session has its own per-voxel gain and baseline (coil, shim, head position, ...)
        gain = np.exp(rng.normal(0, 0.15, v))
        offset = rng.normal(0, 0.6, v)
        out[start : start + n] = gain * response + offset
    return out


def ncsnr(betas: np.ndarray, trial_image: np.ndarray, trials_per_session: int) -> np.ndarray:
    """NSD's noise-ceiling SNR per voxel (Allen et al. 2022): z-score each session, take the noise
    variance as the mean over images of the variance across repetitions, signal variance as
    1 - noise variance (floored at 0); ncsnr = signal SD / noise SD. Only images with at least
    two repetitions enter. betas: (T, V); trial_image: (T,)."""
    z = np.empty(betas.shape, dtype=np.float64)
    for start in range(0, len(betas), trials_per_session):
        s = betas[start : start + trials_per_session].astype(np.float64)
        z[start : start + trials_per_session] = (s - s.mean(0)) / (s.std(0) + 1e-12)
    order = np.argsort(trial_image, kind="stable")
    images, first, counts = np.unique(trial_image[order], return_index=True, return_counts=True)
    variances = []
    for start, count in zip(first, counts):
        if count >= 2:
            variances.append(z[order[start : start + count]].var(0, ddof=1))
    noise_var = np.mean(variances, axis=0)
    signal_var = np.clip(1 - noise_var, 0, None)
    return np.sqrt(signal_var) / np.sqrt(noise_var)


def noise_ceiling(ncsnr_values: np.ndarray, n_trials: int) -> np.ndarray:
    """Percentage of variance explainable when averaging n_trials (Allen et al. 2022, eq. for NC)."""
    return 100 * ncsnr_values**2 / (ncsnr_values**2 + 1 / n_trials)
