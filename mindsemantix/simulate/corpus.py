"""The simulated study's image-less pretraining corpus: BOLD runs of new brains watching a stream
of toyworld scenes, written as a BIDS dataset.

Stage 1 (masked brain modelling) is pretrained on fMRI of many subjects without images (MinD-Vis:
HCP + GOD). `build_corpus` gives the simulated study such a corpus, which the unchanged corpus
recipe converts like any BIDS dataset:

    python data_recipes/fmri_corpus.py --root <study>/corpus_bids --dataset toycorpus \
        --out data/toyworld/corpus --roi background --window 4

Subjects. Corpus subjects (sub-c01, sub-c02, ...) are new brains from the study's own generator:
their own warp of the MNI template on their own 3.6-4.2 mm grid (`brain.make_anatomy`) and their
own tuning drawn from the same population (`brain.make_encoding_model`). The study's subjects are
*not* in the corpus: the recipe names corpus subjects `<dataset>-<label>`, so the datamodule would
give them input layers of their own and they would add nothing a new brain does not, while disjoint
brains keep stage 1 a test of cross-subject transfer (most of MinD-Vis's pretraining subjects,
HCP's, are never decoded); the study's subjects reach stage 1 through their training shards anyway.

Stimulus ("the movie"). As in natural-movie datasets (HCP's 7T movie runs), every subject watches
the same runs: a continuous stream with a new scene every `scene_seconds` (+-25 %), the
background kept over a "shot" of ~4 scenes (so the stream has a movie's scene-level continuity),
and `fixation_seconds` of fixation at the start and end of each run. The scenes are new draws from
the study's scene distribution that never contain a held-out shape x colour pair (those exist only
in test images) and are never equal to any study scene, so nothing that later scores on the test
set has seen its images' brain responses. `events.tsv` of every run lists the scenes (`scene_id`
indexes `toyworld_truth/corpus.json`).

BOLD model. For ROI voxel v, in fractions of its baseline S0_v (a smooth coil-sensitivity field):

    S_v(t) = S0_v * (1 + (h * drive_v)(t) / 100 + drift_v(t) + physiological_v(t) + thermal_v(t))

* drive_v: percent signal change under sustained stimulation, evoked_v + amplitude_v * r_v(scene)
  while a scene is on (r: the encoding model's unit-SD response), 0 during fixation. evoked_v is
  0.5-2.5 % and amplitude_v ~0.8 % (median), the study's ranges for betas.
* h: SPM's canonical double-gamma HRF (Friston et al. 1998; spm_hrf defaults: response delay 6 s,
  undershoot delay 16 s, both dispersions 1 s, response-to-undershoot ratio 6), scaled to unit
  area so that a sustained drive of a % gives a % BOLD change. The delays differ a little between
  subjects (response delay 6 +- 0.5 s; Handwerker et al. 2004). Scenes are boxcars integrated
  exactly against h (its cumulative integral is a difference of regularised incomplete gammas);
  frame f is sampled at (f + 1/2) TR, the middle of its acquisition.
* drift_v: the run's three slowest cosines (periods 2T/k, k = 1..3, amplitudes falling as 1/k),
  0.3-1 % SD: scanner drift, present even without a subject (Smith et al. 1999), which SPM's
  128 s high-pass filter exists to remove.
* physiological_v: 60 % (50-70 %, per subject) of the noise variance, which is physiological-noise
  dominated at 3 T for voxels this size (Triantafyllou et al. 2005; its SD scales with the signal,
  Krueger & Glover 2001). Half independent per voxel, half shared through four spatially smooth
  factors: two slow vascular AR(1) processes, respiration (0.2-0.33 Hz) and the cardiac cycle
  (1.0-1.3 Hz), whose rates wander a little; the rhythms are sampled at the TR and so alias, as in
  real data. The AR(1) time constant is 1.25 s (SPM's AR(0.2) prior at a 2-s TR).
* thermal_v: white, independent, the rest of the noise variance.

Noise level: tSNR = S0 / SD(physiological + thermal) is drawn per voxel around a median of 70
(log-normal, SD 0.3 in log): Murphy et al. 2007 measured ~50 at ~10 mm^3 voxels at 3 T, and tSNR
grows with voxel volume until physiological noise caps it (Triantafyllou et al. 2005); these voxels
are ~60 mm^3. The written value is int16 (baseline ~1000).

Layout. The runs are released masked to the visual ROI (pretraining corpora are used as visual
cortex only: MinD-Vis took the visual-cortex voxels of HCP and GOD): ROI voxels carry the BOLD
signal, every other voxel is exactly 0, and each run covers an occipital slab of the subject's
grid (the ROI's bounding box plus a 2-voxel margin of zeros) with the matching affine. So the
recipe's `--roi background` selects exactly the ROI, and its voxel order (C order of nonzero) is
the ROI order of `brain.Anatomy.roi_index`.

```
corpus_bids/dataset_description.json  README  participants.tsv  task-movie_bold.json (TR, task)
corpus_bids/sub-c01/func/sub-c01_task-movie_run-1_bold.nii.gz     int16, X x Y x Z x frames, TR in pixdim[4]
corpus_bids/sub-c01/func/sub-c01_task-movie_run-1_events.tsv      onset, duration, trial_type, scene_id
toyworld_truth/corpus.json            config, scenes (by scene_id), per-subject parameters and measures
```

Random streams: [seed, 20] the movie, [seed, 21] the calibration scenes, [seed, 22, c] subject c's
brain, [seed, 23, c] its noise; the study's own streams are untouched, so a study with and without
a corpus is the same study. `corpus_brain` rebuilds a subject's brain and encoding model exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, special
from tqdm import tqdm

from mindsemantix.io import atomic_dir, write_json_atomic

from . import brain
from .scenes import Scene, render_scene, sample_scene

CORPUS_DIR = "corpus_bids"  # inside the study's output folder
TRUTH_FILE = "corpus.json"  # inside the study's toyworld_truth/
BIDS_VERSION = "1.9.0"
SLAB_MARGIN = 2  # zero voxels around the ROI's bounding box: nilearn reads the background from a 2-voxel border
BASELINE = 1000.0  # median raw EPI intensity (int16 units)
CALIBRATION_SCENES = 300  # as the study: fixes the encoding model's normalisation constants
MEAN_SHOT_SCENES = 4  # scenes per shot (background kept), on average
AR_TIME_CONSTANT_S = 1.25  # exp(-2 s / 1.25 s) = 0.2: SPM's AR(0.2) at a 2-s TR
HRF_UNDERSHOOT_AFTER_S = 10.0  # SPM: undershoot delay 16 s = response delay 6 s + 10 s
HRF_UNDERSHOOT_RATIO = 6.0  # SPM: ratio of response to undershoot

_MOVIE_STREAM, _CALIBRATION_STREAM, _BRAIN_STREAM, _NOISE_STREAM = 20, 21, 22, 23


@dataclasses.dataclass
class CorpusConfig:
    subjects: int = 4  # corpus-only subjects sub-c01.. (0: no corpus)
    runs: int = 4  # runs per subject (the same movie runs for every subject)
    frames: int = 750  # frames per run
    tr: float = 0.8  # seconds (multiband, as HCP's 0.72 s)
    tsnr: float = 70.0  # median temporal SNR of ROI voxels (noise only)
    scene_seconds: float = 2.0  # mean scene duration
    fixation_seconds: float = 10.0  # fixation at the start and at the end of every run
    task: str = "movie"

    @property
    def run_seconds(self) -> float:
        return self.frames * self.tr

    def validate(self) -> None:
        if self.subjects < 0:
            raise ValueError("--corpus-subjects must be >= 0")
        if self.subjects == 0:
            return
        if self.runs < 1:
            raise ValueError("--corpus-runs must be >= 1")
        if not 0.2 <= self.tr <= 10:
            raise ValueError("--corpus-tr must be between 0.2 and 10 seconds")
        if self.tsnr <= 0:
            raise ValueError("--corpus-tsnr must be > 0")
        if self.run_seconds < 2 * self.fixation_seconds + 5 * self.scene_seconds:
            raise ValueError(f"--corpus-frames x --corpus-tr must leave room for scenes between the "
                             f"{self.fixation_seconds:g} s fixation periods (at least "
                             f"{2 * self.fixation_seconds + 5 * self.scene_seconds:g} s per run)")
        if not self.task.isalnum():
            raise ValueError("the BIDS task label must be alphanumeric")


def subject_label(index: int) -> str:
    """BIDS label of corpus subject `index` (0-based): c01, c02, ..."""
    return f"c{index + 1:02d}"


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


# ----------------------------------------------------------------------------------------------
# Haemodynamics


def hrf_integral(t: np.ndarray, response_delay: float = 6.0) -> np.ndarray:
    """Integral from 0 to t of SPM's canonical HRF scaled to unit area (0 for t <= 0).

    The HRF is gamma(t; shape=delay, scale=1 s) minus a sixth of the same with the undershoot
    delay; a gamma density integrates to its regularised lower incomplete gamma function.
    """
    t = np.maximum(np.asarray(t, dtype=np.float64), 0.0)
    response = special.gammainc(response_delay, t)
    undershoot = special.gammainc(response_delay + HRF_UNDERSHOOT_AFTER_S, t) / HRF_UNDERSHOOT_RATIO
    return (response - undershoot) / (1 - 1 / HRF_UNDERSHOOT_RATIO)


def bold_regressors(onsets: np.ndarray, durations: np.ndarray, n_frames: int, tr: float,
                    response_delay: float = 6.0) -> np.ndarray:
    """(n_frames, n_events) BOLD response of each frame to a unit boxcar per event, i.e. the
    HRF-convolved events sampled at the frames' centres ((f + 1/2) TR)."""
    frame_times = (np.arange(n_frames) + 0.5) * tr  # (T,)
    since_onset = frame_times[:, None] - onsets[None]  # (T, n_events)
    return hrf_integral(since_onset, response_delay) - hrf_integral(since_onset - durations[None], response_delay)


# ----------------------------------------------------------------------------------------------
# The movie


@dataclasses.dataclass(frozen=True)
class Event:
    onset: float  # seconds from the run's first frame
    duration: float
    scene_id: int  # index into the movie's scenes; -1 = fixation


def plan_movie(rng: np.random.Generator, config: CorpusConfig, held_out: frozenset,
               excluded: set[Scene]) -> tuple[list[Scene], list[list[Event]]]:
    """The scene stream every corpus subject watches: (scenes, events of each run).

    Scenes never contain a `held_out` shape x colour pair and are never in `excluded` (the study's
    scenes); a scene is shown once."""
    scenes: list[Scene] = []
    runs: list[list[Event]] = []
    excluded = set(excluded)  # grows with the movie's own scenes: each is shown once
    for _ in range(config.runs):
        events = [Event(0.0, config.fixation_seconds, -1)]
        t, end = config.fixation_seconds, config.run_seconds - config.fixation_seconds
        background = None  # None: the next scene starts a new shot
        while True:
            duration = round(config.scene_seconds * rng.uniform(0.75, 1.25), 3)
            if t + duration > end:
                break
            scene = _new_scene(rng, held_out, excluded, background)
            events.append(Event(round(t, 3), duration, len(scenes)))
            scenes.append(scene)
            excluded.add(scene)
            background = scene.background if rng.random() > 1 / MEAN_SHOT_SCENES else None
            t += duration
        events.append(Event(round(t, 3), round(config.run_seconds - t, 3), -1))
        runs.append(events)
    return scenes, runs


def _new_scene(rng: np.random.Generator, held_out: frozenset, excluded: set[Scene],
               background: str | None) -> Scene:
    while True:
        scene = sample_scene(rng, held_out)  # novel=False: no held-out pair
        if background is not None:
            scene = dataclasses.replace(scene, background=background)
        if scene not in excluded:
            assert not scene.shape_colour_pairs() & held_out
            return scene


# ----------------------------------------------------------------------------------------------
# Brains


@dataclasses.dataclass
class CorpusBrain:
    label: str
    voxel_size: float
    anatomy: brain.Anatomy
    model: brain.EncodingModel
    response_delay: float  # HRF response delay (s); the undershoot follows 10 s later


def calibration_set(seed: int, image_size: int) -> tuple[list[Scene], np.ndarray]:
    """The scenes (and images, (N, H, W, 3) uint8) that fix the corpus models' normalisation."""
    rng = _rng(seed, _CALIBRATION_STREAM)
    scenes = [sample_scene(rng) for _ in range(CALIBRATION_SCENES)]
    return scenes, np.stack([render_scene(s, image_size) for s in scenes])


def corpus_brain(seed: int, index: int, voxel_size_range: tuple[float, float],
                 calibration: tuple[list[Scene], np.ndarray]) -> CorpusBrain:
    """Corpus subject `index` (0-based): anatomy, calibrated encoding model and HRF delay, drawn
    like the study's subjects (the same functions, its own random stream)."""
    rng = _rng(seed, _BRAIN_STREAM, index)
    voxel_size = float(rng.uniform(*voxel_size_range))
    anatomy = brain.make_anatomy(f"sub-{subject_label(index)}", rng, voxel_size)
    model = brain.make_encoding_model(anatomy, rng)
    model.calibrate(*calibration)
    response_delay = float(np.clip(rng.normal(6.0, 0.5), 5.0, 7.0))
    return CorpusBrain(subject_label(index), voxel_size, anatomy, model, response_delay)


@dataclasses.dataclass
class VoxelNoise:
    """Per-voxel BOLD parameters of one subject's ROI voxels (V) and its shared noise factors."""

    baseline: np.ndarray  # (V,) S0 in int16 units
    evoked_psc: np.ndarray  # (V,) sustained response to any scene vs fixation, % signal change
    amplitude_psc: np.ndarray  # (V,) SD of the scene-specific response, % signal change
    noise_sd: np.ndarray  # (V,) SD of physiological + thermal noise, fraction of S0 (= 1 / tSNR)
    physiological_fraction: float  # share of the noise variance that is physiological
    drift_sd: np.ndarray  # (V,) fraction of S0
    shared_loadings: np.ndarray  # (4, V) unit sum of squares per voxel: vascular x2, respiration, cardiac
    respiration_hz: float
    cardiac_hz: float


def make_voxel_noise(rng: np.random.Generator, anatomy: brain.Anatomy, tsnr_median: float) -> VoxelNoise:
    """Draw one subject's baseline, response amplitudes, noise levels and noise factors (see the
    module docstring for the values and their sources)."""
    roi = anatomy.roi_index
    n = len(roi[0])

    def smooth_field() -> np.ndarray:  # (V,) zero mean, unit SD, smooth over ~2 voxels
        field = ndimage.gaussian_filter(rng.normal(size=anatomy.labels.shape), 2.0)[roi]
        return (field - field.mean()) / field.std()

    amplitude = np.exp(rng.normal(np.log(0.8), 0.45, n))
    amplitude[rng.random(n) < 0.1] *= 0.1  # as in the study: some voxels (ROI edges) carry little signal
    loadings = np.stack([smooth_field() for _ in range(4)])
    loadings /= np.sqrt((loadings**2).sum(0, keepdims=True))
    float32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731  (halves the cost of simulate_run)
    return VoxelNoise(
        baseline=float32(BASELINE * np.exp(0.2 * smooth_field())),
        evoked_psc=float32(rng.uniform(0.5, 2.5, n)),
        amplitude_psc=float32(amplitude),
        noise_sd=float32(1 / (tsnr_median * np.exp(rng.normal(0, 0.3, n)))),
        physiological_fraction=float(rng.uniform(0.5, 0.7)),
        drift_sd=float32(rng.uniform(0.003, 0.01, n)),
        shared_loadings=float32(loadings),
        respiration_hz=float(rng.uniform(0.2, 0.33)),
        cardiac_hz=float(rng.uniform(1.0, 1.3)),
    )


def _ar1(rng: np.random.Generator, n_frames: int, n_series: int, tr: float,
         time_constant: float = AR_TIME_CONSTANT_S) -> np.ndarray:
    """(n_frames, n_series) float32 unit-variance AR(1) noise sampled every `tr` seconds."""
    phi = np.float32(np.exp(-tr / time_constant))
    out = rng.standard_normal((n_frames, n_series), dtype=np.float32)
    out[1:] *= np.sqrt(1 - phi**2)  # innovations; the first row is already stationary
    for f in range(1, n_frames):
        out[f] += phi * out[f - 1]
    return out


def _rhythm(rng: np.random.Generator, n_frames: int, tr: float, rate_hz: float) -> np.ndarray:
    """(n_frames,) a unit-variance oscillation whose rate wanders by a few %, sampled once per TR
    (so a rhythm faster than the Nyquist rate aliases, as cardiac pulsation does in fMRI)."""
    rate = rate_hz * (1 + 0.05 * _ar1(rng, n_frames, 1, tr, time_constant=30.0)[:, 0])
    phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.cumsum(rate * tr)
    return (np.sqrt(2) * np.sin(phase)).astype(np.float32)


def simulate_run(rng: np.random.Generator, noise: VoxelNoise, stimulus_psc: np.ndarray,
                 tr: float) -> tuple[np.ndarray, np.ndarray]:
    """One run's ROI time series. stimulus_psc: (T, V) noise-free BOLD change (%).

    Returns the (T, V) int16 intensities as written and the (T, V) float32 stimulus-driven part
    of them (intensity units)."""
    n_frames, n_voxels = stimulus_psc.shape
    cosines = np.cos(np.pi * np.outer(np.arange(n_frames) + 0.5, [1, 2, 3]) / n_frames) / [1, 2, 3]  # (T, 3)
    drift = cosines.astype(np.float32) @ rng.standard_normal((3, n_voxels), dtype=np.float32)  # (T, V)
    drift *= noise.drift_sd / drift.std(0)
    factors = np.column_stack([_ar1(rng, n_frames, 2, tr), _rhythm(rng, n_frames, tr, noise.respiration_hz),
                               _rhythm(rng, n_frames, tr, noise.cardiac_hz)])  # (T, 4)
    p = np.float32(noise.physiological_fraction)
    physiological = np.sqrt(p / 2) * (_ar1(rng, n_frames, n_voxels, tr) + factors @ noise.shared_loadings)
    thermal = np.sqrt(1 - p) * rng.standard_normal((n_frames, n_voxels), dtype=np.float32)
    stimulus = noise.baseline * stimulus_psc.astype(np.float32) / 100
    intensity = noise.baseline * (1 + drift + noise.noise_sd * (physiological + thermal)) + stimulus
    return np.clip(np.rint(intensity), 1, 32767).astype(np.int16), stimulus


def tsnr(series: np.ndarray) -> np.ndarray:
    """(V,) temporal SNR of (T, V) time series as usually measured: mean over the SD left after
    removing a linear trend (stimulus-driven variance counts as noise here)."""
    x = series.astype(np.float64)
    t = np.arange(len(x)) - (len(x) - 1) / 2
    mean = x.mean(0)
    slope = t @ (x - mean) / (t @ t)
    return mean / (x - mean - np.outer(t, slope)).std(0)


# ----------------------------------------------------------------------------------------------
# Writing


def _slab(anatomy: brain.Anatomy) -> tuple[tuple[slice, ...], np.ndarray]:
    """The ROI's bounding box plus SLAB_MARGIN voxels (within the grid) and the slab's affine."""
    roi = np.array(anatomy.roi_index)  # (3, V)
    lo = np.maximum(roi.min(1) - SLAB_MARGIN, 0)
    hi = np.minimum(roi.max(1) + SLAB_MARGIN + 1, anatomy.labels.shape)
    shift = np.eye(4)
    shift[:3, 3] = lo
    return tuple(slice(a, b) for a, b in zip(lo, hi)), anatomy.affine @ shift


def write_bold(path: Path, series: np.ndarray, anatomy: brain.Anatomy, tr: float) -> None:
    """series: (T, V) int16 ROI intensities -> a 4-D int16 NIfTI of the occipital slab, zero
    outside the ROI, scanner-space affine in sform and qform, voxel size and TR in pixdim."""
    slab, affine = _slab(anatomy)
    origin = np.array([s.start for s in slab])
    local = tuple(i - o for i, o in zip(anatomy.roi_index, origin))
    # (X, Y, Z, T) in Fortran order, the order NIfTI stores, so nibabel writes it without a copy
    volume = np.zeros((*(s.stop - s.start for s in slab), len(series)), dtype=np.int16, order="F")
    volume[local] = series.T
    img = nib.Nifti1Image(volume, affine)
    img.set_sform(affine, code=1)  # 1 = scanner anatomical
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((*np.sqrt((affine[:3, :3] ** 2).sum(0)), tr))
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(path))


def _write_events(path: Path, events: list[Event]) -> None:
    lines = ["onset\tduration\ttrial_type\tscene_id"]
    for e in events:
        kind, scene = ("scene", str(e.scene_id)) if e.scene_id >= 0 else ("fixation", "n/a")
        lines.append(f"{e.onset:.3f}\t{e.duration:.3f}\t{kind}\t{scene}")
    path.write_text("\n".join(lines) + "\n")


def _write_dataset_files(root: Path, config: CorpusConfig, labels: list[str]) -> None:
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "toyworld movie corpus (simulated, image-less pretraining data)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "mindsemantix.simulate.corpus",
                         "Description": "simulated BOLD; see the module docstring"}],
    }, indent=2) + "\n")
    (root / f"task-{config.task}_bold.json").write_text(json.dumps({
        "TaskName": config.task,
        "RepetitionTime": config.tr,
        "TaskDescription": "passive viewing of a continuous stream of toyworld scenes, "
                           f"~{config.scene_seconds:g} s each, {config.fixation_seconds:g} s of "
                           "fixation at the start and end of each run",
    }, indent=2) + "\n")
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{l}\n" for l in labels))
    (root / "README").write_text(
        "Simulated BOLD runs of the toyworld study's image-less pretraining corpus.\n"
        "Released masked to the visual ROI: voxels outside it are 0.\n"
        "Scene descriptions (scene_id in events.tsv): ../toyworld_truth/corpus.json\n")


def build_corpus(out: str | Path, truth_path: str | Path, config: CorpusConfig, seed: int,
                 held_out: frozenset, excluded_scenes: list[Scene] | set[Scene],
                 voxel_size_range: tuple[float, float], image_size: int = 64, progress: bool = True) -> dict:
    """Write the corpus as a BIDS dataset at `out` (atomically) and its ground truth to
    `truth_path`. `excluded_scenes`: the study's scenes, never shown in the corpus. Returns a
    summary (per subject: grid, voxels, HRF delay, tSNR, stimulus-driven share of variance)."""
    config.validate()
    t_start = time.time()
    scenes, runs = plan_movie(_rng(seed, _MOVIE_STREAM), config, held_out, set(excluded_scenes))
    images = np.stack([render_scene(s, image_size)
                       for s in tqdm(scenes, desc="render corpus scenes", disable=not progress)])
    calibration = calibration_set(seed, image_size)
    labels = [subject_label(c) for c in range(config.subjects)]
    subjects: dict[str, dict] = {}
    with atomic_dir(out) as tmp:
        _write_dataset_files(tmp, config, labels)
        for c in tqdm(range(config.subjects), desc="simulate corpus subjects", disable=not progress):
            subjects[labels[c]] = _simulate_subject(tmp, config, seed, c, voxel_size_range, calibration,
                                                    scenes, images, runs)
        summary = {
            "bids": Path(out).name, "task": config.task, "subjects": subjects,
            "runs_per_subject": config.runs, "frames_per_run": config.frames, "tr": config.tr,
            "frames_total": config.subjects * config.runs * config.frames, "n_scenes": len(scenes),
            "seconds": round(time.time() - t_start, 1),
        }
        # the truth before the dataset appears: a dataset at `out` always has its truth
        write_json_atomic(truth_path, {
            **summary,
            "config": dataclasses.asdict(config), "seed": seed,
            "hrf": {"model": "SPM canonical double gamma, unit area", "undershoot_after_s": HRF_UNDERSHOOT_AFTER_S,
                    "undershoot_ratio": HRF_UNDERSHOOT_RATIO, "frame_sampled_at": "(f + 1/2) * TR"},
            "excluded": "held-out shape x colour pairs and every study scene (test images included)",
            "scenes": [s.to_dict() for s in scenes],
        })
    return summary


def _simulate_subject(root: Path, config: CorpusConfig, seed: int, index: int,
                      voxel_size_range: tuple[float, float], calibration, scenes: list[Scene],
                      images: np.ndarray, runs: list[list[Event]]) -> dict:
    subject = corpus_brain(seed, index, voxel_size_range, calibration)
    rng = _rng(seed, _NOISE_STREAM, index)
    noise = make_voxel_noise(rng, subject.anatomy, config.tsnr)
    response = np.concatenate([subject.model.response(scenes[i:i + 500], images[i:i + 500])
                               for i in range(0, len(scenes), 500)])  # (n_scenes, V) unit SD; chunks bound memory
    drive = noise.evoked_psc + noise.amplitude_psc * response  # (n_scenes, V) % signal change

    func = root / f"sub-{subject.label}" / "func"
    func.mkdir(parents=True)
    stimulus_share, tsnr_measured = [], []
    for run, events in enumerate(runs, start=1):
        shown = [e for e in events if e.scene_id >= 0]
        regressors = bold_regressors(np.array([e.onset for e in shown]), np.array([e.duration for e in shown]),
                                     config.frames, config.tr, subject.response_delay)  # (T, n_shown)
        stimulus_psc = regressors @ drive[[e.scene_id for e in shown]]  # (T, V)
        series, stimulus = simulate_run(rng, noise, stimulus_psc, config.tr)  # (T, V) each
        stem = f"sub-{subject.label}_task-{config.task}_run-{run}"
        write_bold(func / f"{stem}_bold.nii.gz", series, subject.anatomy, config.tr)
        _write_events(func / f"{stem}_events.tsv", events)
        stimulus_share.append(stimulus.var(0) / series.var(0, dtype=np.float64))
        tsnr_measured.append(tsnr(series))
    slab, _ = _slab(subject.anatomy)
    return {
        "voxel_size_mm": round(subject.voxel_size, 3), "grid": list(subject.anatomy.labels.shape),
        "slab_origin": [int(s.start) for s in slab], "slab_shape": [int(s.stop - s.start) for s in slab],
        "n_voxels": subject.anatomy.n_voxels, "hrf_response_delay_s": round(subject.response_delay, 3),
        "physiological_noise_fraction": round(noise.physiological_fraction, 3),
        "tsnr_target_median": round(float(np.median(1 / noise.noise_sd)), 1),
        "tsnr_measured_median": round(float(np.median(np.mean(tsnr_measured, 0))), 1),
        "stimulus_variance_share_median": round(float(np.median(np.mean(stimulus_share, 0))), 3),
    }
