"""data_recipes/fmri_corpus.py on the real small BOLD files shipped by nibabel and nitime, and on
simulated BIDS / HCP folders; values checked against an independent numpy computation."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest_data import load_recipe
from mindsemantix.data.shards import ShardDataset, iter_split, read_manifest


def _bundled_runs() -> dict[str, Path]:
    from nibabel.testing import data_path

    nitime_data = Path(importlib.util.find_spec("nitime").submodule_search_locations[0]) / "data"
    return {"nitime1": nitime_data / "fmri1.nii.gz", "nitime2": nitime_data / "fmri2.nii.gz",
            "functional": Path(data_path) / "functional.nii", "example4d": Path(data_path) / "example4d.nii.gz"}


def _samples(root, split):
    return {s["key"]: s for s in iter_split(ShardDataset(root), split)}


def _zscored(run: Path, mask: np.ndarray, discard: int = 0) -> np.ndarray:
    data = np.asanyarray(nib.load(str(run)).dataobj).astype(np.float64)[mask][:, discard:].T  # (T, V)
    return (data - data.mean(0)) / data.std(0)


@pytest.fixture
def bundled_bids(tmp_path) -> Path:
    runs = _bundled_runs()
    root = tmp_path / "bids"
    for label, files in {"nitime": [("run-1", runs["nitime1"]), ("run-2", runs["nitime2"])],
                         "nibabel": [("run-1", runs["functional"]), ("run-2", runs["example4d"])]}.items():
        func = root / f"sub-{label}" / "func"
        func.mkdir(parents=True)
        for run, src in files:
            shutil.copy(src, func / f"sub-{label}_task-rest_{run}_bold{''.join(src.suffixes)}")
    return root


def test_real_bundled_bold_files(bundled_bids, tmp_path):
    out = tmp_path / "shards"
    extra = load_recipe("fmri_corpus").main(["--root", str(bundled_bids), "--dataset", "bundled", "--out", str(out),
                                             "--roi", "background", "--window", "4", "--quiet"])
    manifest = read_manifest(out)
    assert set(manifest["subjects"]) == {"bundled-nitime", "bundled-nibabel"}
    # example4d has 2 frames: too short for a window, reported, not silently dropped
    assert [r["run"].endswith("run-2_bold.nii.gz") for r in extra["skipped_runs"]] == [True]
    mask = np.asanyarray(nib.load(str(out / "subjects/bundled-nitime.nii.gz")).dataobj) > 0
    assert mask.shape == (10, 10, 18) and manifest["subjects"]["bundled-nitime"]["n_voxels"] == mask.sum()

    runs = _bundled_runs()
    train, val = _samples(out, "train"), _samples(out, "val")
    # nitime runs: 40 frames each; val boundary at frame 36 -> train windows start 0..32 (9), val 36 (1)
    nitime = sorted(k for k in {**train, **val} if k.startswith("bundled-nitime-"))
    assert len(nitime) == 2 * 10
    expected = [_zscored(runs["nitime1"], mask), _zscored(runs["nitime2"], mask)]
    for key in nitime:
        s = {**train, **val}[key]
        frames = np.array(s["meta"]["trials"]) - 1  # global 0-based frame numbers over both runs
        run, first = divmod(int(frames[0]), 40)
        assert s["meta"]["run"].endswith(f"run-{run + 1}_bold.nii.gz")
        assert s["meta"]["image_id"] == -1 and s["fmri"].shape == (4, mask.sum())
        np.testing.assert_allclose(s["fmri"], expected[run][first:first + 4], atol=5e-3)
        assert s["meta"]["split"] == ("val" if first >= 36 else "train")
    # functional.nii (17 x 21 x 3, 20 frames) is a second subject with its own mask and voxel count
    assert manifest["subjects"]["bundled-nibabel"]["n_voxels"] == 17 * 21 * 3
    s = train["bundled-nibabel-000001"]
    all_voxels = np.ones((17, 21, 3), bool)
    np.testing.assert_allclose(s["fmri"], _zscored(runs["functional"], all_voxels)[4:8], atol=5e-3)


def _write_run(path: Path, data: np.ndarray, affine: np.ndarray, tr: float = 2.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_zooms((*np.abs(np.diag(affine)[:3]), tr))
    nib.save(img, str(path))


def test_simulated_bids_mask_file_average_discard(tmp_path):
    """Runs with a slab of signal; a mask file selects it; overlapping windows averaged."""
    rng = np.random.default_rng(0)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    runs = {}
    for label in ("01", "02"):
        for run in (1, 2):
            data = rng.normal(100, 5, (8, 9, 6, 30)) + np.linspace(0, 20, 30)  # a drift
            path = tmp_path / f"bids/sub-{label}/ses-a/func/sub-{label}_ses-a_task-x_run-{run}_bold.nii.gz"
            _write_run(path, data, affine)
            runs[label, run] = path
    mask = np.zeros((8, 9, 6), np.uint8)
    mask[2:5, 3:7, 1:4] = 1
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "mask.nii.gz"))

    out = tmp_path / "shards"
    extra = load_recipe("fmri_corpus").convert(tmp_path / "bids", out, "sim", roi=str(tmp_path / "mask.nii.gz"),
                                               window=6, stride=3, average=True, discard=2,
                                               val_fraction=0.25, progress=False)
    assert extra["skipped_runs"] == []
    manifest = read_manifest(out)
    assert set(manifest["subjects"]) == {"sim-01", "sim-02"}
    assert manifest["subjects"]["sim-01"]["n_voxels"] == mask.sum()
    samples = {**_samples(out, "train"), **_samples(out, "val")}
    # 28 frames after discarding 2; boundary 21: train starts 0,3,...,15 (6), val starts 21 (1)
    assert len([k for k in samples if k.startswith("sim-01-")]) == 2 * 7
    s = samples["sim-01-000008"]  # run 2, second window: frames 3..8 after the discard
    assert s["meta"]["run"].endswith("run-2_bold.nii.gz") and s["meta"]["frames"] == list(range(6, 12))
    assert s["meta"]["trials"] == [30 + 6]  # with --average: the window's first frame, counted over runs
    expected = _zscored(runs["01", 2], mask > 0, discard=2)[3:9].mean(0, keepdims=True)
    np.testing.assert_allclose(s["fmri"], expected, atol=2e-3)
    assert all(min(v["meta"]["frames"]) - 3 >= 21 for v in samples.values() if v["meta"]["split"] == "val")


def test_hcp_layout_with_mni_visual_roi(tmp_path):
    """HCP MNINonLinear runs on a coarse MNI grid; the MNI visual ROI lands in occipital cortex."""
    affine = np.array([[-6.0, 0, 0, 90], [0, 6.0, 0, -126], [0, 0, 6.0, -72], [0, 0, 0, 1]])
    rng = np.random.default_rng(1)
    for subject in ("100307", "100408"):
        run = "rfMRI_REST1_LR"
        _write_run(tmp_path / f"hcp/{subject}/MNINonLinear/Results/{run}/{run}.nii.gz",
                   rng.normal(1000, 10, (31, 37, 31, 12)), affine, tr=0.72)
        # a derivative beside the run must not be taken for a run
        _write_run(tmp_path / f"hcp/{subject}/MNINonLinear/Results/{run}/{run}_SBRef.nii.gz",
                   rng.normal(1000, 10, (31, 37, 31, 1)), affine)
    out = tmp_path / "shards"
    load_recipe("fmri_corpus").main(["--root", str(tmp_path / "hcp"), "--dataset", "hcp", "--out", str(out),
                                     "--roi", "mni-visual", "--window", "3", "--quiet"])
    manifest = read_manifest(out)
    assert set(manifest["subjects"]) == {"hcp-100307", "hcp-100408"}
    mask = nib.load(str(out / "subjects/hcp-100307.nii.gz"))
    mm = nib.affines.apply_affine(mask.affine, np.argwhere(np.asanyarray(mask.dataobj) > 0))
    assert 200 < len(mm) < 1500 and mm[:, 1].max() < -45  # posterior only
    sample = next(iter(_samples(out, "train").values()))
    assert sample["meta"]["tr"] == pytest.approx(0.72) and sample["fmri"].shape == (3, len(mm))


def test_bad_inputs(tmp_path):
    corpus = load_recipe("fmri_corpus")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no BOLD runs found"):
        corpus.main(["--root", str(tmp_path / "empty"), "--dataset", "x", "--out", str(tmp_path / "o"), "--quiet"])
    path = tmp_path / "bids/sub-01/func/sub-01_task-x_bold.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(path))
    with pytest.raises(corpus.CorpusError, match=r"sub-01_task-x_bold\.nii\.gz: a BOLD run must be 4-D"):
        corpus.convert(tmp_path / "bids", tmp_path / "o", "x", progress=False)
    with pytest.raises(corpus.CorpusError, match="--dataset"):
        corpus.convert(tmp_path / "bids", tmp_path / "o", "bad.name", progress=False)
    with pytest.raises(corpus.CorpusError, match="ROI mask file is missing"):
        _write_run(path, np.ones((4, 4, 4, 8)), np.eye(4))
        corpus.convert(tmp_path / "bids", tmp_path / "o", "x", roi=str(tmp_path / "nope.nii.gz"), progress=False)
    assert not (tmp_path / "o").exists()
