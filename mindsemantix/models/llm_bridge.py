"""Stage 2's generative half: a frozen causal LLM fed the Q-Former's query outputs as a soft prompt.

    query outputs (B, Q, H_qformer) --group g adjacent queries--> (B, Q/g, g*H_qformer)
                                     --Linear--> (B, Q/g, H_llm)          (g = query_group, BLIP-2: 1)
    inputs_embeds = [BOS] [Q/g soft-prompt vectors] [prompt tokens] [caption tokens] [EOS] [pad ...]
    labels        = -100   -100 ...               -100 ...        caption ids      EOS   -100 ...

As in BLIP-2 (OPT / FlanT5) and InstructBLIP (Vicuna): only the projection (and optional LoRA
adapters) train; the LLM's own weights are frozen and never enter a checkpoint or export (see
`exclude_frozen_weights`). Any `AutoModelForCausalLM` works: everything goes through
`inputs_embeds`, `get_input_embeddings()` and `generate()`.

`query_group` > 1 concatenates groups of adjacent queries into one soft-prompt vector: the same
information in a g-times shorter prefix. The LLM's cost grows with the sequence length, and on a CPU
the prefix can be most of it (BLIP-2's 32 queries against a ~15-token caption).
The projection starts at the scale of the LLM's own word embeddings, so that the soft prompt
neither drowns the text nor vanishes in it at the first step.

The prefix (BOS, soft prompt, prompt) has the same length for every sample, so training pads
captions on the right and generation needs no padding at all. The LM head runs only at the
caption positions (`logits_to_keep`), which saves a good part of the step on a CPU: the head is a
(vocab x width) product per position, as large as several transformer layers for a small LLM.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GenerationSettings:
    """How captions are generated (`LLMBridge.generate`, and `BrainCaptioner.caption`'s reranking).

    Args:
        max_new_tokens: most tokens per caption.
        min_new_tokens: fewest tokens per caption (EOS is held back until then).
        num_beams: beam width; 1 is greedy (or sampling with do_sample).
        do_sample: sample instead of searching (temperature, top_p, top_k apply then).
        temperature: sampling temperature.
        top_p: nucleus sampling: the smallest set of tokens with this much probability.
        top_k: sample among the k likeliest tokens (null: all).
        repetition_penalty: > 1 makes repeated tokens less likely.
        length_penalty: beam search's exponent on the length (> 1 favours longer captions).
        use_cache: keep the LLM's key/value cache while generating (faster, same result).
        generator_seed: seed for sampling (null: the current random state).
        rerank: > 1: the LLM proposes this many captions (its best beams, or samples with do_sample)
            and the one the Q-Former scores as the best match to the brain response is kept.
        rerank_by: the Q-Former's score for reranking: "itc" (brain-text similarity) or "itm" (its
            matching head, only where a phase trained it).
    """

    max_new_tokens: int = 30
    min_new_tokens: int = 1
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    use_cache: bool = True
    generator_seed: int | None = None
    rerank: int = 0
    rerank_by: Literal["itc", "itm"] = "itc"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on the frozen LLM (the fields of peft's `LoraConfig` that we set; the defaults are peft's).

    Args:
        r: rank of each adapter.
        lora_alpha: scale of the adapters' output (alpha / r).
        lora_dropout: dropout on the adapters' input.
        target_modules: names of the LLM's linear layers that get adapters, e.g. [q_proj, v_proj]
            (null: peft's choice for the model type).
        bias: which biases train: "none", "all" or "lora_only".
    """

    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"


def exclude_frozen_weights(module: nn.Module) -> nn.Module:
    """Keep `module`'s frozen weights out of every `state_dict()` of the models that contain it
    (Lightning checkpoints, exports) and let such a state dict load back without them.

    Frozen = parameters with requires_grad=False, decided when the state dict is taken (so LoRA
    adapters or an unfrozen subject layer stay in). Buffers go out too when none of the module's
    parameters trains. On load, keys missing for that reason are not reported as missing: the
    weights come from where they were loaded from (hub id, path, stage-1 export)."""

    def frozen_keys() -> set[str]:
        params = dict(module.named_parameters(remove_duplicate=False))  # tied weights under every name
        keys = {n for n, p in params.items() if not p.requires_grad}
        if len(keys) == len(params):
            keys |= {n for n, _ in module.named_buffers(remove_duplicate=False)}
        return keys

    def drop(mod: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        for k in frozen_keys():
            state_dict.pop(prefix + k, None)

    def allow_missing(mod: nn.Module, incompatible_keys) -> None:
        # The hook is not told the module's prefix: match full keys by suffix at a '.' boundary.
        frozen = frozen_keys()
        missing = incompatible_keys.missing_keys
        for key in list(missing):
            parts = key.split(".")
            if any(".".join(parts[i:]) in frozen for i in range(len(parts))):
                missing.remove(key)

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_post_hook(allow_missing)
    return module


class LLMBridge(nn.Module):
    """Projection of query outputs into a frozen causal LLM, its LM loss and caption generation.

    llm, tokenizer: from `pretrained.load_causal_lm`. query_width: the Q-Former's hidden size.
    prompt: text after the soft prompt (e.g. "A photo of"); "" for none. lora: None, or LoraConfig
    fields (r, lora_alpha, lora_dropout, target_modules) for adapters injected through peft.
    query_group: adjacent queries per soft-prompt vector (must divide the number of queries).
    """

    def __init__(self, llm: nn.Module, tokenizer, query_width: int, prompt: str = "", add_bos: bool = True,
                 max_caption_tokens: int = 32, lora: dict[str, Any] | None = None, query_group: int = 1):
        super().__init__()
        if query_group < 1:
            raise ValueError(f"query_group must be >= 1, got {query_group}")
        self.query_group = int(query_group)
        self.tokenizer = tokenizer
        self.prompt, self.max_caption_tokens = prompt, int(max_caption_tokens)
        llm.requires_grad_(False)
        if lora:
            from peft import LoraConfig, inject_adapter_in_model

            inject_adapter_in_model(LoraConfig(**lora), llm)
            for name, p in llm.named_parameters():
                p.requires_grad_("lora_" in name)
                if "lora_" in name and p.is_floating_point():
                    # peft creates adapters in the LLM's dtype. bf16 weights have no fp32 master copy:
                    # AdamW's small steps (lr * ~1) round away against a bf16 entry. fp32 adapters keep
                    # them; autocast (bf16-mixed) computes in bf16, and peft casts around them otherwise.
                    p.data = p.data.float()
        self.llm = exclude_frozen_weights(llm)
        embed = llm.get_input_embeddings()
        self.proj = nn.Linear(query_width * self.query_group, embed.embedding_dim)
        with torch.no_grad():  # unit-variance inputs (LayerNorm-ed queries) -> the word embeddings' spread
            nn.init.normal_(self.proj.weight, std=float(embed.weight.float().std()) / (query_width * self.query_group) ** 0.5)
            self.proj.bias.zero_()

        if tokenizer.eos_token_id is None:
            raise ValueError("the LLM tokenizer defines no eos_token; captions need an end marker")
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        self.register_buffer("bos_ids", torch.tensor(bos, dtype=torch.long), persistent=False)
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids, dtype=torch.long), persistent=False)
        self._keeps_logits = "logits_to_keep" in inspect.signature(llm.forward).parameters

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def prefix_length(self, num_queries: int) -> int:
        return len(self.bos_ids) + num_queries // self.query_group + len(self.prompt_ids)

    def prefix_embeds(self, query_out: Tensor) -> Tensor:
        """(B, Q, H_q) -> (B, L0, H_llm): [BOS] [projected query groups] [prompt]."""
        B, Q, H = query_out.shape
        if Q % self.query_group:
            raise ValueError(f"query_group {self.query_group} does not divide the {Q} queries")
        grouped = query_out.reshape(B, Q // self.query_group, self.query_group * H)            # (B, Q/g, g*H_q)
        embed = self.llm.get_input_embeddings()
        soft = self.proj(grouped).to(self.llm_dtype)                                          # (B, Q/g, H_llm)
        before = embed(self.bos_ids).expand(B, -1, -1)                                        # (B, 0|1, H_llm)
        after = embed(self.prompt_ids).expand(B, -1, -1)                                      # (B, P, H_llm)
        return torch.cat([before.to(soft.dtype), soft, after.to(soft.dtype)], dim=1)

    def tokenize_captions(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """-> caption ids (B, C) each ending in EOS and right-padded, and their mask (B, C)."""
        ids = self.tokenizer([c.strip() for c in captions], add_special_tokens=False, truncation=True,
                             max_length=self.max_caption_tokens - 1)["input_ids"]
        ids = [x + [self.eos_id] for x in ids]
        C = max(len(x) for x in ids)
        out = torch.full((len(ids), C), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), C, dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return out.to(device), mask.to(device)

    def build_inputs(self, query_out: Tensor, captions: list[str]) -> dict[str, Tensor]:
        """Teacher-forcing inputs: inputs_embeds (B, L0 + C, H), attention_mask and labels (B, L0 + C);
        labels are -100 on BOS, queries, prompt and padding."""
        prefix = self.prefix_embeds(query_out)                                                # (B, L0, H)
        B, L0 = prefix.shape[:2]
        cap_ids, cap_mask = self.tokenize_captions(captions, prefix.device)                   # (B, C)
        cap_embeds = self.llm.get_input_embeddings()(cap_ids).to(prefix.dtype)
        labels = torch.cat([torch.full((B, L0), -100, dtype=torch.long, device=prefix.device),
                            cap_ids.masked_fill(cap_mask == 0, -100)], dim=1)
        return {"inputs_embeds": torch.cat([prefix, cap_embeds], dim=1),
                "attention_mask": torch.cat([cap_mask.new_ones(B, L0), cap_mask], dim=1),
                "labels": labels, "prefix_length": torch.tensor(L0)}

    def lm_loss(self, query_out: Tensor, captions: list[str]) -> Tensor:
        """Mean next-token cross-entropy over caption tokens (EOS included)."""
        inputs = self.build_inputs(query_out, captions)
        L0 = int(inputs["prefix_length"])
        caption_labels = inputs["labels"][:, L0:]                                             # (B, C)
        C = caption_labels.shape[1]
        kwargs = {"logits_to_keep": C + 1} if self._keeps_logits else {}
        logits = self.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                          use_cache=False, **kwargs).logits
        # position L0-1+j predicts caption token j; the last position predicts nothing
        logits = logits[:, -(C + 1):-1]                                                      # (B, C, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), caption_labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate(self, query_out: Tensor, max_new_tokens: int = 30, min_new_tokens: int = 1, num_beams: int = 1,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                 repetition_penalty: float = 1.0, length_penalty: float = 1.0, use_cache: bool = True,
                 generator_seed: int | None = None, num_return_sequences: int = 1) -> list[str]:
        """Captions for a batch of query outputs, through `generate(inputs_embeds=...)` (KV cache on
        by default). Greedy by default; `num_beams > 1` for beam search; `do_sample` for sampling
        (temperature / top_p / top_k; `generator_seed` makes it repeatable). With
        `num_return_sequences` = K > 1: B*K captions, sample i's candidates at [i*K, (i+1)*K)."""
        from transformers import GenerationConfig

        prefix = self.prefix_embeds(query_out)                                                # (B, L0, H)
        config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                                  do_sample=do_sample, temperature=temperature if do_sample else None,
                                  top_p=top_p if do_sample else None, top_k=top_k if do_sample else None,
                                  repetition_penalty=repetition_penalty,
                                  length_penalty=length_penalty if num_beams > 1 else None,
                                  eos_token_id=self.eos_id, pad_token_id=self.pad_id, use_cache=use_cache,
                                  num_return_sequences=num_return_sequences)
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        out = self.llm.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long,
                                                                                device=prefix.device),
                                generation_config=config)
        # decoder-only models given only inputs_embeds return just the new tokens
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


__all__ = ["LLMBridge", "GenerationSettings", "LoraSettings", "exclude_frozen_weights"]


# ----------------------------------------------------------------------------------------------
# A tiny random LLM for tests and dry runs (never for results)
# ----------------------------------------------------------------------------------------------

TINY_WORDS = ("a an the two three of on in at to and is with colored "
              "red orange yellow green blue purple pink white gray black "
              "circle circles square squares triangle triangles star stars cross crosses heart hearts "
              "small large big little top bottom left right center middle corner side background "
              "grass striped above below over under beside next").split()


def tiny_random_causal_lm(words: list[str] | tuple[str, ...] = TINY_WORDS, hidden_size: int = 32,
                          num_layers: int = 2, seed: int = 0):
    """(model, tokenizer): a randomly initialised 2-layer Llama over a whitespace word vocabulary,
    with <s>, </s>, <pad>, <unk>. Same interfaces as a real `AutoModelForCausalLM`, at test speed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                         pad_token_id=vocab["<pad>"], tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


__all__ += ["tiny_random_causal_lm", "TINY_WORDS"]
