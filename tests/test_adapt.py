"""A new subject for a trained bundle (`mindsemantix adapt`, docs/transfer.md): session limiting picks
exactly the first N sessions' trials; adapt adds the subject and changes no other tensor; the
adapted bundle decodes the old subjects identically and the new one; a SIGKILLed adapt resumes
exactly."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_QFORMER, run_cli, save_tiny_wordpiece_tokenizer, tiny_sd_config
from mindsemantix.data.datamodule import BrainDataModule

SUBJECTS = {"subj01": 40, "subj02": 36, "subj03": 30}  # the bundle learns 01 and 02; 03 is new
SPLITS = {"train": 14, "val": 4, "test": 3}
REPS = 3
N_SESSIONS = 3
TINY_ADAPT = """
trainer:
  accelerator: cpu
  precision: 32-true
  max_steps: 8
  val_check_interval: 4
  enable_progress_bar: false
  log_every_n_steps: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 3, save_top_k: -1}
model:
  init_args: {warmup_steps: 2, lr: 0.01}
data:
  batch_size: 4
  num_workers: 0
"""


def make_session_dataset(root: Path, seed: int = 0) -> Path:
    """3 subjects; each image's 3 repetitions at random trials of 3 sessions (750 trials each). Row r
    of an image's fmri is 1 at voxel r (plus a small image/voxel pattern), so a mean over the served
    repetitions shows which rows were kept. subj01 and subj03 carry meta `sessions`; subj02 does
    not (its sessions follow from the trial numbers)."""
    from mindsemantix.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(root, dataset="sessions", samples_per_shard=8) as w:
        for subject, n_vox in SUBJECTS.items():
            mask = np.zeros((8, 9, 10), np.int16)
            flat = mask.reshape(-1)
            flat[np.sort(rng.choice(flat.size, n_vox, replace=False))] = 1
            w.add_subject(subject, nib.Nifti1Image(mask, np.diag([2.0, 2.0, 2.0, 1.0])))
            trials = rng.permutation(N_SESSIONS * 750)[: sum(SPLITS.values()) * REPS] + 1
            image_id = 0
            for split, n in SPLITS.items():
                for _ in range(n):
                    t = sorted(int(x) for x in trials[image_id * REPS:(image_id + 1) * REPS])
                    fmri = np.tile((image_id % 7) / 100 + np.arange(n_vox) / 1e3, (REPS, 1)).astype(np.float32)
                    fmri[np.arange(REPS), np.arange(REPS)] += 1.0
                    fmri += rng.normal(0, 0.01, fmri.shape).astype(np.float32)
                    meta = {"subject": subject, "image_id": image_id, "trials": t}
                    if subject != "subj02":
                        meta["sessions"] = [(x - 1) // 750 + 1 for x in t]
                    w.write(split, f"{subject}-{image_id:06d}", fmri, meta,
                            captions=[f"image {image_id % 7} caption {k}" for k in range(3)])
                    image_id += 1
    return root


def metas_from_tars(root: Path) -> dict[str, dict]:
    """Every sample's meta, read straight from the tar files (not through the datamodule)."""
    out = {}
    for path in sorted(root.rglob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".meta.json"):
                    meta = json.load(io.BytesIO(tar.extractfile(member).read()))
                    out[member.name[: -len(".meta.json")]] = meta
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_session_dataset(tmp_path_factory.mktemp("adapt") / "shards")


@pytest.mark.parametrize("n", [1, 2])
def test_session_limit_keeps_exactly_the_first_sessions_trials(data, n):
    metas = metas_from_tars(data)
    dm = BrainDataModule(str(data), batch_size=5, fields=["captions"], train_repetition="mean", max_sessions=n,
                         verify="none")
    dm.setup()
    for split in ("train", "val", "test"):
        served = {}
        for batch in dm._loader(split, train=False):  # eval loader: the mean of the served repetitions
            for key, x in zip(batch["key"], batch["fmri"]):
                served[key] = sorted(int(r) for r in torch.nonzero(x[:REPS] > 0.2).flatten())
        expected = {}
        for key, meta in metas.items():
            if meta["split"] != split:
                continue
            rows = [r for r, t in enumerate(meta["trials"]) if split == "test" or (t - 1) // 750 < n]
            if rows:
                expected[key] = rows
        assert served == expected, split
        if split != "test":  # the limit really drops samples and repetitions here (else this proves nothing)
            assert len(expected) < SPLITS[split] * len(SUBJECTS) or split == "val"
            assert any(len(v) < REPS for v in expected.values())


def test_session_limit_is_checked():
    with pytest.raises(ValueError, match="max_sessions must be >= 1"):
        BrainDataModule("x", max_sessions=0)


# -- adapt ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(data, tmp_path_factory):
    """A bundle trained (here: random, with a fitted ridge readout) on subj01 and subj02 only."""
    from mindsemantix.cli import main as cli_main
    from mindsemantix.models.brain_encoder import BrainEncoder, BrainEncoderConfig
    from mindsemantix.models.diffusion import small_stable_diffusion
    from mindsemantix.stages.align import BrainAlign
    from mindsemantix.stages.reconstruct import BrainReconstruct

    root = tmp_path_factory.mktemp("bundle")
    old = ["subj01", "subj02"]
    dm = BrainDataModule(str(data), batch_size=4, fields=["captions"], subjects=old, verify="none")
    dm.setup()
    torch.manual_seed(0)
    encoder = BrainEncoder(BrainEncoderConfig.preset("tiny"), with_decoder=False)
    for subject, info in dm.subject_info().items():
        encoder.add_subject(subject, info.coords_mm)
    run = root / "runs" / "r"
    encoder.save_pretrained(run / "pretrain" / "export")
    tokenizer = save_tiny_wordpiece_tokenizer(root / "wordpiece", words=["image", "caption"] + [str(i) for i in range(10)])
    align = BrainAlign(brain_encoder=str(run / "pretrain" / "export"), phase="generative", llm="random:tiny",
                       qformer={**TINY_QFORMER, "tokenizer": str(tokenizer)}, generation={"max_new_tokens": 4},
                       loss_weights={"itc": 1.0, "itg": 1.0}, readout_dim=8)
    align.fit_readout(dm)
    with torch.no_grad():  # "trained": a readout projection that is not zero
        align.captioner.readout.proj.weight.normal_(0, 0.5)
    align.save_export(run / "align" / "export")
    small_stable_diffusion(tiny_sd_config(), seed=0).save_pretrained(root / "sd")
    BrainReconstruct(align_export=str(run / "align" / "export"), diffusion=str(root / "sd"), sampling={"num_inference_steps": 2},
                     head={"hidden": 32, "token_dim": 8}, variants=["full"], score=False).export(run / "reconstruct" / "export")
    assert cli_main(["bundle", "--run", str(run), "--out", str(root / "bundle"), "--data", str(data)]) == 0
    return root / "bundle"


def adapt(bundle: Path, data: Path, out: Path, run: Path, *extra: str, expect_rc: int = 0):
    config = run.parent / "tiny_adapt.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(TINY_ADAPT)
    return run_cli("adapt", "--model", str(bundle), "--data", str(data), "--subject", "subj03", "--sessions", "2",
                   "--out", str(out), "--run", str(run), "--config", str(config), "--data.verify=none", *extra,
                   expect_rc=expect_rc)


@pytest.fixture(scope="module")
def adapted(bundle, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapted")
    adapt(bundle, data, root / "bundle", root / "run")
    return root / "bundle"


def test_adapt_adds_the_subject_and_changes_nothing_else(bundle, adapted):
    before = load_file(str(bundle / "captioner" / "model.safetensors"))
    after = load_file(str(adapted / "captioner" / "model.safetensors"))
    new = sorted(set(after) - set(before))
    assert set(before) <= set(after)
    assert new and all(k.startswith(("brain_encoder.tokenizers.subj03.", "readout.maps.subj03.")) for k in new), new
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]
    assert float(after["readout.maps.subj03.alpha"]) > 0  # the ridge map was fitted
    assert (bundle / "latent_head" / "model.safetensors").read_bytes() == \
        (adapted / "latent_head" / "model.safetensors").read_bytes()
    index = json.loads((adapted / "model_index.json").read_text())
    assert sorted(index["subjects"]) == ["subj01", "subj02", "subj03"]
    spec = index["subjects"]["subj03"]
    assert spec["n_voxels"] == SUBJECTS["subj03"] and spec["held_out_image_ids"] == list(range(18, 21))
    assert (adapted / spec["mask"]).is_file()


def test_adapted_bundle_decodes_old_subjects_identically_and_the_new_one(bundle, adapted, data):
    from mindsemantix.data.arrays import load_split_arrays
    from mindsemantix.pipeline import MindSemantixPipeline

    test = load_split_arrays(data, "test", captions=False, verify="none")
    old = MindSemantixPipeline.from_pretrained(bundle, load_diffusion=False)
    new = MindSemantixPipeline.from_pretrained(adapted, load_diffusion=False)
    for subject in ("subj01", "subj02"):
        x = torch.from_numpy(test[subject].x)
        assert new(x, subject, images=False).captions == old(x, subject, images=False).captions
        assert torch.equal(new.captioner.query_outputs(x, subject), old.captioner.query_outputs(x, subject))
    x = torch.from_numpy(test["subj03"].x)
    out = new(x, "subj03", images=False)
    assert len(out.captions) == len(x) and all(isinstance(c, str) for c in out.captions)
    with pytest.raises(ValueError, match="mindsemantix adapt"):
        old(x, "subj03", images=False)


def test_adapt_trains_only_the_new_subjects_parameters(bundle, data, tmp_path):
    """In the module: after setup, the trainable parameters are exactly subj03's tokenizer."""
    from mindsemantix.stages.adapt import BrainAdapt

    model = BrainAdapt(bundle=str(bundle), subject="subj03")
    dm = BrainDataModule(str(data), batch_size=4, fields=["captions"], subjects=["subj03"], max_sessions=1, verify="none")
    dm.setup()
    model.trainer = type("T", (), {"datamodule": dm})()  # setup reads trainer.datamodule only
    model._trainer = model.trainer
    model.setup("fit")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("captioner.brain_encoder.tokenizers.subj03.") for n in trainable), trainable
    assert {n for n, _ in model.captioner.brain_encoder.tokenizers["subj03"].named_parameters()} == \
        {n.split("tokenizers.subj03.", 1)[1] for n in trainable}


def test_adapt_refuses_a_subject_the_bundle_has(bundle):
    from mindsemantix.stages.adapt import AdaptError, BrainAdapt

    with pytest.raises(AdaptError, match="already in this bundle"):
        BrainAdapt(bundle=str(bundle), subject="subj01")


def test_adapt_resumes_exactly_after_sigkill(bundle, data, adapted, tmp_path):
    out, run = tmp_path / "bundle", tmp_path / "run"
    adapt(bundle, data, out, run, "--trainer.callbacks+=probe_callbacks.KillAtStep", "--trainer.callbacks.step=7",
          expect_rc=-9)
    assert not out.exists()  # a killed run writes no bundle
    adapt(bundle, data, out, run, "--ckpt_path=last")
    a = load_file(str(out / "captioner" / "model.safetensors"))
    b = load_file(str(adapted / "captioner" / "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # and training moved the new layers: step 3's checkpoint holds other values than the end's
    from mindsemantix.callbacks import load_checkpoint_safely

    early = load_checkpoint_safely(next((run / "checkpoints").glob("*step=3.ckpt")))["state_dict"]
    key = "captioner.brain_encoder.tokenizers.subj03.weight"
    e, f = early[key].flatten().double(), a[key.removeprefix("captioner.")].flatten().double()
    residual = f - (f @ e) / (e @ e) * e  # weight decay alone would only scale the weights
    assert residual.norm() > 1e-4 * f.norm()
