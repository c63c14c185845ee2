"""`make demo`: the whole job on a simulated study — simulate, convert, pretrain, align, reconstruct,
evaluate, report — each step exactly the command a user would type (see the README), run here
one after another.

    python -m mindsemantix.demo [--scale default|tiny] [--seed 0] [--subjects 4] [--run NAME]
    python -m mindsemantix.demo --eval-only --run NAME        # `make eval`: baselines + report only

Every step has an output that marks it finished (a manifest, an export, a JSON file, all written
atomically), so re-running skips finished steps and a training step that was cut short resumes from
its last checkpoint (`--ckpt_path last`). Timings go to `reports/<run>/demo_timings.json` (step ->
seconds), and the precision each step's parts ran in to `reports/<run>/demo_precision.json` (step ->
{part: "bf16" | "fp32"}, as the automatic precision of mindsemantix/precision.py decides it here).

A step is reused only if it was made by the same command and the same config / recipe files (their
contents, e.g. after a `git pull` that changed `stages/align.yaml`) as every step it depends on
(`runs/.demo_steps.json` records a fingerprint of each), and none of those ran in this invocation.
Otherwise its output is moved aside (to `<output>.stale-<time>`, nothing is deleted) and it runs
again. So deleting a step's output re-runs it and every step that depends on it. A step depends on
the one before it unless it names what it reads (`Step.after`: the baselines read only the data and
the toy SD, so a new stage-3 run does not redo them). Changes to the library code itself are not
fingerprinted: `--force` re-runs everything.

Paths: the simulated data under `data/<study>/` (`data/toyworld` for the default study; other seeds,
subject counts and the tiny scale get their own folder), runs under `runs/<run>/<stage>/`, the
report under `reports/<run>/`. `--scale tiny` adds the `stages/tiny/*.yaml` overlays (a few steps
of small models): the same path in a few minutes; the test suite runs it end to end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mindsemantix.io import write_json_atomic

REPO = Path(__file__).resolve().parents[1]

# The simulated study at each scale (data_recipes/toyworld.py flags). tiny: 2 subjects on a coarse
# grid, 2 sessions, a small image-less corpus.
STUDY_FLAGS = {
    "default": [],
    "tiny": ["--sessions", "2", "--shared-images", "40", "--voxel-size", "7", "--corpus-runs", "1",
             "--corpus-frames", "200"],
}
DEFAULT_SUBJECTS = {"default": 4, "tiny": 2}
TOY_SD_SCALE = {"default": "demo", "tiny": "tiny"}


# The kind of work of each automatic-precision part of a step (mindsemantix/precision.py); steps not
# listed run no autocast (fp32). "trainer": the stage's `precision: null`.
PRECISION_PARTS = {
    "train toy SD": {"vae": "conv", "text_pretrain": "matmul", "unet": "conv"},
    "stage 1: pretrain": {"trainer": "matmul"},
    "stage 2: align (representation)": {"trainer": "matmul"},
    "stage 2: align (generative)": {"trainer": "matmul"},
    "stage 2: captions": {"trainer": "matmul"},
    "stage 3: reconstruct (fit)": {"trainer": "matmul", "vae_encode": "conv"},
    "stage 3: reconstruct (predict)": {"trainer": "matmul", "sd_sampling": "conv"},
}


def step_precision(name: str) -> dict[str, str]:
    """{part: "bf16" | "fp32"} a step's automatic precision gives on this machine's CPU."""
    from mindsemantix.precision import precision_name

    parts = PRECISION_PARTS.get(name)
    if parts is None:
        return {"all": "fp32"}
    return {part: precision_name("cpu", kind) for part, kind in parts.items()}


@dataclass
class Step:
    name: str
    command: list[str]
    done: Path                      # exists once the step has finished
    resume_from: Path | None = None  # a run folder whose checkpoints/last.ckpt lets the step resume
    output: Path | None = None      # what the step writes (moved aside when stale); default: `done`
    after: tuple[str, ...] | None = None  # names of the steps whose outputs it reads; None: the step before it
    fingerprint: str | None = None  # set by `fingerprint_steps`; None: reuse by `done` alone


def study_name(scale: str, seed: int, subjects: int) -> str:
    if (scale, seed, subjects) == ("default", 0, DEFAULT_SUBJECTS["default"]):
        return "toyworld"
    return f"toyworld-{scale}-seed{seed}-subj{subjects}"


def run_name(scale: str, seed: int, subjects: int) -> str:
    if (seed, subjects) == (0, DEFAULT_SUBJECTS[scale]):
        return "demo" if scale == "default" else "tiny"
    return f"demo-{scale}-seed{seed}-subj{subjects}"


def plan(scale: str, seed: int, subjects: int, run: str, root: Path = REPO) -> list[Step]:
    """The demo's steps; data, runs and reports go under `root`, configs come from this checkout."""
    py = [sys.executable]
    data = root / "data" / study_name(scale, seed, subjects)
    runs = root / "runs" / run
    nsd, corpus, shards, toy_sd = data / "nsd", data / "corpus", data / "shards", data / "toy_sd"

    def fit(stage: str, *overrides: str) -> list[str]:
        configs = ["--config", str(REPO / "stages" / f"{stage}.yaml")]
        if scale != "default":
            configs += ["--config", str(REPO / "stages" / scale / f"{stage}.yaml")]
        return [*py, "-m", "mindsemantix.cli", "fit", *configs, "--seed_everything", str(seed),
                "--trainer.default_root_dir", str(runs / stage), *overrides]

    def predict(stage: str, *overrides: str) -> list[str]:
        return ["predict" if a == "fit" else a for a in fit(stage, *overrides)]

    shards_only = ["--data.datasets", str(shards)]
    return [
        Step("simulate study", [*py, str(REPO / "data_recipes" / "toyworld.py"), "--out", str(nsd), "--seed", str(seed),
                                "--subjects", str(subjects), *STUDY_FLAGS[scale]],
             nsd / "toyworld_truth" / "truth.json", output=nsd),
        Step("convert corpus", [*py, str(REPO / "data_recipes" / "fmri_corpus.py"), "--root", str(nsd / "corpus_bids"),
                                "--dataset", "toycorpus", "--out", str(corpus), "--roi", "background", "--window", "4"],
             corpus / "manifest.json", output=corpus),
        Step("convert study", [*py, str(REPO / "data_recipes" / "nsd.py"), "--nsd-root", str(nsd), "--out", str(shards)],
             shards / "manifest.json", output=shards),
        Step("train toy SD", [*py, str(REPO / "data_recipes" / "toy_diffusion.py"), "--nsd-root", str(nsd),
                              "--out", str(toy_sd), "--scale", TOY_SD_SCALE[scale]],
             toy_sd / "toy_sd.json", output=toy_sd),
        Step("stage 1: pretrain", fit("pretrain", "--data.datasets", json.dumps([str(shards), str(corpus)])),
             runs / "pretrain" / "export" / "config.json", runs / "pretrain", runs / "pretrain"),
        Step("stage 2: align (representation)",
             fit("align_representation", *shards_only,
                 "--model.init_args.brain_encoder", str(runs / "pretrain" / "export")),
             runs / "align_representation" / "export" / "config.json", runs / "align_representation",
             runs / "align_representation"),
        Step("stage 2: align (generative)",
             fit("align", *shards_only, "--model.init_args.init_from", str(runs / "align_representation" / "export")),
             runs / "align" / "export" / "config.json", runs / "align", runs / "align"),
        Step("stage 2: captions", predict("align", *shards_only, "--model.init_args.init_from", str(runs / "align" / "export")),
             runs / "align" / "captions.jsonl"),
        Step("stage 3: reconstruct (fit)",
             fit("reconstruct", *shards_only, "--model.init_args.align_export", str(runs / "align" / "export"),
                 "--model.init_args.diffusion", str(toy_sd), "--model.init_args.captions", str(runs / "align" / "captions.jsonl")),
             runs / "reconstruct" / "export" / "config.json", runs / "reconstruct", runs / "reconstruct"),
        Step("stage 3: reconstruct (predict)",
             predict("reconstruct", *shards_only, "--model.init_args.init_from", str(runs / "reconstruct" / "export"),
                     "--model.init_args.align_export", str(runs / "align" / "export"),
                     "--model.init_args.diffusion", str(toy_sd), "--model.init_args.captions", str(runs / "align" / "captions.jsonl")),
             runs / "reconstruct" / "predict" / "reconstructions.json", output=runs / "reconstruct" / "predict"),
        *eval_steps(run, shards, toy_sd, root),
        *decode_steps(run, nsd, shards, root),
    ]


DECODE_SUBJECT = "subj01"


def decode_steps(run: str, nsd: Path, shards: Path, root: Path = REPO) -> list[Step]:
    """The trained run as a bundle (after the report, so its model card carries the metrics), and
    `mindsemantix decode` on the simulated release's session files of one subject: its held-out test
    images, each the mean of its repetitions, exactly as `predict` saw them (`decode_check`)."""
    from mindsemantix.data.nsd import NSDLayout

    py = [sys.executable, "-m", "mindsemantix.cli"]
    runs = root / "runs" / run
    layout = NSDLayout(nsd)
    return [
        Step("bundle", [*py, "bundle", "--run", str(runs), "--out", str(runs / "bundle"), "--data", str(shards)],
             runs / "bundle" / "model_index.json", output=runs / "bundle", after=("evaluate + report",)),
        Step("decode a subject's sessions",
             [*py, "decode", "--model", str(runs / "bundle"), "--subject", DECODE_SUBJECT,
              "--betas", str(layout.betas_dir(1)), "--nsd-design", str(layout.expdesign), "--held-out-only",
              "--out", str(runs / "decoded")],
             runs / "decoded" / "captions.jsonl", output=runs / "decoded", after=("bundle", "simulate study")),
    ]


def decode_check(run_dir: Path, shards: Path, subject: str = DECODE_SUBJECT) -> dict:
    """Do `mindsemantix decode`'s captions equal stage 2's `predict` captions for the same images?
    Compared where the decoded repetitions are exactly the sample's (its trials in the shards)."""
    from mindsemantix.data.shards import SampleReader, ShardDataset

    decoded = {r["key"]: r for r in map(json.loads, (run_dir / "decoded" / "captions.jsonl").read_text().splitlines())}
    predicted = {r["key"]: r["caption"] for r in map(json.loads, (run_dir / "align" / "captions.jsonl").read_text().splitlines())}
    reader, same, differ, other_trials = SampleReader(), [], [], []
    try:
        for ref in ShardDataset(shards, verify="none").samples("test"):
            if ref.key not in decoded or ref.key not in predicted:
                continue
            # decode numbers trials over its inputs, the subject's sessions 1..N in order: NSD's own numbering
            if sorted(reader.json(ref, "meta")["trials"]) != sorted(decoded[ref.key]["trials"]):
                other_trials.append(ref.key)
            elif decoded[ref.key]["caption"] == predicted[ref.key]:
                same.append(ref.key)
            else:
                differ.append(ref.key)
    finally:
        reader.close()
    return {"subject": subject, "compared": len(same) + len(differ), "equal": len(same), "differ": differ,
            "other_repetitions": other_trials}


def eval_steps(run: str, shards: Path, toy_sd: Path | None, root: Path = REPO) -> list[Step]:
    """Baselines + report of a run (`make eval`)."""
    py = [sys.executable]
    runs, report = root / "runs" / run, root / "reports" / run
    baselines = runs / "baselines"
    predict = runs / "reconstruct" / "predict"
    images = [f"--images={name}={predict / folder}" for name, folder in
              (("model", "full"), ("caption_only", "caption_only"), ("latent_only", "latent_only"))]
    curves = [str(runs / s / "metrics.csv") for s in ("pretrain", "align_representation", "align", "reconstruct")]
    return [
        Step("baselines", [*py, "-m", "mindsemantix.eval.baselines", "--data", str(shards), "--out", str(baselines),
                           *(["--diffusion", str(toy_sd)] if toy_sd else [])],
             baselines / "baselines_info.json", output=baselines, after=("convert study", "train toy SD")),
        Step("evaluate + report", [*py, "-m", "mindsemantix.eval.report", "--out", str(report), "--run", run,
                                   "--baselines-dir", str(baselines), "--predictions", str(runs / "align" / "captions.jsonl"),
                                   *images, "--metrics-csv", *curves],
             report / "eval.json", after=("stage 3: reconstruct (predict)", "baselines")),
    ]


def _reads(steps: Sequence[Step]) -> list[tuple[str, ...]]:
    """Per step, the names of the steps whose outputs it reads: `after`, else the step before it."""
    return [s.after if s.after is not None else (steps[i - 1].name,) if i else () for i, s in enumerate(steps)]


def fingerprint_steps(steps: Sequence[Step], root: Path) -> None:
    """Set each step's fingerprint: a hash of its command (paths relative to `root` and to this
    checkout, the interpreter left out), the contents of the checkout's configs and recipes it names
    (`stages/`, `data_recipes/`) and the fingerprints of the steps it depends on — so a change
    reaches every step downstream of it."""
    done: dict[str, str] = {}
    for step, reads in zip(steps, _reads(steps)):
        h = hashlib.sha256("".join(done[name] for name in reads).encode())
        for arg in step.command[1:]:  # [0] is the interpreter
            path = Path(arg)
            if path.is_file() and any(path.is_relative_to(REPO / d) for d in ("stages", "data_recipes")):
                h.update(path.read_bytes())
                arg = f"<repo>/{path.relative_to(REPO)}"
            h.update(arg.replace(str(root), "<root>").replace(str(REPO), "<repo>").encode() + b"\0")
        step.fingerprint = done[step.name] = h.hexdigest()


def _move_aside(path: Path) -> Path:
    """Rename a stale output to `<path>.stale-<time>` (never deleted: it may be hours of training)."""
    target = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    path.rename(target)
    return target


def _show(path: Path) -> str:
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def run_steps(steps: Sequence[Step], timings_path: Path, force: bool = False, records_path: Path | None = None
              ) -> dict[str, float]:
    """Run the steps in order, reusing finished ones (see the module doc). `records_path`: the JSON of
    step fingerprints, keyed by each step's `done` path."""
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() and not force else {}
    precision_path = timings_path.with_name("demo_precision.json")  # beside the timings
    precisions: dict[str, dict[str, str]] = (json.loads(precision_path.read_text())
                                             if precision_path.is_file() and not force else {})
    records: dict[str, str] = {}
    if records_path is not None and records_path.is_file():
        records = json.loads(records_path.read_text())
    total_start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ran: set[str] = set()  # once a step runs, the outputs of the steps that read it were made from other inputs
    for i, (step, reads) in enumerate(zip(steps, _reads(steps)), 1):
        upstream_ran = any(name in ran for name in reads)
        header = f"[demo {i}/{len(steps)}] {step.name}"
        key = str(step.done)
        recorded = records.get(key)
        changed = step.fingerprint is not None and recorded is not None and recorded != step.fingerprint
        output = step.output or step.done
        if (changed or upstream_ran or force) and output.exists():
            why = ("--force" if force else "its command or a config / recipe it reads changed" if changed
                   else "a step it reads ran again")
            aside = _move_aside(output)
            print(f"{header}: {why}: moved {_show(output)} aside to {_show(aside)}; running it again", flush=True)
        elif step.done.exists():
            note = "" if recorded is not None or step.fingerprint is None else \
                f"; made before step fingerprints were recorded: delete {_show(output)} to re-run it and the steps after it"
            print(f"{header}: done ({_show(step.done)}{note})", flush=True)
            continue
        ran.add(step.name)
        command = list(step.command)
        if step.resume_from is not None and (step.resume_from / "checkpoints" / "last.ckpt").is_file():
            command += ["--ckpt_path", "last"]
            header += " (resuming from its last checkpoint)"
        if records_path is not None and step.fingerprint is not None:  # a cut-short run resumes only if unchanged
            records[key] = step.fingerprint
            write_json_atomic(records_path, records)
        print(f"\n{header}\n  $ {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env=env)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"demo: step '{step.name}' failed (exit {result.returncode}) after {seconds:.0f} s; "
                             "fix the cause and re-run: finished steps are kept")
        if not step.done.exists():
            raise SystemExit(f"demo: step '{step.name}' exited 0 but did not write {step.done}")
        timings[step.name] = round(seconds, 1)
        write_json_atomic(timings_path, timings)
        precisions[step.name] = step_precision(step.name)
        write_json_atomic(precision_path, precisions)
        print(f"{header}: {seconds:.0f} s", flush=True)
    print(f"\ndemo: steps run now took {time.perf_counter() - total_start:.0f} s", flush=True)
    return timings


def summarize(report: Path) -> str:
    """Model vs every baseline on the headline metrics, from eval.json (honest: says where it loses)."""
    from mindsemantix.eval.report import paired_verdict

    evaluation = json.loads((report / "eval.json").read_text())
    lines = []
    model, baselines = evaluation.get("metrics", {}), evaluation.get("baselines", {})
    for metric in ("BLEU-4", "METEOR", "CIDEr", "SentenceSim", "PixCorr", "SSIM", "TwoWay-EfficientNetLite0"):
        if metric not in model:
            continue
        others = {n: m[metric] for n, m in baselines.items() if metric in m}
        if not others:
            continue
        best = max(others, key=others.get)
        verdict = "beats" if model[metric] > others[best] else "does NOT beat"
        line = f"  {metric:20s} model {model[metric]:.4f} {verdict} the best baseline ({best} {others[best]:.4f})"
        paired = evaluation.get("paired", {}).get(best, {}).get(metric)
        if paired:  # is the gap larger than this test set's noise? (image by image, eval.md)
            meaning = {"above": "interval above 0", "below": "interval below 0",
                       "level": "level: the interval contains 0"}[paired_verdict(paired)]
            line += f"; paired {paired['difference']:+.4f} [{paired['low']:+.4f}, {paired['high']:+.4f}], {meaning}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mindsemantix.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(STUDY_FLAGS), default=os.environ.get("SCALE") or "default")
    p.add_argument("--seed", type=int, default=int(os.environ.get("SEED") or 0), help="the simulated study's seed")
    p.add_argument("--subjects", type=int, default=None, help="number of simulated subjects")
    p.add_argument("--run", default=None, help="run name (runs/<run>, reports/<run>); default from scale/seed/subjects")
    p.add_argument("--root", type=Path, default=Path(os.environ.get("DEMO_ROOT") or REPO),
                   help="folder that holds data/, runs/ and reports/ (default: this checkout)")
    p.add_argument("--eval-only", action="store_true", help="only the baselines and the report of an existing run "
                                                            "(default: the most recent one)")
    p.add_argument("--force", action="store_true", help="re-run every step")
    args = p.parse_args(argv)
    subjects = args.subjects or int(os.environ.get("SUBJECTS") or DEFAULT_SUBJECTS[args.scale])
    root = args.root.resolve()
    if args.eval_only and not args.run:  # the most recently finished stage-2 predict
        finished = sorted(root.glob("runs/*/align/captions.jsonl"), key=lambda f: f.stat().st_mtime)
        if not finished:
            raise SystemExit(f"eval: no run with captions under {root / 'runs'}; run `make demo` first")
        args.run = finished[-1].parents[1].name
    run = args.run or run_name(args.scale, args.seed, subjects)
    settings_path = root / "runs" / run / "demo.json"
    if args.eval_only:  # the run's own study, as recorded when the demo made it
        if not (root / "runs" / run / "align" / "captions.jsonl").is_file():
            raise SystemExit(f"eval: runs/{run}/align/captions.jsonl is missing; run `make demo` (or stage 2's "
                             "predict) first, or choose another run with RUN=...")
        if settings_path.is_file():
            recorded = json.loads(settings_path.read_text())
            args.scale, args.seed, subjects = recorded["scale"], recorded["seed"], recorded["subjects"]
    data = root / "data" / study_name(args.scale, args.seed, subjects)
    steps = plan(args.scale, args.seed, subjects, run, root)
    fingerprint_steps(steps, root)  # over the whole plan, so `make eval` sees the same chain
    if args.eval_only:
        steps = [s for s in steps if s.name in ("baselines", "evaluate + report")]
        steps[-1].done.unlink(missing_ok=True)  # the report is always rewritten; baselines are kept
    else:
        write_json_atomic(settings_path, {"scale": args.scale, "seed": args.seed, "subjects": subjects,
                                          "data": str(data)})
    report = root / "reports" / run
    print(f"demo: run '{run}', scale {args.scale}, seed {args.seed}, {subjects} subjects; data in "
          f"{_show(data)}, runs in {_show(root / 'runs' / run)}, report in {_show(report)}", flush=True)
    run_steps(steps, report / "demo_timings.json", force=args.force, records_path=root / "runs" / ".demo_steps.json")
    print(f"\ndemo: report in {_show(report)}/eval.md\n{summarize(report)}", flush=True)
    runs = root / "runs" / run
    if not args.eval_only and (runs / "decoded" / "captions.jsonl").is_file():
        check = decode_check(runs, data / "shards")
        write_json_atomic(report / "decode_check.json", check)
        verdict = ("all equal" if check["compared"] and not check["differ"] else
                   f"{len(check['differ'])} DIFFER: {', '.join(check['differ'][:5])}" if check["differ"] else "none compared")
        print(f"\ndemo: bundle in {_show(runs / 'bundle')}; `mindsemantix decode` of {check['subject']}'s sessions: "
              f"{check['equal']} of {check['compared']} test images decode to the caption `predict` wrote ({verdict})",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
