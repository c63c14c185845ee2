"""The model card (`README.md`) written into every bundle: what the model is, what it was trained
on, how well it did beside the baselines, how to use it, and its limits."""

from __future__ import annotations

from typing import Any


def _size(module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def _metrics_table(evaluation: dict[str, Any] | None) -> str:
    if not evaluation or not evaluation.get("model"):
        return "No evaluation was found beside the run (`make eval` writes `reports/<run>/eval.json`).\n"
    model, baselines = evaluation["model"], evaluation.get("baselines") or {}
    names = sorted(baselines)
    rows = ["| metric | model | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for metric, value in model.items():
        if isinstance(value, (int, float)):
            cells = [f"{baselines[b][metric]:.3f}" if isinstance(baselines[b], dict) and isinstance(baselines[b].get(metric), (int, float))
                     else "" for b in names]
            rows.append(f"| {metric} | {value:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def model_card(index: dict[str, Any], captioner, head) -> str:
    card, settings = index.get("card") or {}, index.get("settings") or {}
    data = card.get("data") or {}
    subjects = ", ".join(sorted(index["subjects"]))
    llm = (captioner.llm.name if captioner.llm else "none (the Q-Former's own decoder writes captions)")
    enc = captioner.brain_encoder.config
    return f"""---
library_name: mindsemantix
tags: [fmri, brain-decoding, captioning, stable-diffusion]
---
# MindSemantix model{f" — run `{card['run']}`" if card.get("run") else ""}

A brain-language model (MindSemantix, arXiv 2405.18812): fMRI -> caption -> image.

## Trained on
- data: `{data.get('dataset', 'unknown')}`, subjects {', '.join(data.get('subjects', [])) or subjects}; samples per split {data.get('samples', {})}
- decodes subjects: **{subjects}** (each has its own input layers, trained on its own scans; another
  subject's data cannot be decoded until input layers are trained for it)

## Parts
| part | what | size |
|---|---|---|
| brain encoder | transformer, width {enc.width}, depth {enc.depth} (stage-1 MAE) | {_size(captioner.brain_encoder)} |
| Brain Q-Former | {captioner.qformer.config.num_queries} queries, {captioner.qformer.config.num_layers} layers | {_size(captioner.qformer)} |
| LLM (frozen) | `{llm}` | {_size(captioner.bridge.llm) if captioner.bridge is not None else "-"} |
| latent head | brain -> VAE latent {list(head.latent_shape) if head is not None else "-"} | {_size(head) if head is not None else "-"} |
| Stable Diffusion (frozen) | `{index.get('diffusion')}`; img2img strength {settings.get('sampling', {}).get('strength')}, mean of {settings.get('n_candidates', 1)} samples | - |

## Evaluation (the run's test split)
{_metrics_table(card.get("eval"))}
## Use
```bash
mindsemantix decode --model THIS_FOLDER --subject {sorted(index['subjects'])[0]} --betas betas_session01.nii.gz --out decoded/
```
```python
from mindsemantix.pipeline import MindSemantixPipeline
pipe = MindSemantixPipeline.from_pretrained("THIS_FOLDER")
out = pipe(fmri, subject="{sorted(index['subjects'])[0]}")   # fmri: (N, voxels), z-scored per session
```
Inputs are betas in the subject's own space and ROI (`subjects/<subject>.nii.gz`), normalised as in
training: percent signal change, each voxel z-scored within each session (`docs/decode.md`).

## Intended use and limits
Research on brain decoding. Subject-specific: it decodes only the subjects above. Captions and
images reflect what the training data could teach: a model trained on a simulated study decodes
only that study's kind of scenes. Not for clinical or forensic use.
"""
