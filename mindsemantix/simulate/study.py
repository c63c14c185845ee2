"""The simulated study ("toyworld"): scenes, captions, brains and an NSD-layout tree.

`build_study` draws the stimuli and the design, simulates every subject's single-trial betas and
writes everything in the NSD release layout (see `mindsemantix.data.nsd`), plus the simulator's
ground truth in `toyworld_truth/` (outside the release folders; for tests and analyses only).

Design, as in NSD (Allen et al. 2022) at a smaller scale: every subject sees its own images plus
a shared set seen by all (the test set), each image up to `reps` times in one master order of
750-trial sessions common to all subjects; some subjects complete fewer sessions. The shared set
is made of new scenes, half of which (`novel_fraction`) contain shape x colour combinations that
never occur in any subject's own images.

With `corpus.subjects > 0` the study also gets its image-less pretraining corpus (`corpus.py`):
BOLD runs of other, corpus-only brains watching a stream of new scenes, in BIDS under
`corpus_bids/`, written inside the same atomic folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from mindsemantix.data.nsd import BETA_SCALE, TRIALS_PER_SESSION, NSDLayout, subject_name
from mindsemantix.io import atomic_dir

from . import brain, nsd_layout
from .corpus import CORPUS_DIR, CorpusConfig, build_corpus
from .captions import canonical_caption, describe
from .scenes import BACKGROUNDS, COLOURS, LAYOUTS, SHAPES, Scene, choose_held_out_pairs, render_scene, sample_scene

TRUTH_DIR = "toyworld_truth"
MAX_OBJECTS = 3


@dataclasses.dataclass
class StudyConfig:
    seed: int = 0
    subjects: int = 4
    sessions: int = 5  # sessions of 750 trials in the design
    incomplete: tuple[int, ...] = (3,)  # subjects (1-based) that miss the design's last session
    shared_images: int = 100  # test images seen by every subject
    reps: int = 3  # presentations of each image
    image_size: int = 64
    voxel_size: tuple[float, float] = (3.6, 4.2)  # mm, drawn per subject from this range
    ncsnr: float = 0.35  # median noise-ceiling SNR of ROI voxels
    novel_fraction: float = 0.5  # share of test images with held-out shape x colour pairs
    captions_per_image: int = 5
    betas_format: str = "nii.gz"  # "nii.gz", "hdf5" or "both"
    val2017_fraction: float = 0.15  # share of images whose (fake) cocoSplit is val2017
    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)  # subjects=0: none

    @property
    def images_per_subject(self) -> int:
        return self.sessions * TRIALS_PER_SESSION // self.reps

    def validate(self) -> None:
        if self.subjects < 1:
            raise ValueError("--subjects must be >= 1")
        if self.sessions < 1:
            raise ValueError("--sessions must be >= 1")
        if not 1 <= self.reps <= 3:
            raise ValueError("--reps must be 1, 2 or 3 (as in NSD)")
        if (self.sessions * TRIALS_PER_SESSION) % self.reps:
            raise ValueError(f"sessions x {TRIALS_PER_SESSION} trials must be divisible by --reps")
        if not 0 < self.shared_images < self.images_per_subject:
            raise ValueError(f"--shared-images must be between 1 and {self.images_per_subject - 1} "
                             f"(images per subject = sessions x {TRIALS_PER_SESSION} / reps)")
        if self.image_size % brain.MAP_SIZE:
            raise ValueError(f"--image-size must be a multiple of {brain.MAP_SIZE}")
        if self.betas_format not in ("nii.gz", "hdf5", "both"):
            raise ValueError("--betas-format must be nii.gz, hdf5 or both")
        if not 0 <= self.novel_fraction <= 1:
            raise ValueError("--novel-fraction must be in [0, 1]")
        self.corpus.validate()


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent random stream per component (and subject), all derived from the one seed."""
    return np.random.default_rng([seed, *stream])


def master_ordering(rng: np.random.Generator, n_images: int, reps: int) -> np.ndarray:
    """(n_images * reps,) 1-based image indices: each image `reps` times, spread at random over
    the sessions, never twice in a row."""
    order = np.repeat(np.arange(1, n_images + 1), reps)[rng.permutation(n_images * reps)]
    for t in range(1, len(order)):
        if order[t] == order[t - 1]:  # swap with a later trial that breaks the repeat
            for u in range(t + 1, len(order)):
                if order[u] != order[t] and order[u] != order[t - 1]:
                    order[t], order[u] = order[u], order[t]
                    break
    return order


def scene_features(scene: Scene) -> np.ndarray:
    """A fixed-length description of a scene (FEATURE_NAMES): background, layout, count, relation
    and per object slot shape, colour, size, position, radius."""
    f = np.zeros(len(FEATURE_NAMES), dtype=np.float32)
    f[BACKGROUNDS.index(scene.background)] = 1
    f[4 + LAYOUTS.index(scene.layout)] = 1
    f[7] = scene.count
    if scene.relation:
        f[8 + ["left of", "right of", "above", "below"].index(scene.relation)] = 1
    for k, o in enumerate(scene.objects):
        base = 12 + k * 19
        f[base + SHAPES.index(o.shape)] = 1
        f[base + 6 + list(COLOURS).index(o.colour)] = 1
        f[base + 14:base + 19] = [o.size == "large", o.x, o.y, o.radius, 1]
    return f


FEATURE_NAMES = (
    [f"background={b}" for b in BACKGROUNDS] + [f"layout={l}" for l in LAYOUTS] + ["count"]
    + [f"relation={r}" for r in ("left of", "right of", "above", "below")]
    + [f"object{k}.{n}" for k in range(MAX_OBJECTS)
       for n in [f"shape={s}" for s in SHAPES] + [f"colour={c}" for c in COLOURS]
       + ["large", "x", "y", "radius", "present"]]
)


def build_study(out: str | Path, config: StudyConfig, progress: bool = True) -> dict:
    """Write the simulated study to `out` (atomically: all of it, or nothing). Returns a summary."""
    config.validate()
    t_start = time.time()
    n_own = config.images_per_subject - config.shared_images
    n_images = config.shared_images + config.subjects * n_own

    # -- stimuli: shared (test) scenes first, then each subject's own scenes -------------------
    scene_rng = _rng(config.seed, 1)
    held_out = choose_held_out_pairs(scene_rng)
    n_novel = round(config.novel_fraction * config.shared_images)
    scenes = [sample_scene(scene_rng, held_out, novel=i < n_novel) for i in range(config.shared_images)]
    scenes += [sample_scene(scene_rng, held_out) for _ in range(config.subjects * n_own)]
    caption_rng = _rng(config.seed, 2)
    captions = [describe(s, caption_rng, config.captions_per_image) for s in scenes]
    images = np.stack([render_scene(s, config.image_size)
                       for s in tqdm(scenes, desc="render scenes", disable=not progress)])

    # 73k-style ids: scene k gets nsdId position[k], so shared images are scattered like sharedix
    design_rng = _rng(config.seed, 3)
    nsd_id_of_scene = design_rng.permutation(n_images)
    scene_of_nsd_id = np.argsort(nsd_id_of_scene)
    shared_ids = np.sort(nsd_id_of_scene[: config.shared_images])  # 0-based
    subjectim = np.empty((config.subjects, config.images_per_subject), dtype=np.int64)  # 0-based
    for s in range(config.subjects):
        own = nsd_id_of_scene[config.shared_images + s * n_own: config.shared_images + (s + 1) * n_own]
        subjectim[s] = np.concatenate([shared_ids, own])  # as in NSD, the shared images come first
    order = master_ordering(design_rng, config.images_per_subject, config.reps)  # 1-based
    sessions_done = [config.sessions - (s + 1 in config.incomplete and config.sessions > 1)
                     for s in range(config.subjects)]
    coco_id = design_rng.choice(np.arange(1, 600_000), size=n_images, replace=False)
    coco_split = ["val2017" if r < config.val2017_fraction else "train2017" for r in design_rng.random(n_images)]

    out = Path(out)
    summary: dict = {"config": {k: (list(v) if isinstance(v, tuple) else v)
                                for k, v in dataclasses.asdict(config).items()},
                     "n_images": n_images, "images_per_subject": config.images_per_subject,
                     "held_out_pairs": sorted(map(list, held_out)), "subjects": {}}
    with atomic_dir(out) as tmp:
        layout = NSDLayout(tmp)
        shown = np.zeros((config.subjects, n_images), dtype=bool)
        rep_trials = np.zeros((config.subjects, n_images, 3), dtype=np.int64)
        truth_h5 = tmp / TRUTH_DIR / "truth.hdf5"
        truth_h5.parent.mkdir(parents=True)
        with h5py.File(truth_h5, "w") as truth:
            truth.attrs["feature_names"] = json.dumps(FEATURE_NAMES)
            truth.create_dataset("features", data=np.stack([scene_features(scenes[k]) for k in scene_of_nsd_id]))
            for s in tqdm(range(config.subjects), desc="simulate subjects", disable=not progress):
                info = _simulate_subject(layout, truth, config, s, scenes, images, scene_of_nsd_id,
                                         subjectim[s], order, sessions_done[s], progress)
                summary["subjects"][subject_name(s + 1)] = info
                trial_ids = subjectim[s][order[: sessions_done[s] * TRIALS_PER_SESSION] - 1]
                shown[s, trial_ids] = True
                seen = np.zeros(n_images, dtype=np.int64)
                for t, i in enumerate(trial_ids):
                    if seen[i] < 3:
                        rep_trials[s, i, seen[i]] = t + 1
                    seen[i] += 1

        nsd_layout.write_expdesign(layout.expdesign, order, subjectim + 1, shared_ids + 1, config.sessions)
        is_shared = np.zeros(n_images, dtype=bool)
        is_shared[shared_ids] = True
        nsd_layout.write_stim_info(layout.stim_info, coco_id, coco_split, is_shared, shown, rep_trials)
        nsd_layout.write_stimuli(layout.stimuli, images[scene_of_nsd_id])
        nsd_layout.write_coco_captions(layout.annotations, coco_id, coco_split,
                                       [captions[k] for k in scene_of_nsd_id], config.image_size)
        if config.corpus.subjects:
            # never shows a study scene (test images included) or a held-out combination
            summary["corpus"] = build_corpus(tmp / CORPUS_DIR, tmp / TRUTH_DIR / "corpus.json", config.corpus,
                                             config.seed, held_out, scenes, config.voxel_size,
                                             config.image_size, progress)
        truth_json = {
            **summary,
            "feature_names": FEATURE_NAMES,
            "images": [{"nsd_id": i, "coco_id": int(coco_id[i]), "shared": bool(is_shared[i]),
                        "novel": bool(scenes[k].shape_colour_pairs() & held_out),
                        "scene": scenes[k].to_dict(), "canonical_caption": canonical_caption(scenes[k])}
                       for i, k in enumerate(scene_of_nsd_id)],
        }
        (tmp / TRUTH_DIR / "truth.json").write_text(json.dumps(truth_json))
    summary["seconds"] = round(time.time() - t_start, 1)
    return summary


def _simulate_subject(layout: NSDLayout, truth: h5py.File, config: StudyConfig, s: int,
                      scenes: list[Scene], images: np.ndarray, scene_of_nsd_id: np.ndarray,
                      subject_ids: np.ndarray, order: np.ndarray, n_sessions: int, progress: bool) -> dict:
    """Anatomy, encoding model and betas of subject s (0-based); writes ROI, betas and truth."""
    rng = _rng(config.seed, 10, s)
    voxel_size = float(rng.uniform(*config.voxel_size))
    anatomy = brain.make_anatomy(subject_name(s + 1), rng, voxel_size)
    model = brain.make_encoding_model(anatomy, rng)
    calibration_rng = _rng(config.seed, 11, s)
    calibration = [sample_scene(calibration_rng) for _ in range(300)]
    model.calibrate(calibration, np.stack([render_scene(c, config.image_size) for c in calibration]))

    scene_index = scene_of_nsd_id[subject_ids]  # (n_images_subject,)
    signal = model.response([scenes[k] for k in scene_index], images[scene_index])  # (n, V)

    # betas for the ROI and a band of non-ROI voxels around it (noise only)
    roi_index, band_index = anatomy.roi_index, anatomy.band_index()
    index = tuple(np.concatenate([r, b]) for r, b in zip(roi_index, band_index))
    n_roi = len(roi_index[0])
    noise = brain.make_noise_model(rng, anatomy, index, n_roi, config.ncsnr)
    signal_all = np.zeros((len(signal), len(index[0])), dtype=np.float32)
    signal_all[:, :n_roi] = signal
    n_trials = n_sessions * TRIALS_PER_SESSION
    trial_image = order[:n_trials] - 1  # row of `signal` per trial
    betas = brain.simulate_betas(rng, noise, signal_all, trial_image, TRIALS_PER_SESSION)
    betas_int16 = np.clip(np.rint(betas * BETA_SCALE), -32768, 32767).astype(np.int16)

    subject = s + 1
    nsd_layout.write_roi(layout.roi(subject), anatomy.labels, anatomy.affine)
    for session in tqdm(range(n_sessions), desc=f"write {anatomy.name} sessions", leave=False,
                        disable=not progress):
        rows = slice(session * TRIALS_PER_SESSION, (session + 1) * TRIALS_PER_SESSION)
        if config.betas_format in ("nii.gz", "both"):
            nsd_layout.write_betas_nifti(layout.betas(subject, session + 1, "nii.gz"), betas_int16[rows],
                                         index, anatomy.labels.shape, anatomy.affine)
        if config.betas_format in ("hdf5", "both"):
            nsd_layout.write_betas_hdf5(layout.betas(subject, session + 1, "hdf5"), betas_int16[rows],
                                        index, anatomy.labels.shape)

    # the noise ceiling as NSD measures it, from what a reader of the files gets
    measured = brain.ncsnr(betas_int16[:, :n_roi] / BETA_SCALE, trial_image, TRIALS_PER_SESSION)
    group = truth.create_group(f"subjects/{anatomy.name}")
    group.create_dataset("nsd_ids", data=subject_ids)
    group.create_dataset("signal", data=signal.astype(np.float16), compression="gzip")  # (n, V) unit SD
    group.create_dataset("ncsnr", data=measured.astype(np.float32))
    group.create_dataset("signal_sd_psc", data=noise.signal_sd[:n_roi].astype(np.float32))
    group.create_dataset("noise_sd_psc", data=noise.noise_sd[:n_roi].astype(np.float32))
    for name in ("hierarchy", "rf_xy", "rf_sigma", "component_weights"):
        group.create_dataset(name, data=getattr(model, name))
    return {"voxel_size_mm": round(voxel_size, 3), "grid": list(anatomy.labels.shape),
            "n_voxels": n_roi, "sessions": n_sessions,
            "ncsnr_median": round(float(np.median(measured)), 3),
            "ncsnr_mean": round(float(measured.mean()), 3),
            "noise_ceiling_3trials_median_pct": round(float(np.median(brain.noise_ceiling(measured, 3))), 1),
            "noise_ceiling_1trial_median_pct": round(float(np.median(brain.noise_ceiling(measured, 1))), 1)}


def load_truth(root: str | Path) -> dict | None:
    """The simulator's ground truth of an NSD-layout tree (`toyworld_truth/truth.json`): config,
    held-out pairs, per-subject summary and, per nsdId, the scene (`Scene.from_dict`), whether it
    is shared (test) and novel, and its canonical caption. None for a tree without it (the real
    release)."""
    path = Path(root) / TRUTH_DIR / "truth.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())
