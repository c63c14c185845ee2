"""The NSD recipe leaves no scratch or half-written dataset behind: freed per subject, cleaned on
SIGTERM, and what a SIGKILLed run left is removed on the next start (only a dead run's folders)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest_data import REPO, load_recipe, toyworld_tree  # noqa: F401  (fixture)


def leftover(parent: Path, name: str, pid: int, out: Path) -> tuple[Path, Path]:
    """A scratch folder with an owner record, and its hidden temporary dataset, as a killed run leaves them."""
    scratch, dataset_tmp = parent / f".nsd-recipe-{name}", parent / f".{out.name}.{name}.tmp"
    scratch.mkdir()
    dataset_tmp.mkdir()
    (dataset_tmp / "train").mkdir()
    (scratch / "owner.json").write_text(json.dumps({"recipe": "nsd", "host": socket.gethostname(), "pid": pid,
                                                    "out": str(out.resolve()), "dataset_tmp": str(dataset_tmp.resolve())}))
    return scratch, dataset_tmp


def test_next_start_removes_only_a_dead_runs_leftovers(toyworld_tree, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = leftover(tmp_path, "dead", dead.pid, out)
    live = leftover(tmp_path, "live", os.getpid(), out)  # a run still going: never touched
    other_out = leftover(tmp_path, "other", dead.pid, tmp_path / "elsewhere")  # another output's
    unknown = tmp_path / ".nsd-recipe-noowner"  # no owner record: not ours to judge
    unknown.mkdir()
    load_recipe("nsd").convert(toyworld_tree, out, subjects=[1], with_images=False, progress=False)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in live + other_out) and unknown.exists()
    assert (out / "manifest.json").is_file()


def test_each_subjects_scratch_is_freed_when_it_is_done(toyworld_tree, tmp_path, monkeypatch):
    nsd = load_recipe("nsd")
    real = nsd._convert_subject
    seen = []

    def spy(plan, writer, scratch, *args):
        seen.append(sorted(p.name for p in scratch.glob("*.npy")))
        real(plan, writer, scratch, *args)
        seen.append(sorted(p.name for p in scratch.glob("*.npy")))

    monkeypatch.setattr(nsd, "_convert_subject", spy)
    nsd.convert(toyworld_tree, tmp_path / "out", subjects=[1, 2], with_images=False, progress=False)
    assert seen == [[], [], [], []]


SLOW_RUN = """
import sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
from conftest_data import load_recipe
nsd = load_recipe("nsd")
real = nsd.read_session_betas
def slow(*a, **k):
    time.sleep(0.5)
    return real(*a, **k)
nsd.read_session_betas = slow
nsd.main(["--nsd-root", {tree!r}, "--out", {out!r}, "--quiet", "--no-images", "--subjects", "1"])
"""


def test_sigterm_removes_scratch_and_the_half_written_dataset(toyworld_tree, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    script = SLOW_RUN.format(repo=str(REPO), tests=str(REPO / "tests"), tree=str(toyworld_tree), out=str(work / "out"))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    while not list(work.glob(".nsd-recipe-*/owner.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert list(work.iterdir()) == []
