"""Stage-1 evidence tool (mindsemantix/eval/pretrain_eval.py): baselines, probes and the CLI on tiny data."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from mindsemantix.eval.baselines import fit_ridge
from mindsemantix.eval.pretrain_eval import (
    few_samples,
    fit_wiener,
    main,
    neighbour_interpolate,
    per_sample_corr,
    probe_scores,
    probe_targets,
    ridge_loo_predict,
)
from mindsemantix.models.brain_encoder import BrainEncoder, BrainEncoderConfig


def grid_coords(n: int = 10, spacing_mm: float = 2.0) -> np.ndarray:
    return (np.stack(np.nonzero(np.ones((n, n, n), bool)), axis=1) * spacing_mm).astype(np.float32)  # (n^3, 3)


def test_neighbour_interpolation_recovers_a_smooth_field_the_voxel_mean_cannot():
    rng = np.random.default_rng(0)
    coords = grid_coords()
    freqs = rng.normal(size=(3, 3)) / 8.0                                    # wavelengths of ~50 mm
    phases = rng.uniform(0, 2 * np.pi, (16, 3))
    x = np.sin(coords @ freqs.T + phases[:, None]).sum(-1).astype(np.float32)  # (16, V): one smooth field each
    mask = rng.random(x.shape) < 0.75
    interp = per_sample_corr(neighbour_interpolate(x, mask, coords, k=6), x, mask)
    voxel_mean = per_sample_corr(np.broadcast_to(x.mean(0), x.shape), x, mask)
    assert interp.mean() > 0.95
    assert interp.mean() > voxel_mean.mean() + 0.5
    kept = neighbour_interpolate(x, mask, coords)
    np.testing.assert_array_equal(kept[~mask], x[~mask])                    # visible voxels untouched


def test_dual_ridge_matches_the_primal_leave_one_out_ridge():
    rng = np.random.default_rng(1)
    x, x_test = rng.normal(size=(40, 15)), rng.normal(size=(7, 15))
    y = x @ rng.normal(size=(15, 1)) + rng.normal(size=(40, 1))
    pred, (alpha,) = ridge_loo_predict(x, y, x_test, [slice(0, 1)])
    primal = fit_ridge(x, y, alphas=tuple(10.0 ** np.arange(-3, 6)))
    assert alpha == primal.alpha
    np.testing.assert_allclose(pred, primal.predict(x_test), rtol=1e-6, atol=1e-8)


def test_probe_recovers_planted_features_and_not_noise():
    rng = np.random.default_rng(2)
    n_train, n_test, f = 300, 100, 50
    feats = rng.normal(size=(n_train + n_test, f))
    colour = (feats[:, :3] @ rng.normal(size=(3, 3))).argmax(1)              # categorical, linear in the features
    size = feats[:, 3] * 0.5 + 0.1 * rng.normal(size=len(feats))             # continuous
    names = ["colour=red", "colour=green", "colour=blue", "object0.x", "object0.present"]
    truth = np.column_stack([np.eye(3)[colour], size, np.ones(len(feats))])
    targets = probe_targets(truth, names, pattern=".")
    assert set(targets) == {"colour", "object0.x"}                           # object0.present is constant
    assert targets["colour"]["kind"] == "categorical" and targets["object0.x"]["kind"] == "continuous"
    tr = {k: v | {"y": v["y"][:n_train], "valid": v["valid"][:n_train]} for k, v in targets.items()}
    te = {k: v | {"y": v["y"][n_train:], "valid": v["valid"][n_train:]} for k, v in targets.items()}
    good = probe_scores(feats[:n_train], feats[n_train:], tr, te)
    noise = probe_scores(rng.normal(size=(n_train, f)), rng.normal(size=(n_test, f)), tr, te)
    assert good["colour"]["score"] > good["colour"]["chance"] + 0.3 and good["object0.x"]["score"] > 0.9
    assert noise["colour"]["score"] < good["colour"]["chance"] + 0.15 and noise["object0.x"]["score"] < 0.1


def test_probe_targets_skip_absent_objects_and_unset_groups():
    names = ["relation=left of", "relation=above", "count", "object1.x", "object1.present"]
    truth = np.array([[1, 0, 1, 0.0, 0], [0, 1, 2, 0.3, 1], [0, 0, 3, 0.6, 1], [1, 0, 2, 0.9, 1]], float)
    t = probe_targets(truth, names, pattern=".")
    np.testing.assert_array_equal(t["relation"]["valid"], [True, True, False, True])
    np.testing.assert_array_equal(t["object1.x"]["valid"], [False, True, True, True])
    assert t["count"]["kind"] == "categorical" and t["count"]["y"].shape == (4, 3)   # counts 1, 2, 3


@pytest.fixture
def tiny_study(tiny_dataset_factory, tmp_path):
    """A tiny shard dataset, a stage-1 export of its subjects (beside a run config.yaml naming the
    data) and a truth.hdf5 with one categorical and one continuous feature per image id."""
    data = tiny_dataset_factory(subjects={"subj01": 40, "subj02": 57}, n_images={"train": 24, "val": 6, "test": 6},
                                captions=False, image_size=None)
    from mindsemantix.data.shards import ShardDataset

    ds = ShardDataset(data)
    torch.manual_seed(0)
    enc = BrainEncoder(BrainEncoderConfig.preset("tiny", patch_size=8, distance_bias=True))
    for s, entry in ds.subjects.items():
        enc.add_subject(s, entry.coords_mm())
    run = tmp_path / "run"
    enc.save_pretrained(run / "export")
    (run / "config.yaml").write_text(f"seed_everything: 0\ndata:\n  datasets: [{data}]\n  batch_size: 4\n"
                                     "model:\n  init_args: {val_mask_seed: 7}\n")
    ids = np.arange(40)
    truth = tmp_path / "truth.hdf5"
    with h5py.File(truth, "w") as f:
        f.attrs["feature_names"] = json.dumps(["background=gray", "background=black", "object0.x"])
        f.create_dataset("features", data=np.column_stack([ids % 2 == 0, ids % 2 == 1, ids / 40]).astype(np.float32))
    return data, run / "export", truth


def test_cli_writes_json_and_table(tiny_study, tmp_path, capsys):
    data, export, truth = tiny_study
    out = tmp_path / "eval" / "pretrain_eval.json"
    assert main(["--export", str(export), "--truth", str(truth), "--out", str(out), "--targets", "."]) == 0
    result = json.loads(out.read_text())
    assert result["batch_size"] == 4 and result["mask_seed"] == 7 and result["data"] == [str(data)]  # from config.yaml
    mc = result["masked_corr"]
    assert set(mc["per_subject"]) == {"subj01", "subj02"} and mc["per_subject"]["subj01"]["n"] == 6
    for r in mc["per_subject"].values():
        assert all(np.isfinite(r[p]) for p in ("pretrained", "random_init", "voxel_mean", "neighbour_interp"))
    probe = result["probe"]["overall_mean_of_subjects"]
    assert set(probe) == {"background", "object0.x"} and probe["background"]["metric"] == "accuracy"
    cols = ("pretrained_mean", "random_init_mean", "pretrained_all", "random_init_all", "raw_voxels")
    assert all(np.isfinite(probe["object0.x"][f]) for f in cols)
    assert "| neighbour_interp |" in out.with_suffix(".md").read_text().replace(" | **", " |")
    assert "mean of subjects" in capsys.readouterr().out


def test_probe_train_size_fits_on_a_seeded_subset(tiny_study, tmp_path):
    data, export, truth = tiny_study
    outs = []
    for name in ("a", "b"):
        outs.append(tmp_path / f"{name}.json")
        assert main(["--export", str(export), "--truth", str(truth), "--out", str(outs[-1]), "--targets", ".",
                     "--probe-train-size", "10", "--no-wiener"]) == 0
    full = tmp_path / "full.json"
    assert main(["--export", str(export), "--truth", str(truth), "--out", str(full), "--targets", ".", "--no-wiener"]) == 0
    a, b, f = (json.loads(p.read_text())["probe"] for p in (*outs, full))
    assert a["train_size"] == 10 and f["train_size"] is None
    assert a["per_subject"] == b["per_subject"]                 # seeded: the same subset twice
    assert a["per_subject"] != f["per_subject"]                 # and not the whole split
    assert "10 samples per subject" in outs[0].with_suffix(".md").read_text()
    sub = few_samples({"x": np.arange(20)[:, None], "image_id": np.arange(20)}, 5, seed=0)
    assert len(sub["x"]) == 5 and np.all(np.diff(sub["image_id"]) > 0) and np.array_equal(sub["x"][:, 0], sub["image_id"])
    with pytest.raises(ValueError, match="only 20 samples"):
        few_samples({"image_id": np.arange(20)}, 21, seed=0)


def test_cli_errors_clearly_on_missing_inputs(tiny_study, tmp_path, capsys):
    data, export, truth = tiny_study
    out = tmp_path / "e.json"
    assert main(["--export", str(tmp_path / "nowhere"), "--data", str(data), "--out", str(out)]) == 2
    assert "no stage-1 export" in capsys.readouterr().err
    assert main(["--export", str(export), "--data", str(tmp_path / "nodata"), "--out", str(out)]) == 2
    assert "manifest.json missing" in capsys.readouterr().err
    assert main(["--export", str(export), "--truth", str(tmp_path / "no.hdf5"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()


def test_distance_bias_is_optional_and_round_trips(tmp_path):
    """Stage 1's distance-biased attention: an export without the field (older runs) still loads;
    one with it restores the learned per-head widths."""
    coords = grid_coords(5)
    plain = BrainEncoder(BrainEncoderConfig.preset("tiny", patch_size=8))
    plain.add_subject("s1", coords)
    assert not any("log_k" in k for k in plain.state_dict())
    biased = BrainEncoder(BrainEncoderConfig.preset("tiny", patch_size=8, distance_bias=True))
    biased.add_subject("s1", coords)
    with torch.no_grad():
        biased.blocks[0].attn.log_k.add_(1.0)
    biased.save_pretrained(tmp_path / "e")
    again = BrainEncoder.from_pretrained(tmp_path / "e")
    x = torch.randn(3, len(coords))
    torch.testing.assert_close(again.forward_features(x, "s1"), biased.forward_features(x, "s1"))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(again.forward_mae(x, "s1", generator=g()).pred, biased.forward_mae(x, "s1", generator=g()).pred)


def test_wiener_reference_recovers_low_rank_structure_that_neighbours_miss():
    rng = np.random.default_rng(3)
    coords = grid_coords(6)                                                  # 216 voxels
    loadings = rng.normal(size=(4, len(coords)))                             # spatially *unstructured*
    x = (rng.normal(size=(300, 4)) @ loadings + 0.1 * rng.normal(size=(300, len(coords)))).astype(np.float32)
    voxel_patch = np.arange(len(coords)) // 8
    wiener = fit_wiener(x[:250], voxel_patch, mask_ratio=0.75, n_holdout=50)
    test = x[250:]
    mask = np.stack([np.isin(voxel_patch, rng.permutation(27)[:20]) for _ in test])
    assert per_sample_corr(wiener(test, mask), test, mask).mean() > 0.9
    assert per_sample_corr(neighbour_interpolate(test, mask, coords), test, mask).mean() < 0.3
