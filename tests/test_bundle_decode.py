"""A trained run as one bundle: save -> copy elsewhere -> delete the run -> load gives the run's own
captions and images bitwise; `mindsemantix decode` on a NIfTI session equals decode on the .npy of
the same volumes; bad inputs get one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import write_tiny_exports
from mindsemantix.cli import main as cli_main
from mindsemantix.data.datamodule import BrainDataModule
from mindsemantix.models.diffusion import load_png
from mindsemantix.pipeline import BundleError, MindSemantixPipeline
from mindsemantix.stages.align import BrainAlign
from mindsemantix.stages.reconstruct import BrainReconstruct
from mindsemantix.writers import ReconstructionWriter

SAMPLING = {"num_inference_steps": 2, "strength": 0.5, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """runs/r/{align,reconstruct}/export over a tiny dataset, a tiny stage-1 encoder, a random tiny
    LLM and a tiny SD; plus the stage-3 predict outputs (full reconstructions) of the test split."""
    from conftest import make_tiny_dataset

    mp = pytest.MonkeyPatch()
    mp.setenv("MINDSEMANTIX_BF16", "0")  # the trainer below runs in fp32: the pipeline must too
    root = tmp_path_factory.mktemp("bundle")
    data = make_tiny_dataset(root / "data", n_images={"train": 10, "val": 3, "test": 4}, image_size=16)
    dm = BrainDataModule(str(data), batch_size=4, eval_batch_size=4, fields=["captions", "image"])
    dm.setup()
    parts = write_tiny_exports(root, data, align=False)                # stage 1, tokenizer, SD
    runs = root / "runs" / "r"
    align = BrainAlign(brain_encoder=parts["stage1"], phase="generative", llm="random:tiny", qformer=parts["qformer"], generation={"max_new_tokens": 4, "rerank": 2},
                       lora={"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]})
    with torch.no_grad():  # "trained" adapters: a bundle that lost them would caption differently
        for name, p in align.captioner.bridge.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    align.save_export(runs / "align" / "export")
    # stage 2's predict: captions of the test split
    captioner = BrainAlign.from_export(runs / "align" / "export")
    rows = []
    for batch in dm.test_dataloader():
        rows += [{"key": k, "caption": c} for k, c in zip(batch["key"], captioner.caption(batch["fmri"], batch["subject"]))]
    (runs / "align" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    recon = BrainReconstruct(align_export=str(runs / "align" / "export"), diffusion=parts["sd"],
                             captions=str(runs / "align" / "captions.jsonl"), sampling=SAMPLING, n_candidates=2,
                             head={"hidden": 32, "token_dim": 8}, variants=["full"], score=False,
                             predict_dir=str(runs / "reconstruct" / "predict"))
    recon.export(runs / "reconstruct" / "export")
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(runs / "reconstruct"), callbacks=[ReconstructionWriter()]).predict(
        BrainReconstruct.from_export(runs / "reconstruct" / "export", captions=str(runs / "align" / "captions.jsonl"),
                                     variants=["full"], score=False, predict_dir=str(runs / "reconstruct" / "predict")),
        datamodule=BrainDataModule(str(data), batch_size=4, eval_batch_size=4, fields=["captions", "image"]))
    test = {}
    for batch in dm.test_dataloader():
        for k, x in zip(batch["key"], batch["fmri"]):
            test[k] = (batch["subject"], x)
    yield {"root": root, "data": data, "run": runs, "captions": {r["key"]: r["caption"] for r in rows}, "test": test}
    mp.undo()


def test_bundle_round_trip_matches_the_run_bitwise(run, tmp_path, monkeypatch):
    monkeypatch.setenv("MINDSEMANTIX_BF16", "0")
    assert cli_main(["bundle", "--run", str(run["run"]), "--out", str(tmp_path / "b"), "--data", str(run["data"])]) == 0
    bundle = tmp_path / "b"
    assert {"model_index.json", "README.md", "captioner", "latent_head", "diffusion", "subjects"} <= {p.name for p in bundle.iterdir()}
    # no absolute path in any text file of the bundle
    for p in bundle.rglob("*"):
        if p.suffix in (".json", ".md", ".txt", ".yaml"):
            assert str(tmp_path) not in p.read_text() and str(run["root"]) not in p.read_text(), p
    card = (bundle / "README.md").read_text()
    assert "subj01, subj02" in card and "mindsemantix decode" in card
    # copy it elsewhere, delete the run and everything it read
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(bundle, moved)
    shutil.rmtree(bundle)
    kept = {k: (v, run["captions"][k], load_png(run["run"] / "reconstruct" / "predict" / "full" / f"{k}.png"))
            for k, v in run["test"].items()}
    backup = run["root"].parent / (run["root"].name + "-moved-away")
    shutil.move(run["root"], backup)
    try:
        pipe = MindSemantixPipeline.from_pretrained(moved, local_files_only=True)
        for subject in ("subj01", "subj02"):
            keys = sorted(k for k, ((s, _), _, _) in kept.items() if s == subject)
            x = torch.stack([kept[k][0][1] for k in keys])
            out = pipe(x, subject, keys=keys, batch_size=4)
            assert out.captions == [kept[k][1] for k in keys]
            for k, image in zip(keys, out.images):
                assert torch.equal(torch.from_numpy(np.asarray(image)).permute(2, 0, 1), kept[k][2]), k
    finally:
        shutil.move(backup, run["root"])


def _write_session(folder: Path, data: Path, subject: str, n_trials: int, seed: int = 0):
    """A 4-D NIfTI session in the subject's mask space and the .npy of its ROI volumes."""
    mask = nib.load(str(data / "subjects" / f"{subject}.nii.gz"))
    roi = np.asarray(mask.dataobj) == 1
    rng = np.random.default_rng(seed)
    vol = np.zeros((*mask.shape, n_trials), np.int16)
    vol[roi] = rng.integers(-600, 600, size=(int(roi.sum()), n_trials))
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, mask.affine), str(folder / "betas_session01.nii.gz"))
    np.save(folder / "session01.npy", vol[roi].T)  # (trials, V) in the mask's C order
    return folder / "betas_session01.nii.gz", folder / "session01.npy", mask


def test_decode_nifti_equals_npy_and_bad_inputs_fail_in_one_line(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINDSEMANTIX_BF16", "0")
    bundle = tmp_path / "b"
    MindSemantixPipeline.from_run(run["run"], data=run["data"], load_diffusion=False).save_pretrained(bundle)
    nii, npy, mask = _write_session(tmp_path / "scan", run["data"], "subj01", n_trials=6)
    base = ["decode", "--model", str(bundle), "--subject", "subj01"]
    assert cli_main(base + ["--betas", str(nii), "--out", str(tmp_path / "o1"), "--trials", "1-3"]) == 0
    assert cli_main(base + ["--betas", str(npy), "--out", str(tmp_path / "o2"), "--trials", "1-3", "--no-images"]) == 0
    rows1 = [json.loads(line) for line in (tmp_path / "o1" / "captions.jsonl").read_text().splitlines()]
    rows2 = [json.loads(line) for line in (tmp_path / "o2" / "captions.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in rows1] == [1, 2, 3] and rows1 == rows2
    assert sorted(p.name for p in (tmp_path / "o1" / "images").iterdir()) == [f"subj01-trial00000{i}.png" for i in (1, 2, 3)]
    assert (tmp_path / "o1" / "grid.png").is_file() and not (tmp_path / "o2" / "images").exists()
    # averaging repetitions by image id: one row per image, the mean of its trials
    (tmp_path / "ids.csv").write_text("trial,image_id\n1,7\n2,8\n3,7\n4,9\n5,8\n6,7\n")
    assert cli_main(base + ["--betas", str(npy), "--out", str(tmp_path / "o3"), "--no-images",
                            "--average-by", str(tmp_path / "ids.csv")]) == 0
    rows3 = [json.loads(line) for line in (tmp_path / "o3" / "captions.jsonl").read_text().splitlines()]
    assert [(r["image_id"], r["trials"]) for r in rows3] == [(7, [1, 3, 6]), (8, [2, 5]), (9, [4])]
    capsys.readouterr()

    def fails(args, message):
        assert cli_main(base[:3] + args + ["--out", str(tmp_path / "bad")]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err

    fails(["--subject", "subj09", "--betas", str(npy)], "'subj09' is not in")
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 11, 3), np.int16), mask.affine), str(wrong))
    fails(["--subject", "subj01", "--betas", str(wrong)], "expected a 4-D volume of shape (8, 9, 10)")
    other = np.asarray(nib.load(str(run["data"] / "subjects" / "subj02.nii.gz")).dataobj)
    nib.save(nib.Nifti1Image(other, mask.affine), str(tmp_path / "other_mask.nii.gz"))
    fails(["--subject", "subj01", "--betas", str(nii), "--mask", str(tmp_path / "other_mask.nii.gz")], "mask mismatch")
    nan = np.load(npy).astype(np.float32)
    nan[2, 5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    fails(["--subject", "subj01", "--betas", str(tmp_path / "nan.npy")], "NaN/inf")
    assert not (tmp_path / "bad").exists()  # nothing written on failure


def test_decode_nsd_sessions_by_design_keeps_the_held_out_images(run, tmp_path, monkeypatch):
    """A folder of NSD session files + the release's design: trials are grouped by the image each
    showed (sessions in order, NSD's trial numbering), and --held-out-only keeps the test images."""
    from mindsemantix.simulate.nsd_layout import write_expdesign

    monkeypatch.setenv("MINDSEMANTIX_BF16", "0")
    bundle = tmp_path / "b"
    MindSemantixPipeline.from_run(run["run"], data=run["data"], load_diffusion=False).save_pretrained(bundle)
    held_out = json.loads((bundle / "model_index.json").read_text())["subjects"]["subj01"]["held_out_image_ids"]
    assert held_out == [13, 14, 15, 16]  # the tiny dataset's test images
    order = np.arange(1500) % 20 + 1                                  # 1-based indices into subjectim
    order[:6] = [14, 1, 15, 14, 2, 20]                                # session 1: ids 13, 0, 14, 13, 1, 19
    order[750:756] = [16, 14, 3, 3, 17, 5]                            # session 2: ids 15, 13, 2, 2, 16, 4
    subjectim = np.tile(np.arange(1, 21), (2, 1))                     # image k of a subject = 73k id k + 1
    write_expdesign(tmp_path / "design.mat", order, subjectim, np.arange(14, 18), n_sessions=2)
    folder = tmp_path / "betas"
    for session, seed in ((1, 0), (2, 1)):
        nii, _, _ = _write_session(tmp_path / f"s{session}", run["data"], "subj01", n_trials=6, seed=seed)
        folder.mkdir(exist_ok=True)
        shutil.move(nii, folder / f"betas_session{session:02d}.nii.gz")
    assert cli_main(["decode", "--model", str(bundle), "--subject", "subj01", "--betas", str(folder),
                     "--nsd-design", str(tmp_path / "design.mat"), "--held-out-only", "--no-images",
                     "--out", str(tmp_path / "o")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "captions.jsonl").read_text().splitlines()]
    assert [(r["key"], r["trials"]) for r in rows] == [("subj01-000013", [1, 4, 8]), ("subj01-000014", [3]),
                                                       ("subj01-000015", [7]), ("subj01-000016", [11])]


def test_bundle_finds_the_dataset_in_the_stage_config(run, tmp_path):
    """Without --data the dataset comes from the stage-2 run's saved config.yaml (as LightningCLI
    writes it: the datamodule's arguments flat under `data`); without that file, one clear error."""
    config = run["run"] / "align" / "config.yaml"
    try:
        config.write_text(f"model: {{}}\ndata:\n  datasets: {run['data']}\n  batch_size: 4\n")
        pipe = MindSemantixPipeline.from_run(run["run"], load_diffusion=False)
        assert sorted(pipe.subjects) == ["subj01", "subj02"] and pipe.subjects["subj01"].n_voxels == 40
    finally:
        config.unlink()
    with pytest.raises(BundleError, match="config.yaml is missing; pass the shard dataset with --data"):
        MindSemantixPipeline.from_run(run["run"], load_diffusion=False)
