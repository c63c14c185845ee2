"""Imports run one way: data <- models <- stages / eval <- the entry points (cli, demo, pipeline,
writers, callbacks). A model loads without Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mindsemantix

PACKAGE = Path(mindsemantix.__file__).parent

# What each layer may import (besides itself). Modules not listed are entry points: anything.
LAYERS = {
    "base": {"io", "export", "numerics", "precision"},
    "data": {"data", "simulate"},
    "models": {"models"},
    "stages": {"stages"},
    "eval": {"eval"},
}
ALLOWED = {
    "base": {"base"},
    "data": {"base", "data"},
    "models": {"base", "data", "models"},
    "stages": {"base", "data", "models", "stages"},
    "eval": {"base", "data", "models", "eval"},
}


def layer_of(module: str) -> str | None:
    """'mindsemantix.models.qformer' -> 'models'; None for the entry points."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for layer, names in LAYERS.items():
        if top in names:
            return layer
    return None


def project_imports(path: Path) -> list[tuple[int, str]]:
    """Every `mindsemantix...` module a file imports, at any depth (function-level imports too)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("mindsemantix"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("mindsemantix")]
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        module = "mindsemantix." + ".".join(path.relative_to(package).with_suffix("").parts)
        layer = layer_of(module)
        if layer is None:
            continue
        for line, target in project_imports(path):
            target_layer = layer_of(target)
            if target_layer is None or target_layer not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(package.parent)}:{line} ({layer}) imports {target} ({target_layer or 'entry point'})")
    return bad


def test_imports_run_one_way():
    assert violations() == []


def test_the_check_catches_an_import_against_the_direction(tmp_path):
    """A model importing the evaluation (as qformer.py once imported eval.baselines) is reported."""
    pkg = tmp_path / "mindsemantix"
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "bad.py").write_text("def f():\n    from mindsemantix.eval.baselines import fit_ridge\n")
    (pkg / "eval").mkdir()
    (pkg / "eval" / "bad.py").write_text("from mindsemantix.stages.pretrain import BrainMAE\n")
    (pkg / "eval" / "good.py").write_text("from mindsemantix.models.qformer import QFormerConfig\n")
    found = violations(pkg)
    assert len(found) == 2
    assert any("models/bad.py:2" in v and "mindsemantix.eval.baselines" in v for v in found)
    assert any("eval/bad.py:1" in v and "stages.pretrain" in v for v in found)


def test_models_import_without_lightning():
    """The model classes (and the pipeline's loading path) need no Lightning objects."""
    code = ("import sys; import mindsemantix.models.captioner, mindsemantix.models.latent_head, "
            "mindsemantix.models.diffusion; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
