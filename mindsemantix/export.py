"""Stage hand-off (docs/formats.md, section 3): an export is a folder with `config.json` and
`model.safetensors` holding the trained parts only — never frozen LLM / Stable Diffusion weights.

The folder is written atomically (see `mindsemantix.io.atomic_dir`), so an interrupted export never
leaves a folder that loads as valid; `load_export` checks that both files exist and parse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mindsemantix.io import atomic_dir, read_format_json

EXPORT_FORMAT = "mindsemantix-export/1"


class ExportError(RuntimeError):
    pass


def save_export(folder: str | Path, kind: str, config: dict[str, Any],
                tensors: dict[str, torch.Tensor]) -> Path:
    """Write `folder/config.json` (`{"format", "kind", **config}`) and `folder/model.safetensors`.

    `kind` names what the export holds (e.g. "brain_encoder", "brain_qformer"), so a stage that is
    pointed at the wrong export fails with a clear message.
    """
    folder = Path(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": EXPORT_FORMAT, "kind": kind})
        # config.json last: its presence marks a complete folder even for non-atomic copies.
        (tmp / "config.json").write_text(json.dumps({"format": EXPORT_FORMAT, "kind": kind, **config}, indent=2) + "\n")
    return folder


def load_export(folder: str | Path, kind: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return `(config, tensors)` of an export folder, checking it is complete and of `kind`."""
    folder = Path(folder)
    cfg_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not folder.is_dir():
        raise ExportError(f"export folder {folder} does not exist")
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise ExportError(f"export {folder} is incomplete: {p.name} is missing")
    config = read_format_json(cfg_path, EXPORT_FORMAT, ExportError, f"export {folder}: config.json")
    if kind is not None and config.get("kind") != kind:
        raise ExportError(f"export {folder} holds a {config.get('kind')!r}, expected a {kind!r}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"export {folder}: model.safetensors is unreadable ({e})") from e
    return config, tensors


# -- references between exports -------------------------------------------------------------------
# An export that reads another folder (stage 2 -> the stage-1 export, stage 3 -> the stage-2 export
# and a local Stable Diffusion) records it relative to itself, starting with "./" or "../", so a run
# folder (or a bundle) can move as a whole. Anything else is a hub id or a registry name, kept as is.


def reference(target: str | Path, folder: str | Path) -> str:
    """How an export in `folder` records `target`: a path relative to `folder` where `target` is a
    local folder, else `target` unchanged (a hub id, `offline:...`)."""
    if not Path(target).exists():
        return str(target)
    rel = os.path.relpath(Path(target).resolve(), Path(folder).resolve())
    return rel if rel.startswith("..") else f"./{rel}"


def resolve_reference(value: str, folder: str | Path) -> str:
    """Inverse of `reference`: a recorded "./" / "../" path, relative to `folder`, as an absolute
    path; anything else (a hub id; an absolute or working-directory path of older exports) as is."""
    if value.startswith(("./", "../")) or value in (".", ".."):
        return str((Path(folder) / value).resolve())
    return value
