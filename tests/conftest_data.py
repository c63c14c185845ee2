"""Helpers and fixtures for the data-recipe tests (imported by the test modules, not a conftest).

The simulated NSD-layout tree is expensive-ish (~10 s of CPU), so it is built once per test
session at a tiny size and shared by tests/test_toyworld.py and tests/test_nsd_recipe.py.
Tests that modify a tree work on a copy (`copy_tree`).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# 2 subjects on a coarse 7 mm grid (~400 ROI voxels each); subj01 completes both sessions,
# subj02 only the first (a trailing session absent, as in the release); both betas variants.
TINY_TOYWORLD = ["--seed", "3", "--subjects", "2", "--sessions", "2", "--incomplete", "2",
                 "--shared-images", "40", "--voxel-size", "7", "--betas-format", "both", "--quiet",
                 "--corpus-subjects", "0"]

_built: dict[tuple, Path] = {}


def load_recipe(name: str):
    """Import data_recipes/<name>.py as a module (the recipes are scripts, not a package)."""
    module_name = f"recipe_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "data_recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def build_toyworld(root: Path, args: list[str]) -> Path:
    """Build (once per argument list) a simulated tree under `root`."""
    key = tuple(args)
    if key not in _built:
        out = root / f"toyworld{len(_built)}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_recipe("toyworld").main(["--out", str(out), *args])
        _built[key] = out
    return _built[key]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def toyworld_tree(tmp_path_factory) -> Path:
    return build_toyworld(tmp_path_factory.getbasetemp() / "toyworld_trees", TINY_TOYWORLD)


@pytest.fixture(scope="session")
def toyworld_shards(toyworld_tree, tmp_path_factory) -> Path:
    """The tiny tree converted by the NSD recipe (nii.gz betas)."""
    out = tmp_path_factory.getbasetemp() / "toyworld_shards_nii"
    if not out.exists():
        load_recipe("nsd").main(["--nsd-root", str(toyworld_tree), "--out", str(out),
                                 "--betas-format", "nii.gz", "--samples-per-shard", "150", "--quiet"])
    return out
