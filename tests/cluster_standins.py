"""Tiny local stand-ins for the hub models of `stages/cluster/*.yaml`: the same model classes and the
same file layouts as the real downloads, at test size, so that the cluster configs run on a CPU in
seconds (tests/test_cluster_configs.py, scripts/gpu_check.sh).

| cluster config names                         | stand-in                                                    |
|----------------------------------------------|-------------------------------------------------------------|
| `lmsys/vicuna-7b-v1.5` (Llama)               | LlamaForCausalLM; tokenizer = a SentencePiece `tokenizer.model` only (no tokenizer.json); weights in `.bin` shards + index |
| `bert-base-uncased`                          | 12-layer BertModel; `vocab.txt` with BERT's layout ([PAD] 0, [unused0..98], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103) |
| `openai/clip-vit-large-patch14`              | a full CLIPModel + ViT-L/14's `preprocessor_config.json`     |
| `stable-diffusion-v1-5/stable-diffusion-v1-5` | SD 1.5's components: 4-level VAE (x8), UNet, CLIP text encoder + BPE tokenizer, PNDM scheduler, safety checker + feature extractor |

Random weights: for running the configs, never for results.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

# Words of the tiny datasets' captions (tests/conftest.make_tiny_dataset) and a few more.
WORDS = ["image", "caption", "a", "photo", "of", "the", "short", "description", "red", "blue", "circle", "square"]
CORPUS = [f"image {i} caption {k}" for i in range(40) for k in range(5)] + [
    "A short image description: a red circle", "a photo of a blue square", "the image of a red square"] * 5


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


def save_bin_shards(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> None:
    """`pytorch_model-0000i-of-0000n.bin` + `pytorch_model.bin.index.json`, as older hub checkpoints
    (Vicuna v1.5) ship: plain tensors, so they load with torch.load(weights_only=True)."""
    keys = sorted(state)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k].contiguous().clone() for k in keys[i::shards]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    write_json(folder / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def make_llama(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A Vicuna-shaped folder: config.json, generation_config.json, a SentencePiece BPE
    `tokenizer.model` (unk 0, <s> 1, </s> 2, as Llama's) with LlamaTokenizer's config, .bin shards."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model_bytes, model_type="bpe",
                                   vocab_size=120, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   add_dummy_prefix=True, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model_bytes.getvalue())
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 4096})
    write_json(folder / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    config = LlamaConfig(vocab_size=120, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="float16")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_bin_shards({k: v.half() for k, v in model.state_dict().items()}, folder)  # Vicuna ships fp16
    return folder


def bert_vocab(words: list[str]) -> list[str]:
    """bert-base-uncased's layout: [PAD], [unused0..98], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103,
    more [unused], then single characters, then words and ##-pieces."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1) if not chr(c).isupper()]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 103)] + chars + [f"##{c}" for c in chars if c.isalnum()]
    vocab += [w for w in dict.fromkeys(w.lower() for w in words) if w not in vocab]
    return vocab


def make_bert(folder: Path, hidden: int = 32, layers: int = 12, seed: int = 0) -> Path:
    """A bert-base-uncased-shaped folder: config.json, vocab.txt, tokenizer_config.json, weights."""
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = bert_vocab(WORDS + [w for s in CORPUS for w in s.lower().replace(":", " :").split()])
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    write_json(folder / "tokenizer_config.json", {"do_lower_case": True, "model_max_length": 512,
                                                  "tokenizer_class": "BertTokenizer"})
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder


# openai/clip-vit-large-patch14's preprocessor_config.json
CLIP_PREPROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                     "feature_extractor_type": "CLIPFeatureExtractor",
                     "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                     "resample": 3, "size": 224}


def tiny_clip_config(projection_dim: int = 16):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": projection_dim},
        vision_config={"image_size": 224, "patch_size": 32, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": projection_dim},
        projection_dim=projection_dim)  # in both towers' configs too, as the hub's config.json has it


def make_clip(folder: Path, seed: int = 0) -> Path:
    """A clip-vit-large-patch14-shaped folder: a full CLIPModel (text and vision towers) + its preprocessor."""
    from transformers import CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config()).save_pretrained(folder)
    write_json(folder / "preprocessor_config.json", CLIP_PREPROCESSOR)
    return folder


def make_sd15(folder: Path, resolution: int = 64, seed: int = 0) -> Path:
    """An SD-1.5-shaped diffusers folder: 4-level VAE (x8 downsampling), UNet with cross-attention, CLIP
    text encoder with the real CLIP BPE tokenizer (77 tokens), PNDM scheduler as SD 1.5 ships it, and
    a safety checker + feature extractor (which our loader skips)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    from mindsemantix.models.diffusion import SmallSDConfig, small_stable_diffusion

    config = SmallSDConfig(resolution=resolution, vae_channels=(8, 8, 16, 16), unet_channels=(16, 32),
                           attention_head_dim=8, text_time_conditioning=False, prediction_type="epsilon",
                           text_width=16, text_layers=1, text_heads=2, norm_groups=8, max_length=77)
    pipe = small_stable_diffusion(config, seed=seed)
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(tiny_clip_config(projection_dim=768))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                            scheduler=scheduler, safety_checker=checker,
                            feature_extractor=CLIPImageProcessor(**CLIP_PREPROCESSOR),
                            requires_safety_checker=True).save_pretrained(folder)
    return folder


def make_all(root: Path) -> dict[str, str]:
    """All four stand-ins under `root`: {hub id as the cluster configs name it: local folder}."""
    return {"lmsys/vicuna-7b-v1.5": str(make_llama(root / "vicuna")),
            "bert-base-uncased": str(make_bert(root / "bert")),
            "openai/clip-vit-large-patch14": str(make_clip(root / "clip")),
            "stable-diffusion-v1-5/stable-diffusion-v1-5": str(make_sd15(root / "sd15"))}


def make_cluster_inputs(root: Path) -> dict[str, str]:
    """The stand-ins, tiny NSD-like and HCP-like shard datasets and a runs folder, keyed by the names the
    cluster configs use (hub ids, `data/nsd/shards`, `data/hcp/shards`, `runs/nsd`)."""
    from conftest import make_tiny_dataset

    paths = make_all(root / "hub")
    images = {"train": 10, "val": 3, "test": 3}
    paths["data/nsd/shards"] = str(make_tiny_dataset(root / "nsd", n_images=images, image_size=16))
    paths["data/hcp/shards"] = str(make_tiny_dataset(root / "hcp", subjects={"sub-01": 45}, n_images=images,
                                                     captions=False, image_size=None, dataset="hcp"))
    paths["runs/nsd"] = str(root / "runs")
    return paths
