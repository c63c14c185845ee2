"""Shared by several test files: the CLI in a subprocess, the tiny Q-Former and Stable Diffusion
settings, and tiny stage exports (stage 1, stage 2, a random SD) over a tiny dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# A 2-layer, 32-wide Q-Former with 4 queries: seconds per test on a CPU.
TINY_QFORMER = dict(num_queries=4, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, embed_dim=16,
                    max_text_length=12)


def tiny_sd_config():
    """A random Stable Diffusion of 16 px images (VAE, UNet and text encoder of a few thousand weights)."""
    from mindsemantix.models.diffusion import SmallSDConfig

    return SmallSDConfig(resolution=16, vae_channels=(8, 16), unet_channels=(16, 32), attention_head_dim=8,
                         text_width=16, text_layers=1, text_heads=2, norm_groups=8)


def run_cli(*args: str, expect_rc: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m mindsemantix.cli ARGS` with this checkout (and tests/, for the probe callbacks) first
    on the path and one thread; asserts the exit status and returns the finished process."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mindsemantix.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == expect_rc, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def save_tiny_wordpiece_tokenizer(folder, words=None):
    """Write a BERT-style WordPiece tokenizer over a few words (default: the tiny LLM's) to `folder`:
    its ~70-entry vocabulary makes the ITG head ~400x cheaper than BERT's 30522. Returns the folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from mindsemantix.models.llm_bridge import TINY_WORDS

    specials = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words or TINY_WORDS) - set(specials)))}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    return folder


def write_tiny_exports(root: Path, data: Path | str, *, subjects: list[str] | None = None, words: list[str] = (),
                       qformer: dict | None = None, align: bool = True, sd: bool = True) -> dict:
    """Write into `root`: `stage1/`, a random tiny stage-1 export (seed 0) that knows `subjects` of
    the dataset `data` (default: all); `wordpiece/`, a tiny tokenizer of `words` + "image", "caption",
    "0".."29"; with `align`, `align/`, a stage-2 export over both with the Q-Former settings `qformer`
    (default TINY_QFORMER); with `sd`, `sd/`, a random tiny SD (`tiny_sd_config`, seed 0).
    Returns the paths as strings and the Q-Former settings with the tokenizer filled in."""
    from mindsemantix.data.datamodule import BrainDataModule
    from mindsemantix.models.brain_encoder import BrainEncoder, BrainEncoderConfig
    from mindsemantix.models.diffusion import small_stable_diffusion
    from mindsemantix.stages.align import BrainAlign

    dm = BrainDataModule(str(data), batch_size=4)
    dm.setup()
    torch.manual_seed(0)
    encoder = BrainEncoder(BrainEncoderConfig.preset("tiny"), with_decoder=False)
    for subject, info in dm.subject_info().items():
        if subjects is None or subject in subjects:
            encoder.add_subject(subject, info.coords_mm)
    encoder.save_pretrained(root / "stage1")
    tokenizer = save_tiny_wordpiece_tokenizer(root / "wordpiece",
                                              words=list(words) + ["image", "caption"] + [str(i) for i in range(30)])
    out = {"stage1": str(root / "stage1"), "tokenizer": str(tokenizer),
           "qformer": {**(TINY_QFORMER if qformer is None else qformer), "tokenizer": str(tokenizer)}}
    if align:
        BrainAlign(brain_encoder=out["stage1"], qformer=out["qformer"]).save_export(root / "align")
        out["align"] = str(root / "align")
    if sd:
        small_stable_diffusion(tiny_sd_config(), seed=0).save_pretrained(root / "sd")
        out["sd"] = str(root / "sd")
    return out
