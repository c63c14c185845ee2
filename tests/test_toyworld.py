"""The simulated study: NSD release layout, design, stimuli, captions, brains, noise, determinism."""

from __future__ import annotations

import csv
import json
import re

import h5py
import nibabel as nib
import numpy as np
import pytest
import scipy.io

from conftest_data import build_toyworld, load_recipe, toyworld_tree  # noqa: F401  (fixture)
from mindsemantix.data.nsd import NSDLayout
from mindsemantix.simulate import brain
from mindsemantix.simulate.captions import (COLOUR_WORDS, SHAPE_WORDS, canonical_caption, describe,
                                            vocabulary)
from mindsemantix.simulate.scenes import COLOURS, Scene, choose_held_out_pairs, render_scene, sample_scene

N_SUBJECTS, SESSIONS, SHARED, REPS = 2, 2, 40, 3
IMAGES_PER_SUBJECT = SESSIONS * 750 // REPS


def _truth(tree):
    return json.loads((tree / "toyworld_truth/truth.json").read_text())


def test_release_layout_files_and_formats(toyworld_tree):
    layout = NSDLayout(toyworld_tree)
    mat = scipy.io.loadmat(str(layout.expdesign))
    assert mat["masterordering"].shape == (1, SESSIONS * 750)
    assert mat["subjectim"].shape == (N_SUBJECTS, IMAGES_PER_SUBJECT)
    assert mat["sharedix"].shape == (1, SHARED)
    assert mat["basiccnt"].shape == (3, SESSIONS) and mat["stimpattern"].shape == (SESSIONS, 12, 75)
    order = mat["masterordering"].ravel().astype(int)
    # every image of a subject exactly REPS times, 1-based, never twice in a row
    assert np.array_equal(np.bincount(order)[1:], np.full(IMAGES_PER_SUBJECT, REPS))
    assert (np.diff(order) != 0).all()
    subjectim, sharedix = mat["subjectim"].astype(int), mat["sharedix"].ravel().astype(int)
    assert subjectim.min() >= 1 and sharedix.min() >= 1  # 73k ids are 1-based in the .mat
    assert (subjectim[:, :SHARED] == sharedix).all()  # shared images first, as in NSD
    own = [set(subjectim[s, SHARED:]) for s in range(N_SUBJECTS)]
    assert not own[0] & own[1] and not (own[0] | own[1]) & set(sharedix)

    with open(layout.stim_info, newline="") as f:
        header = next(csv.reader(f))
    assert header[:9] == ["", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000"]
    assert header[9:11] == ["subject1", "subject2"]
    assert header[11:] == [f"subject{s}_rep{r}" for s in (1, 2) for r in range(3)]

    with h5py.File(layout.stimuli, "r") as f:
        brick = f["imgBrick"]
        assert brick.dtype == np.uint8 and brick.shape == (SHARED + 2 * (IMAGES_PER_SUBJECT - SHARED), 64, 64, 3)

    shapes = []
    for subject in (1, 2):
        roi = nib.load(str(layout.roi(subject)))
        labels = np.asanyarray(roi.dataobj)
        assert set(np.unique(labels)) == {-1, 0, 1}
        betas = nib.load(str(layout.betas(subject, 1)))
        assert betas.get_data_dtype() == np.int16 and betas.shape == (*labels.shape, 750)
        assert np.allclose(betas.affine, roi.affine)
        data = np.asanyarray(betas.dataobj)
        assert (data[labels == -1] == 0).all()  # outside the brain: zeroed like the release
        assert (data[labels == 1] != 0).mean() > 0.99
        with h5py.File(layout.betas(subject, 1, "hdf5"), "r") as f:  # MATLAB order seen by h5py
            assert np.array_equal(f["betas"][:], data.transpose(3, 2, 1, 0))
        shapes.append((labels.shape, int((labels == 1).sum())))
    assert shapes[0] != shapes[1]  # subjects differ in grid and voxel count
    # subj02 misses the last session (trailing sessions absent, as in the release)
    assert layout.betas(2, 2).exists() is False and layout.betas(1, 2).exists()

    caption_files = sorted(p.name for p in layout.annotations.glob("captions_*.json"))
    assert caption_files == ["captions_train2017.json", "captions_val2017.json"]


def test_stim_info_agrees_with_design(toyworld_tree):
    """subjectK_repN holds the 1-based trials on which the design shows each image."""
    layout = NSDLayout(toyworld_tree)
    mat = scipy.io.loadmat(str(layout.expdesign))
    order, subjectim = mat["masterordering"].ravel().astype(int), mat["subjectim"].astype(int)
    with open(layout.stim_info, newline="") as f:
        rows = list(csv.DictReader(f))
    for subject, n_sessions in ((1, 2), (2, 1)):
        trials = np.arange(1, n_sessions * 750 + 1)
        nsd_ids = subjectim[subject - 1, order[trials - 1] - 1] - 1
        for t, i in zip(trials[::37], nsd_ids[::37]):
            row = rows[i]
            assert int(row["nsdId"]) == i
            assert t in {int(row[f"subject{subject}_rep{r}"]) for r in range(3)}
            assert row[f"subject{subject}"] == "1"


def test_test_images_are_novel_and_never_trained(toyworld_tree):
    truth = _truth(toyworld_tree)
    held_out = {tuple(p) for p in truth["held_out_pairs"]}
    assert len(held_out) == 6
    shared = [im for im in truth["images"] if im["shared"]]
    others = [im for im in truth["images"] if not im["shared"]]
    assert len(shared) == SHARED
    pairs = lambda im: {(o["shape"], o["colour"]) for o in im["scene"]["objects"]}  # noqa: E731
    assert not any(pairs(im) & held_out for im in others)  # no training/val scene has them
    novel = [im for im in shared if pairs(im) & held_out]
    assert len(novel) == SHARED // 2 and all(im["novel"] for im in novel)


def test_captions_five_distinct_and_grounded(toyworld_tree):
    truth = _truth(toyworld_tree)
    layout = NSDLayout(toyworld_tree)
    by_coco: dict[int, list[str]] = {}
    for path in layout.annotations.glob("captions_*.json"):
        for a in json.loads(path.read_text())["annotations"]:
            by_coco.setdefault(a["image_id"], []).append(a["caption"])
    vocab = set(vocabulary())
    for im in truth["images"][:200]:
        caps = by_coco[im["coco_id"]]
        assert len(caps) == 5 and len(set(caps)) == 5
        for caption in caps:
            words = re.findall(r"[a-z]+", caption.lower())
            assert set(words) <= vocab
            for o in im["scene"]["objects"]:  # every caption names each object's colour and shape
                assert any(w in caption.lower() for w in COLOUR_WORDS[o["colour"]])
                nouns = [w for pair in SHAPE_WORDS[o["shape"]] for w in pair]
                assert any(re.search(rf"\b{n}\b", caption.lower()) for n in nouns)


def test_scene_roundtrip_render_and_grammar():
    rng = np.random.default_rng(0)
    held_out = choose_held_out_pairs(rng)
    scene = sample_scene(rng, held_out)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    image = render_scene(scene, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render_scene(scene, 64))  # a pure function of the scene
    o = scene.objects[0]
    if o.shape in ("circle", "square", "heart"):  # solid at the centre
        centre = image[int(o.y * 64), int(o.x * 64)].astype(int)
        assert np.abs(centre - COLOURS[o.colour]).max() < 30
    caps = describe(scene, np.random.default_rng(1), 5)
    assert len(set(caps)) == 5
    assert canonical_caption(scene) == canonical_caption(Scene.from_dict(scene.to_dict()))
    novel = [sample_scene(rng, held_out, novel=True) for _ in range(30)]
    assert all(s.shape_colour_pairs() & held_out for s in novel)


def test_noise_ceiling_realistic_and_recomputable(toyworld_tree):
    """The ncsnr recorded by the simulator matches an independent computation from the betas
    files (as NSD defines it), and lies in NSD's nsdgeneral range."""
    layout = NSDLayout(toyworld_tree)
    mat = scipy.io.loadmat(str(layout.expdesign))
    order, subjectim = mat["masterordering"].ravel().astype(int), mat["subjectim"].astype(int)
    labels = np.asanyarray(nib.load(str(layout.roi(1))).dataobj)
    sessions = []
    for s in (1, 2):
        b = np.asanyarray(nib.load(str(layout.betas(1, s))).dataobj)[labels == 1].T / 300.0  # (750, V)
        sessions.append((b - b.mean(0)) / b.std(0))
    z = np.concatenate(sessions)
    images = subjectim[0, order - 1]
    variances = [z[images == i].var(0, ddof=1) for i in np.unique(images)]
    noise_var = np.mean(variances, 0)
    ncsnr = np.sqrt(np.clip(1 - noise_var, 0, None)) / np.sqrt(noise_var)
    with h5py.File(toyworld_tree / "toyworld_truth/truth.hdf5", "r") as f:
        recorded = f["subjects/subj01/ncsnr"][:]
    np.testing.assert_allclose(recorded, ncsnr, atol=1e-3)
    assert 0.2 < np.median(ncsnr) < 0.5


def test_voxel_code_is_nonlinear_and_subject_specific(toyworld_tree):
    """A linear map from the scene description leaves much of the noise-free response unexplained,
    a nonlinear one explains more; the two subjects' codes differ."""
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.linear_model import Ridge

    with h5py.File(toyworld_tree / "toyworld_truth/truth.hdf5", "r") as f:
        features = f["features"][:]
        ids = f["subjects/subj01/nsd_ids"][:]
        signal = f["subjects/subj01/signal"][:].astype(np.float64)
        rf = [f[f"subjects/subj0{s}/rf_xy"][:] for s in (1, 2)]
    x = features[ids]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    train, test = slice(0, 400), slice(400, None)

    def r2(model):
        pred = model.fit(x[train], signal[train]).predict(x[test])
        return np.median(1 - ((signal[test] - pred) ** 2).sum(0) / ((signal[test] - signal[test].mean(0)) ** 2).sum(0))

    linear, kernel = r2(Ridge(alpha=1.0)), r2(KernelRidge(alpha=0.1, kernel="rbf", gamma=0.01))
    assert linear < 0.8
    assert kernel > linear + 0.05
    assert len(rf[0]) != len(rf[1])
    # retinotopy spans the visual field (both hemifields, upper and lower)
    assert rf[0][:, 0].min() < 0.3 and rf[0][:, 0].max() > 0.7
    assert rf[0][:, 1].min() < 0.3 and rf[0][:, 1].max() > 0.7


def test_deterministic_by_seed(tmp_path):
    # the corpus's own determinism is tested in test_toy_corpus.py; --corpus-subjects 0 writes none
    args = ["--subjects", "1", "--sessions", "1", "--shared-images", "20", "--voxel-size", "9",
            "--corpus-subjects", "0", "--quiet"]
    a = build_toyworld(tmp_path, ["--seed", "5", *args])
    b = build_toyworld(tmp_path, ["--seed", "5", *args, "--betas-format", "nii.gz"])  # same content
    c = build_toyworld(tmp_path, ["--seed", "6", *args])
    assert (a / "toyworld_truth/truth.json").read_text() == (b / "toyworld_truth/truth.json").read_text()
    load = lambda root: np.asanyarray(nib.load(str(NSDLayout(root).betas(1, 1))).dataobj)  # noqa: E731
    assert np.array_equal(load(a), load(b))
    assert (a / "toyworld_truth/truth.json").read_text() != (c / "toyworld_truth/truth.json").read_text()
    assert not (a / "corpus_bids").exists() and not (a / "toyworld_truth/corpus.json").exists()


def test_rejects_bad_arguments(tmp_path):
    toyworld = load_recipe("toyworld")
    with pytest.raises(SystemExit, match="reps"):
        toyworld.main(["--out", str(tmp_path / "x"), "--reps", "4", "--quiet"])
    with pytest.raises(SystemExit, match="shared-images"):
        toyworld.main(["--out", str(tmp_path / "x"), "--sessions", "1", "--shared-images", "250", "--quiet"])
    assert not (tmp_path / "x").exists()


def test_mni_visual_roi_is_occipital():
    img = brain.mni_visual_roi()
    ijk = np.argwhere(np.asanyarray(img.dataobj) > 0)
    mm = nib.affines.apply_affine(img.affine, ijk)
    assert 10_000 < len(ijk) < 25_000  # 2 mm voxels: ~100 cm^3 of occipito-temporal grey matter
    assert mm[:, 1].max() < -48 and mm[:, 1].min() < -95
    assert (mm[:, 0] < 0).mean() == pytest.approx(0.5, abs=0.1)  # both hemispheres
