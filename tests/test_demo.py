"""End to end: `make demo SCALE=tiny` — simulate, convert, train the three stages, predict, evaluate,
report — in a temporary root, then a re-run that reuses every finished step. (`make eval` runs the
last two steps of the same plan.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["simulate study", "convert corpus", "convert study", "train toy SD", "stage 1: pretrain",
         "stage 2: align (representation)", "stage 2: align (generative)", "stage 2: captions",
         "stage 3: reconstruct (fit)", "stage 3: reconstruct (predict)", "baselines", "evaluate + report",
         "bundle", "decode a subject's sessions"]


def make(target: str, root: Path, *variables: str) -> subprocess.CompletedProcess:
    """`make <target> SCALE=tiny DEMO_ROOT=root` in this checkout, with the interpreter running the tests
    (its venv is the one `make test` set up; elsewhere the same module is called directly)."""
    venv = Path(sys.prefix)
    if (venv / ".mindsemantix-installed").is_file():
        command = ["make", "-s", target, f"VENV={venv}", "SCALE=tiny", f"DEMO_ROOT={root}", *variables]
    else:
        command = [sys.executable, "-m", "mindsemantix.demo", "--scale", "tiny", "--root", str(root),
                   *(["--eval-only"] if target == "eval" else []),
                   *[f"--{v.split('=')[0].lower()}={v.split('=')[1]}" for v in variables]]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("demo")
    result = make("demo", root)
    if result.returncode != 0:
        pytest.fail(f"make demo SCALE=tiny failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return root, result


def test_tiny_demo_runs_every_step_and_writes_the_report(tiny_demo):
    root, result = tiny_demo
    run, report = root / "runs" / "tiny", root / "reports" / "tiny"
    timings = json.loads((report / "demo_timings.json").read_text())
    assert list(timings) == STEPS and all(t > 0 for t in timings.values())

    # stage hand-offs (exports, docs/formats.md) and the stage-2 captions: one line per test sample
    for stage in ("pretrain", "align_representation", "align", "reconstruct"):
        config = json.loads((run / stage / "export" / "config.json").read_text())
        assert config, stage
        assert (run / stage / "metrics.csv").is_file(), f"{stage}: training curves missing"
    test_keys = [json.loads(line)["key"] for line in (run / "baselines" / "references.jsonl").read_text().splitlines()]
    captions = [json.loads(line) for line in (run / "align" / "captions.jsonl").read_text().splitlines()]
    assert sorted(c["key"] for c in captions) == sorted(test_keys)
    assert all(c["caption"].strip() for c in captions)
    # one PNG per test key and variant
    for variant in ("seen", "caption_only", "latent_only", "full"):
        assert sorted(p.stem for p in (run / "reconstruct" / "predict" / variant).glob("*.png")) == sorted(test_keys)

    evaluation = json.loads((report / "eval.json").read_text())
    for metric in ("BLEU-4", "METEOR", "CIDEr", "SentenceSim", "PixCorr", "SSIM", "TwoWay-EfficientNetLite0"):
        assert metric in evaluation["metrics"], metric
    baselines = evaluation["baselines"]
    assert {"chance", "ridge_retrieval", "caption_only", "latent_only", "ridge_latent"} <= set(baselines)
    assert "BLEU-4" in baselines["ridge_retrieval"] and "PixCorr" in baselines["ridge_latent"]
    assert evaluation["ceiling"]["CIDEr"] > 0
    text = (report / "eval.md").read_text()
    assert "ridge_retrieval" in text and "UMBRAE" in text  # side by side, with the published NSD anchors
    pictures = [p.name for p in report.iterdir() if p.suffix == ".png"]
    assert len(pictures) >= 3, pictures
    assert "beat" in result.stdout  # the closing summary: model against the best baseline per metric

    # the run as a bundle, and `mindsemantix decode` on subj01's session files: its test images
    # decode to the captions stage 2's predict wrote (same inputs, same model)
    bundle = run / "bundle"
    assert {"model_index.json", "README.md", "captioner", "latent_head", "diffusion"} <= {p.name for p in bundle.iterdir()}
    assert str(root) not in (bundle / "model_index.json").read_text()
    assert "BLEU-4" in (bundle / "README.md").read_text()  # the model card carries the run's metrics
    check = json.loads((report / "decode_check.json").read_text())
    subj01_test = [k for k in test_keys if k.startswith("subj01-")]
    assert check["compared"] + len(check["other_repetitions"]) == len(subj01_test) and check["compared"] > 0
    assert check["differ"] == [], check
    decoded = (run / "decoded" / "captions.jsonl").read_text().splitlines()
    assert sorted(p.stem for p in (run / "decoded" / "images").glob("*.png")) == sorted(json.loads(r)["key"] for r in decoded)
    assert "decode to the caption `predict` wrote (all equal)" in result.stdout


def test_rerunning_reuses_finished_steps_and_eval_names_a_missing_run(tiny_demo):
    root, _ = tiny_demo
    again = make("demo", root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(": done (") == len(STEPS)
    assert json.loads((root / "runs" / "tiny" / "demo.json").read_text())["subjects"] == 2

    missing = make("eval", root, "RUN=no-such-run")
    assert missing.returncode != 0
    assert "runs/no-such-run/align/captions.jsonl is missing" in missing.stdout + missing.stderr


# A step that writes its done file (with a fresh stamp, to tell a re-run from a reuse).
WRITE = ("import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True, exist_ok=True); "
         "p.write_text(str(time.time_ns()))")


def test_a_changed_config_reruns_its_step_and_later_ones_and_keeps_the_old_outputs(tmp_path, monkeypatch, capsys):
    from mindsemantix import demo

    monkeypatch.setattr(demo, "REPO", tmp_path)  # the "checkout" whose config files are fingerprinted
    config = tmp_path / "stages" / "a.yaml"
    config.parent.mkdir()
    config.write_text("lr: 1\n")
    root, records = tmp_path / "root", tmp_path / "root" / "runs" / ".demo_steps.json"

    def steps(extra: str = "") -> list[demo.Step]:
        plan = [demo.Step("a", [sys.executable, "-c", WRITE, str(root / "a" / "done"), str(config), extra],
                          root / "a" / "done", output=root / "a"),
                demo.Step("b", [sys.executable, "-c", WRITE, str(root / "b" / "done")], root / "b" / "done",
                          output=root / "b")]
        demo.fingerprint_steps(plan, root)
        return plan

    def stamps() -> dict[str, str]:
        return {n: (root / n / "done").read_text() for n in "ab"}

    demo.run_steps(steps(), root / "timings.json", records_path=records)
    first = stamps()
    demo.run_steps(steps(), root / "timings.json", records_path=records)
    assert stamps() == first                                      # unchanged: both reused
    assert capsys.readouterr().out.count(": done (") == 2

    config.write_text("lr: 2\n")                                  # e.g. a `git pull` changed the config
    demo.run_steps(steps(), root / "timings.json", records_path=records)
    second = stamps()
    assert second["a"] != first["a"] and second["b"] != first["b"]  # the step and every later one re-ran
    assert [(p / "done").read_text() for p in root.glob("a.stale-*")] == [first["a"]]  # nothing deleted
    assert [(p / "done").read_text() for p in root.glob("b.stale-*")] == [first["b"]]
    assert "moved" in capsys.readouterr().out

    demo.run_steps(steps(extra="--more"), root / "timings.json", records_path=records)  # a changed command too
    assert stamps()["a"] != second["a"] and len(list(root.glob("a.stale-*"))) == 2

    third = stamps()
    shutil.rmtree(root / "a")                                     # deleting a step's output re-runs it and the rest
    demo.run_steps(steps(extra="--more"), root / "timings.json", records_path=records)
    assert stamps()["a"] != third["a"] and stamps()["b"] != third["b"]
    assert len(list(root.glob("b.stale-*"))) == 3

    # outputs from before fingerprints were recorded are reused, with a note saying how to re-run them
    records.unlink()
    fourth = stamps()
    demo.run_steps(steps(), root / "timings.json", records_path=records)
    assert stamps() == fourth
    assert "made before step fingerprints were recorded: delete" in capsys.readouterr().out


def test_a_step_that_names_what_it_reads_is_not_redone_when_another_step_changes(tmp_path, monkeypatch, capsys):
    from mindsemantix import demo

    monkeypatch.setattr(demo, "REPO", tmp_path)
    root, records = tmp_path / "root", tmp_path / "root" / "runs" / ".demo_steps.json"

    def steps(b_extra: str = "") -> list[demo.Step]:
        def step(name: str, *extra: str, after: tuple[str, ...] | None = None) -> demo.Step:
            done = root / name / "done"
            return demo.Step(name, [sys.executable, "-c", WRITE, str(done), *extra], done, output=root / name, after=after)
        plan = [step("a"), step("b", b_extra), step("c", after=("a",))]  # c reads a's output only
        demo.fingerprint_steps(plan, root)
        return plan

    def stamps() -> dict[str, str]:
        return {n: (root / n / "done").read_text() for n in "abc"}

    demo.run_steps(steps(), root / "timings.json", records_path=records)
    first = stamps()
    demo.run_steps(steps(b_extra="--changed"), root / "timings.json", records_path=records)
    second = stamps()
    assert second["b"] != first["b"] and second["a"] == first["a"]
    assert second["c"] == first["c"]                              # b is not what c reads: reused
    shutil.rmtree(root / "a")                                     # a re-runs, and both steps downstream of it
    demo.run_steps(steps(b_extra="--changed"), root / "timings.json", records_path=records)
    third = stamps()
    assert all(third[n] != second[n] for n in "abc")
    assert "a step it reads ran again" in capsys.readouterr().out
