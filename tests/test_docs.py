"""The docs stand alone: docs/data.md's ShardWriter example runs as written, and no file of the
repository points to design files that live outside it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from helpers import REPO

# Built from pieces so that this file does not match its own pattern.
OUTSIDE_REFERENCE = re.compile("|".join([r"(DESIGN|MEASURED|OFFLINE)\.md", r"\.\./shared", "/work/" + "shared",
                                         r"\bContract[- ]\d"]))



def python_block_after(markdown: str, heading: str) -> str:
    """The first ```python block in the section that starts with the line `heading`."""
    start = markdown.index("\n" + heading + "\n")
    block = re.search(r"^```python\n(.*?)^```$", markdown[start:], re.S | re.M)
    assert block, f"no python block under {heading!r}"
    return block.group(1)


def test_data_md_shardwriter_example_runs(tmp_path):
    code = python_block_after((REPO / "docs/data.md").read_text(), "## 4. Your own dataset (`ShardWriter`)")
    (tmp_path / "example.py").write_text(code)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "my_shards" / "manifest.json").is_file()
    assert "sub01: 64 voxels" in proc.stdout and "sha256 OK" in proc.stdout


def repository_files() -> list[str]:
    """Tracked files plus new ones git does not ignore (what a commit would hold)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file()]


def test_no_file_points_outside_the_repository():
    offenders = []
    for name in repository_files():
        try:
            text = (REPO / name).read_text()
        except UnicodeDecodeError:
            continue  # binary files
        offenders += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                      if OUTSIDE_REFERENCE.search(line)]
    assert not offenders, "references to files outside the repository (describe it in docs/ instead):\n" + \
        "\n".join(offenders)

