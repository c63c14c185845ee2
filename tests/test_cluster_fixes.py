"""Defects a GPU-cluster user would hit first (issue "the cluster path works the first time"), each
checked on a CPU with tiny stand-ins: LoRA precision on a bf16 LLM, fp16 SD on a CPU, checkpoints
without frozen tensors, one `last`, the SLURM script, the set-up script's torch floor."""

from __future__ import annotations

import torch

from mindsemantix.models.llm_bridge import LLMBridge, tiny_random_causal_lm

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def test_lora_on_a_bf16_llm_trains_fp32_adapters_that_small_steps_move():
    llm, tokenizer = tiny_random_causal_lm()
    torch.manual_seed(0)
    bridge = LLMBridge(llm.to(torch.bfloat16), tokenizer, 16, lora=LORA)
    adapters = {n: p for n, p in bridge.named_parameters() if "lora_" in n}
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert bridge.llm_dtype == torch.bfloat16                          # the frozen LLM stays bf16
    with torch.no_grad():  # peft starts lora_B at 0, which leaves lora_A without gradient: as after some training
        for n, p in adapters.items():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in adapters.items()}
    lr = 5e-7
    opt = torch.optim.AdamW(list(adapters.values()), lr=lr, weight_decay=0.0)
    bridge.lm_loss(torch.randn(3, 4, 16), ["a red circle", "two blue squares", "a green star"]).backward()
    opt.step()
    for n, p in adapters.items():
        moved = p.grad != 0
        assert moved.float().mean() > 0.5, n
        # Adam's first step moves every entry with a gradient by lr: in bf16 most would round away
        torch.testing.assert_close((p.detach() - before[n])[moved].abs(), torch.full_like(p[moved], lr),
                                   rtol=0.1, atol=0)  # fp32 spacing near 0.1: ~7e-9
