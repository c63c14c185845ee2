"""data_recipes/nsd.py: simulated NSD tree -> shards, checked against an independent computation
straight from the release files; splits, leakage, betas variants, bad inputs, interruption."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from conftest_data import copy_tree, load_recipe, toyworld_shards, toyworld_tree  # noqa: F401  (fixtures)
from mindsemantix.data.nsd import NSDError, NSDLayout
from mindsemantix.data.shards import ShardDataset, iter_split, read_manifest


def _samples(root, split, fields=("fmri", "meta")):
    return {s["key"]: s for s in iter_split(ShardDataset(root), split, fields)}


def _expected_zscored(tree, subject: int) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """Independent reference: (T, V) z-scored ROI betas, (T,) 0-based nsdIds, shared ids — from
    scipy / nibabel / numpy directly, not through the recipe's readers."""
    root = tree
    mat = scipy.io.loadmat(str(root / "nsddata/experiments/nsd/nsd_expdesign.mat"))
    order = mat["masterordering"].ravel().astype(int)
    subjectim = mat["subjectim"].astype(int)
    shared = set((mat["sharedix"].ravel().astype(int) - 1).tolist())
    roi_path = root / f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi/nsdgeneral.nii.gz"
    roi = np.asanyarray(nib.load(str(roi_path)).dataobj)
    folder = root / f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    blocks, ids = [], []
    for session in range(1, 41):
        path = folder / f"betas_session{session:02d}.nii.gz"
        if not path.exists():
            break
        betas = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float64)[roi == 1].T / 300  # (750, V)
        trials = np.arange((session - 1) * 750, session * 750)
        nsd = subjectim[subject - 1, order[trials] - 1] - 1
        train = np.array([i not in shared for i in nsd])
        blocks.append((betas - betas[train].mean(0)) / betas[train].std(0))
        ids.append(nsd)
    return np.concatenate(blocks), np.concatenate(ids), shared


def test_shards_match_independent_computation(toyworld_tree, toyworld_shards):
    manifest = read_manifest(toyworld_shards)
    for subject in (1, 2):
        roi = np.asanyarray(nib.load(str(NSDLayout(toyworld_tree).roi(subject))).dataobj)
        assert manifest["subjects"][f"subj{subject:02d}"]["n_voxels"] == int((roi == 1).sum())
        # the shard mask reproduces the voxel order: C-order nonzero of nsdgeneral == 1
        mask = np.asanyarray(nib.load(str(toyworld_shards / f"subjects/subj{subject:02d}.nii.gz")).dataobj)
        assert np.array_equal(np.argwhere(mask > 0), np.argwhere(roi == 1))

    expected, ids, shared = _expected_zscored(toyworld_tree, 1)
    samples = {k: v for split in ("train", "val", "test") for k, v in _samples(toyworld_shards, split).items()}
    checked = 0
    for nsd_id in [int(ids[0]), int(ids[100]), int(ids[1200]), sorted(shared)[3]]:
        sample = samples[f"subj01-{nsd_id:06d}"]
        trials = np.flatnonzero(ids == nsd_id)  # 0-based, in trial order
        assert sample["meta"]["trials"] == [int(t) + 1 for t in trials]
        assert sample["meta"]["sessions"] == [int(t) // 750 + 1 for t in trials]
        assert sample["meta"]["split"] == ("test" if nsd_id in shared else sample["meta"]["split"])
        np.testing.assert_allclose(sample["fmri"], expected[trials], atol=2e-3 * np.abs(expected[trials]).max() + 1e-3)
        checked += 1
    assert checked == 4
    # every trial of every completed session is in exactly one sample
    n_rows = sum(s["fmri"].shape[0] for k, s in samples.items() if k.startswith("subj01-"))
    assert n_rows == 2 * 750
    n_rows_subj02 = sum(s["fmri"].shape[0] for k, s in samples.items() if k.startswith("subj02-"))
    assert n_rows_subj02 == 750  # subj02 completed one session


def test_splits_test_is_shared_and_disjoint(toyworld_tree, toyworld_shards):
    mat = scipy.io.loadmat(str(toyworld_tree / "nsddata/experiments/nsd/nsd_expdesign.mat"))
    shared = set((mat["sharedix"].ravel().astype(int) - 1).tolist())
    ids = {split: {s["meta"]["image_id"] for s in _samples(toyworld_shards, split).values()}
           for split in ("train", "val", "test")}
    assert ids["test"] <= shared and len(ids["test"]) == len(shared)
    assert not (ids["train"] | ids["val"]) & shared
    assert not ids["train"] & ids["val"]
    n_val, n_train = len(ids["val"]), len(ids["train"])
    assert 0.05 < n_val / (n_val + n_train) < 0.15  # --val-fraction 0.1
    # images and captions are the stimulus and its COCO captions
    sample = next(iter(_samples(toyworld_shards, "test", ("meta", "captions", "image")).values()))
    with h5py.File(toyworld_tree / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "r") as f:
        assert np.array_equal(sample["image"], f["imgBrick"][sample["meta"]["image_id"]])
    annotations = [a for split in ("train2017", "val2017") for a in json.loads(
        (NSDLayout(toyworld_tree).annotations / f"captions_{split}.json").read_text())["annotations"]]
    expected = [a["caption"] for a in annotations if a["image_id"] == sample["meta"]["coco_id"]]
    assert sample["captions"] == expected and len(expected) == 5


def test_normalisation_never_sees_test_trials(toyworld_tree, toyworld_shards, tmp_path):
    """Changing the betas of test trials changes the test samples only."""
    tree = copy_tree(toyworld_tree, tmp_path / "tree")
    mat = scipy.io.loadmat(str(tree / "nsddata/experiments/nsd/nsd_expdesign.mat"))
    order, subjectim = mat["masterordering"].ravel().astype(int), mat["subjectim"].astype(int)
    shared = set((mat["sharedix"].ravel().astype(int) - 1).tolist())
    path = NSDLayout(tree).betas(1, 1)
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).copy()
    test_trials = [t for t in range(750) if subjectim[0, order[t] - 1] - 1 in shared]
    data[..., test_trials] = np.clip(data[..., test_trials].astype(np.int32) * 5 + 3000, -32768, 32767)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    for p in tree.glob("nsddata_betas/ppdata/*/func1pt8mm/*/*.hdf5"):
        p.unlink()  # convert from the modified .nii.gz only

    out = tmp_path / "shards"
    load_recipe("nsd").main(["--nsd-root", str(tree), "--out", str(out), "--subjects", "1", "--quiet", "--no-images"])
    for split in ("train", "val"):
        before, after = _samples(toyworld_shards, split), _samples(out, split)
        keys = [k for k in after if k.startswith("subj01-")]
        assert keys and set(keys) == {k for k in before if k.startswith("subj01-")}
        for k in keys:
            assert np.array_equal(before[k]["fmri"], after[k]["fmri"])
    before, after = _samples(toyworld_shards, "test"), _samples(out, "test")
    changed = [k for k in after if not np.array_equal(before[k]["fmri"], after[k]["fmri"])]
    assert len(changed) > 30


def test_hdf5_variant_gives_the_same_shards(toyworld_tree, toyworld_shards, tmp_path):
    out = tmp_path / "from_hdf5"
    load_recipe("nsd").main(["--nsd-root", str(toyworld_tree), "--out", str(out), "--betas-format", "hdf5",
                             "--no-images", "--no-captions", "--quiet"])
    for split in ("train", "test"):
        a, b = _samples(toyworld_shards, split), _samples(out, split)
        assert a.keys() == b.keys()
        for k in list(a)[:50]:
            assert np.array_equal(a[k]["fmri"], b[k]["fmri"])


def test_image_resize_and_subject_selection(toyworld_tree, tmp_path):
    out = tmp_path / "small"
    load_recipe("nsd").main(["--nsd-root", str(toyworld_tree), "--out", str(out), "--subjects", "2",
                             "--image-size", "32", "--subject-prefix", "toy-", "--quiet"])
    manifest = read_manifest(out)
    assert list(manifest["subjects"]) == ["toy-subj02"] and manifest["image_size"] == 32
    sample = next(iter(_samples(out, "train", ("meta", "image")).values()))
    assert sample["image"].shape == (32, 32, 3) and sample["key"].startswith("toy-subj02-")


# -- bad inputs ------------------------------------------------------------------------------


def _convert(tree, out, *extra):
    return load_recipe("nsd").convert(tree, out, progress=False, **dict(extra))


def test_gap_in_sessions_is_an_error(toyworld_tree, tmp_path):
    tree = copy_tree(toyworld_tree, tmp_path / "tree")
    for ext in ("nii.gz", "hdf5"):
        NSDLayout(tree).betas(1, 1, ext).unlink()
    with pytest.raises(NSDError, match=r"session\(s\) \[1\] missing before session 2"):
        _convert(tree, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mask_betas_shape_mismatch(toyworld_tree, tmp_path):
    tree = copy_tree(toyworld_tree, tmp_path / "tree")
    roi_path = NSDLayout(tree).roi(2)
    roi = nib.load(str(roi_path))
    nib.save(nib.Nifti1Image(np.asanyarray(roi.dataobj)[:-1], roi.affine), str(roi_path))
    with pytest.raises(NSDError, match=r"betas_session01\.hdf5: betas have shape"):
        _convert(tree, tmp_path / "out")
    with pytest.raises(NSDError, match=r"betas_session01\.nii\.gz: betas have shape .* the ROI"):
        _convert(tree, tmp_path / "out", ("betas_format", "nii.gz"))


def test_unknown_coco_id(toyworld_tree, tmp_path):
    tree = copy_tree(toyworld_tree, tmp_path / "tree")
    path = NSDLayout(tree).annotations / "captions_train2017.json"
    data = json.loads(path.read_text())
    dropped = data["annotations"][0]["image_id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != dropped]
    path.write_text(json.dumps(data))
    with pytest.raises(NSDError, match=rf"unknown cocoId \[{dropped}\]"):
        _convert(tree, tmp_path / "out")
    _convert(tree, tmp_path / "out", ("with_captions", False))  # fine without captions
    assert (tmp_path / "out/manifest.json").exists()


def test_missing_and_inconsistent_design(toyworld_tree, tmp_path):
    tree = copy_tree(toyworld_tree, tmp_path / "tree")
    layout = NSDLayout(tree)
    # a stim-info CSV whose trial numbers disagree with the design
    with open(layout.stim_info, newline="") as f:
        rows = list(csv.reader(f))
    col = rows[0].index("subject1_rep0")
    for row in rows[1:]:
        if row[col] != "0":
            row[col] = str(int(row[col]) + 1)
    with open(layout.stim_info, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(NSDError, match="subject1_rep0..2 disagree with"):
        _convert(tree, tmp_path / "out")
    layout.expdesign.unlink()
    with pytest.raises(SystemExit, match="nsd_expdesign.mat: experimental design file is missing"):
        load_recipe("nsd").main(["--nsd-root", str(tree), "--out", str(tmp_path / "out"), "--quiet"])
    with pytest.raises(SystemExit, match="does not exist"):
        load_recipe("nsd").main(["--nsd-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])


def test_interrupted_run_leaves_nothing_that_reads_as_complete(toyworld_tree, toyworld_shards, tmp_path, monkeypatch):
    nsd = load_recipe("nsd")
    out = tmp_path / "out"
    shutil.copytree(toyworld_shards, out)  # an earlier complete dataset stays intact
    before = (out / "manifest.json").read_text()
    calls = {"n": 0}
    real = nsd.read_session_betas

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real(*args, **kwargs)

    monkeypatch.setattr(nsd, "read_session_betas", failing)
    with pytest.raises(KeyboardInterrupt):
        nsd.convert(toyworld_tree, out, progress=False)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half dataset, no scratch left
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(nsd, "read_session_betas", failing)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        nsd.convert(toyworld_tree, fresh, progress=False)
    assert not fresh.exists()
