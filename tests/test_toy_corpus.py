"""The simulated study's image-less pretraining corpus (mindsemantix.simulate.corpus): BIDS files,
conversion by the unchanged corpus recipe, a stimulus-driven signal checked against an independent
HRF convolution, no test image in the stream, determinism and atomic writing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import signal, stats

from conftest_data import build_toyworld, load_recipe
from mindsemantix.data.shards import ShardDataset, iter_split, read_manifest
from mindsemantix.simulate import corpus
from mindsemantix.simulate.scenes import Scene, choose_held_out_pairs, render_scene

SEED, TR, FRAMES, RUNS, VOXEL_MM = 4, 0.8, 100, 2, 9.0
TINY_STUDY_WITH_CORPUS = ["--seed", str(SEED), "--subjects", "1", "--sessions", "1", "--shared-images", "20",
                          "--voxel-size", str(VOXEL_MM), "--corpus-subjects", "2", "--corpus-runs", str(RUNS),
                          "--corpus-frames", str(FRAMES), "--corpus-tr", str(TR), "--quiet"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return build_toyworld(tmp_path_factory.getbasetemp() / "toyworld_trees", TINY_STUDY_WITH_CORPUS)


@pytest.fixture(scope="module")
def corpus_truth(tree) -> dict:
    return json.loads((tree / "toyworld_truth" / corpus.TRUTH_FILE).read_text())


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "shards"
    load_recipe("fmri_corpus").main(["--root", str(tree / corpus.CORPUS_DIR), "--dataset", "toycorpus",
                                     "--out", str(out), "--roi", "background", "--window", "4", "--quiet"])
    return out


@pytest.fixture(scope="module")
def brain_c01():
    calibration = corpus.calibration_set(SEED, 64)
    return corpus.corpus_brain(SEED, 0, (VOXEL_MM, VOXEL_MM), calibration)


def _events(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_bids_files_are_valid(tree, corpus_truth, brain_c01):
    root = tree / corpus.CORPUS_DIR
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["BIDSVersion"] and description["Name"] and description["DatasetType"] == "raw"
    sidecar = json.loads((root / "task-movie_bold.json").read_text())
    assert sidecar == {**sidecar, "TaskName": "movie", "RepetitionTime": TR}
    assert (root / "participants.tsv").read_text().split() == ["participant_id", "sub-c01", "sub-c02"]
    for label in ("c01", "c02"):
        for run in range(1, RUNS + 1):
            stem = root / f"sub-{label}" / "func" / f"sub-{label}_task-movie_run-{run}"
            img = nib.load(str(stem) + "_bold.nii.gz")
            assert img.ndim == 4 and img.shape[3] == FRAMES and img.get_data_dtype() == np.int16
            assert img.header.get_zooms() == pytest.approx((VOXEL_MM, VOXEL_MM, VOXEL_MM, TR))
            assert img.header.get_xyzt_units() == ("mm", "sec")
            assert int(img.header["sform_code"]) == 1 and np.allclose(img.header.get_sform(), img.affine)
            events = _events(Path(str(stem) + "_events.tsv"))
            assert list(events[0]) == ["onset", "duration", "trial_type", "scene_id"]
            onsets, durations = (np.array([float(e[k]) for e in events]) for k in ("onset", "duration"))
            np.testing.assert_allclose(onsets[1:], (onsets + durations)[:-1], atol=2e-3)  # a continuous stream
            assert onsets[-1] + durations[-1] == pytest.approx(FRAMES * TR, abs=2e-3)
            assert [e["trial_type"] for e in (events[0], events[-1])] == ["fixation", "fixation"]

    # sub-c01's non-zero voxels are exactly its ROI, at the same places in scanner space
    img = nib.load(str(root / "sub-c01/func/sub-c01_task-movie_run-1_bold.nii.gz"))
    data = np.asanyarray(img.dataobj)
    assert data.min() >= 0 and (data[..., 0] > 0).sum() == brain_c01.anatomy.n_voxels
    written_mm = nib.affines.apply_affine(img.affine, np.argwhere(data.mean(-1) > 0))
    roi_mm = nib.affines.apply_affine(brain_c01.anatomy.affine, np.argwhere(brain_c01.anatomy.labels == 1))
    np.testing.assert_allclose(written_mm, roi_mm, atol=1e-3)  # both in C order
    assert corpus_truth["subjects"]["c01"]["n_voxels"] == brain_c01.anatomy.n_voxels
    assert 40 < corpus_truth["subjects"]["c01"]["tsnr_measured_median"] < 90


def test_corpus_recipe_converts_it(shards, corpus_truth):
    manifest = read_manifest(shards)
    assert set(manifest["subjects"]) == {"toycorpus-c01", "toycorpus-c02"}
    for label in ("c01", "c02"):
        assert manifest["subjects"][f"toycorpus-{label}"]["n_voxels"] == corpus_truth["subjects"][label]["n_voxels"]
    # 100 frames per run, val = last 10: train windows start 0..84 (22), val 92, 96 (2)
    assert manifest["splits"]["train"]["n_samples"] == 2 * RUNS * 22
    assert manifest["splits"]["val"]["n_samples"] == 2 * RUNS * 2
    sample = next(iter_split(ShardDataset(shards), "train"))
    assert sample["meta"]["tr"] == pytest.approx(TR) and sample["meta"]["image_id"] == -1
    assert sample["fmri"].shape == (4, corpus_truth["subjects"][sample["meta"]["subject"][-3:]]["n_voxels"])


def _spm_hrf(t: np.ndarray, delay: float) -> np.ndarray:
    """SPM's canonical double gamma from its published parameters (independent of corpus.py)."""
    return stats.gamma.pdf(t, delay) - stats.gamma.pdf(t, delay + 10) / 6


def _convolved(events: list[dict], values: np.ndarray, delay: float, dt: float = 0.01) -> np.ndarray:
    """(FRAMES, K) events' values (n_events, K) as boxcars on a dt grid, convolved with the HRF and
    sampled at the frames' centres."""
    grid = np.zeros((int(round(FRAMES * TR / dt)), values.shape[1]))
    for e, v in zip(events, values):
        grid[int(round(float(e["onset"]) / dt)):int(round((float(e["onset"]) + float(e["duration"])) / dt))] = v
    kernel = _spm_hrf(np.arange(0, 32, dt), delay)[:, None]
    bold = signal.fftconvolve(grid, kernel, axes=0)[: len(grid)] * dt
    return bold[((np.arange(FRAMES) + 0.5) * TR / dt).astype(int)]


def test_hrf_matches_spm_canonical():
    t = np.linspace(0, 40, 4001)
    h = np.gradient(corpus.hrf_integral(t), t)
    np.testing.assert_allclose(h, _spm_hrf(t, 6.0) / (5 / 6), atol=2e-4)
    assert 4.8 < t[np.argmax(h)] < 5.2 and corpus.hrf_integral(np.array([60.0]))[0] == pytest.approx(1, abs=1e-6)
    events = [{"onset": o, "duration": d} for o, d in ((10, 2.0), (12, 1.5), (30, 2.5))]
    values = np.array([[1.0], [-0.5], [2.0]])
    exact = corpus.bold_regressors(np.array([10, 12, 30.0]), np.array([2.0, 1.5, 2.5]), FRAMES, TR, 5.5) @ values
    np.testing.assert_allclose(exact, _convolved(events, values, 5.5) / (5 / 6), atol=2e-3)


def test_signal_is_stimulus_driven(shards, tree, corpus_truth, brain_c01):
    """The recorded (converted) series of sub-c01 follows its encoding model's responses to the
    scenes it saw, convolved with the HRF here, beyond the on/off response and drift."""
    scenes = [Scene.from_dict(d) for d in corpus_truth["scenes"]]
    response = brain_c01.model.response(scenes, np.stack([render_scene(s, 64) for s in scenes]))  # (n, V)
    delay = corpus_truth["subjects"]["c01"]["hrf_response_delay_s"]
    rows = {}  # run -> (FRAMES, V) z-scored series, NaN where the recipe dropped a window
    for s in iter_split(ShardDataset(shards), "train"):
        if s["meta"]["subject"] == "toycorpus-c01":
            run = rows.setdefault(s["meta"]["run"], np.full((FRAMES, response.shape[1]), np.nan))
            run[np.array(s["meta"]["frames"]) - 1] = s["fmri"]
    real, shuffled = [], []
    rng = np.random.default_rng(0)
    for run_file, series in sorted(rows.items()):
        events = _events(tree / corpus.CORPUS_DIR / run_file.replace("_bold.nii.gz", "_events.tsv"))
        ids = np.array([int(e["scene_id"]) if e["scene_id"] != "n/a" else -1 for e in events])
        on = _convolved(events, (ids >= 0)[:, None].astype(float), delay)  # (T, 1)
        frames = np.arange(FRAMES)
        nuisance = np.column_stack([np.ones(FRAMES), on, *(np.cos(np.pi * k * (frames + 0.5) / FRAMES)
                                                        for k in (1, 2, 3))])
        kept = ~np.isnan(series[:, 0])
        permuted = ids.copy()
        permuted[ids >= 0] = rng.permutation(ids[ids >= 0])  # the same stream timing, other scenes
        for scene_rows, out in ((ids, real), (permuted, shuffled)):
            predicted = _convolved(events, np.where(scene_rows[:, None] >= 0, response[scene_rows], 0), delay)
            out.append(_partial_correlation(series[kept], predicted[kept], nuisance[kept]))
    real, shuffled = np.median(real, 0), np.median(shuffled, 0)  # (V,) over runs
    assert np.median(real) > 0.15 and np.median(shuffled) < 0.05
    assert (real > shuffled).mean() > 0.7


def _partial_correlation(y: np.ndarray, x: np.ndarray, nuisance: np.ndarray) -> np.ndarray:
    """(V,) correlation of y[:, v] and x[:, v] after regressing out the nuisance columns."""
    project = nuisance @ np.linalg.pinv(nuisance)
    ry, rx = y - project @ y, x - project @ x
    return (ry * rx).sum(0) / np.sqrt((ry**2).sum(0) * (rx**2).sum(0))


def test_no_test_image_in_corpus_stream(tree, corpus_truth):
    truth = json.loads((tree / "toyworld_truth/truth.json").read_text())
    held_out = {tuple(p) for p in truth["held_out_pairs"]}
    study = {json.dumps(im["scene"], sort_keys=True): im["shared"] for im in truth["images"]}
    shown = []
    for events_file in sorted((tree / corpus.CORPUS_DIR).glob("sub-*/func/*_events.tsv")):
        shown += [int(e["scene_id"]) for e in _events(events_file) if e["trial_type"] == "scene"]
    assert set(shown) == set(range(len(corpus_truth["scenes"])))  # every scene id refers to the truth
    for scene in corpus_truth["scenes"]:
        assert json.dumps(scene, sort_keys=True) not in study  # no test image, no study image at all
        assert not {(o["shape"], o["colour"]) for o in scene["objects"]} & held_out

    # the exclusion itself: scenes the stream would have drawn first are skipped when excluded
    config = corpus.CorpusConfig(runs=1, frames=60, tr=1.0)
    first, _ = corpus.plan_movie(np.random.default_rng(1), config, frozenset(), set())
    again, _ = corpus.plan_movie(np.random.default_rng(1), config, frozenset(), set(first[:5]))
    assert again and not set(again) & set(first[:5])


def _build_small(out: Path, seed: int, **changes) -> dict:
    config = corpus.CorpusConfig(**{"subjects": 1, "runs": 1, "frames": 60, "tr": 1.0, **changes})
    held_out = choose_held_out_pairs(np.random.default_rng(seed))
    return corpus.build_corpus(out / "bids", out / "corpus.json", config, seed, held_out, [], (12.0, 12.0),
                               progress=False)


def test_deterministic_by_seed(tmp_path):
    runs = []
    for name, seed in (("a", 7), ("b", 7)):
        _build_small(tmp_path / name, seed)
        bold = tmp_path / name / "bids/sub-c01/func/sub-c01_task-movie_run-1_bold.nii.gz"
        truth = json.loads((tmp_path / name / "corpus.json").read_text())
        truth.pop("seconds")
        runs.append((np.asanyarray(nib.load(str(bold)).dataobj), bold.with_name(
            "sub-c01_task-movie_run-1_events.tsv").read_text(), truth))
    (data_a, events_a, truth_a), (data_b, events_b, truth_b) = runs
    assert np.array_equal(data_a, data_b) and events_a == events_b and truth_a == truth_b
    # another seed: another movie
    config = corpus.CorpusConfig(runs=1, frames=60, tr=1.0)
    other, _ = corpus.plan_movie(np.random.default_rng([8, 20]), config, frozenset(), set())
    assert [s.to_dict() for s in other] != truth_a["scenes"]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(corpus, "_simulate_subject", fail)
    with pytest.raises(RuntimeError, match="killed"):
        _build_small(tmp_path, 7)
    assert list(tmp_path.iterdir()) == []  # neither the BIDS folder, nor its temporary, nor the truth


def test_rejects_bad_corpus_arguments(tmp_path):
    toyworld = load_recipe("toyworld")
    with pytest.raises(SystemExit, match="corpus-frames"):
        toyworld.main(["--out", str(tmp_path / "x"), "--corpus-frames", "10", "--quiet"])
    assert not (tmp_path / "x").exists()
