"""Sharded training for stage 2 when a frozen LLM does not fit one GPU beside the rest.

`LLMFSDPStrategy` is Lightning's FSDPStrategy made configurable from YAML: the transformer block
classes to shard are named by import path (the LLM's decoder layer), and `use_orig_params` is on,
because one module holds frozen (LLM) and trainable (Q-Former, projection, LoRA) parameters.

    trainer:
      strategy:
        class_path: mindsemantix.distributed.LLMFSDPStrategy
        init_args: {wrap: [transformers.models.llama.modeling_llama.LlamaDecoderLayer]}

Each GPU then holds 1/N of every wrapped layer's weights (gathered layer by layer in the forward
pass) instead of the whole LLM. Checkpoints are gathered in full on rank 0 (`state_dict_type:
full`) and, as under DDP, never contain the frozen LLM (StageModule drops it).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Sequence

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

log = logging.getLogger(__name__)
LLAMA_LAYER = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"


def import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"LLMFSDPStrategy.wrap: cannot import {path!r} ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"LLMFSDPStrategy.wrap: {path!r} is not an nn.Module class")
    return cls


class LLMFSDPStrategy(FSDPStrategy):
    """FSDP over the LLM's decoder layers. `wrap`: import paths of the layer classes to shard (Llama /
    Vicuna / SmolLM2: LlamaDecoderLayer; OPT: transformers.models.opt.modeling_opt.OPTDecoderLayer).
    `activation_checkpointing`: also recompute those layers' activations in the backward pass."""

    def __init__(self, wrap: Sequence[str] = (LLAMA_LAYER,), activation_checkpointing: bool = False,
                 sharding_strategy: str = "FULL_SHARD", **kwargs: Any):
        layers = {import_class(path) for path in wrap}
        kwargs.setdefault("use_orig_params", True)
        super().__init__(auto_wrap_policy=layers, sharding_strategy=sharding_strategy,
                         activation_checkpointing_policy=layers if activation_checkpointing else None, **kwargs)
        self.wrapped_layers = layers
        log.warning("LLMFSDPStrategy is experimental: never run on GPUs here, and checkpoints / the stage-2 export "
                    "are not expected to work under FSDP yet (see stages/cluster/align_fsdp.yaml)")
