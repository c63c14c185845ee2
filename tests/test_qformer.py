"""Brain Q-Former: attention masks, BERT initialisation, the representation losses, cross-rank gather."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from helpers import TINY_QFORMER, save_tiny_wordpiece_tokenizer

from mindsemantix.models.qformer import (BrainQFormer, FeatureQueue, QFormerConfig, contrastive_loss,
                                         gather_across_ranks, multimodal_causal_mask, representation_losses,
                                         sample_hard_negatives,
                                         vision_alignment_loss)

TINY = {**TINY_QFORMER, "dropout": 0.0}
CONCEPTS = ["a red circle", "a blue square", "two green stars", "a small pink heart", "a white cross on grass",
            "three yellow triangles"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return str(save_tiny_wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece")))


def tiny_qformer(tokenizer: str, brain_width: int = 24, vision_dim: int | None = None, seed: int = 0) -> BrainQFormer:
    torch.manual_seed(seed)
    return BrainQFormer(QFormerConfig(**TINY, tokenizer=tokenizer), brain_width=brain_width, vision_dim=vision_dim)


def concept_batch(n: int, generator: torch.Generator, brain_width: int = 24, n_tokens: int = 5, noise: float = 0.3):
    """Brain tokens that encode which of CONCEPTS was seen (a fixed random pattern per concept + noise)."""
    patterns = torch.randn(len(CONCEPTS), n_tokens, brain_width, generator=torch.Generator().manual_seed(123))
    ids = torch.randint(0, len(CONCEPTS), (n,), generator=generator)
    brain = patterns[ids] + noise * torch.randn(n, n_tokens, brain_width, generator=generator)
    return brain, [CONCEPTS[i] for i in ids], ids


def test_itg_mask_layout():
    text_mask = torch.tensor([[1, 1, 1, 0]])
    m = multimodal_causal_mask(text_mask, num_queries=2)[0, 0]            # (6, 6)
    assert m.shape == (6, 6)
    assert m[:2, :2].all() and not m[:2, 2:].any()                         # queries: queries only
    assert m[2:, :2].all()                                                 # text sees every query
    assert torch.equal(m[2:5, 2:5], torch.ones(3, 3, dtype=torch.bool).tril())  # text: causal
    assert not m[:, 5].any()                                               # padding is never a key


def test_attention_patterns_hold_in_the_model(tiny_tokenizer):
    model = tiny_qformer(tiny_tokenizer).eval()
    g = torch.Generator().manual_seed(0)
    brain, captions, _ = concept_batch(3, g)
    ids, mask = model.tokenize(captions)
    with torch.no_grad():
        alone = model.encode_brain(brain)
        q_itg, t_itg = model.encode_joint(brain, ids, mask, causal=True)
        changed = ids.clone()
        changed[:, 3] = model.tokenizer.convert_tokens_to_ids("blue")
        q_itg2, t_itg2 = model.encode_joint(brain, changed, mask, causal=True)
        q_itm, _ = model.encode_joint(brain, ids, mask, causal=False)
        q_itm2, _ = model.encode_joint(brain, changed, mask, causal=False)
    # ITG: queries cannot see text, so they equal the queries-only pass; text before position 3
    # cannot see position 3; text from position 3 on does change.
    torch.testing.assert_close(q_itg, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q_itg2, q_itg, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_itg2[:, :3], t_itg[:, :3], atol=1e-5, rtol=1e-5)
    assert (t_itg2[:, 3:] - t_itg[:, 3:]).abs().max() > 1e-3
    # ITM: queries and text see each other
    assert (q_itm2 - q_itm).abs().max() > 1e-3
    # the brain reaches the queries through cross-attention
    with torch.no_grad():
        other = model.encode_brain(brain + torch.randn(brain.shape, generator=g))  # (a constant shift would vanish in the LayerNorm)
    assert (other - alone).abs().max() > 1e-3


def test_text_side_initialised_from_minilm_reproduces_bert():
    """With text_init, the text stream of the first k layers *is* the first k layers of the BERT:
    the weight mapping (embeddings + segment 0, input LayerNorm, self-attention, FFN) is exact."""
    from mindsemantix.models.pretrained import MINILM, load_sentence_encoder

    cfg = QFormerConfig(num_queries=4, num_layers=2, text_init=MINILM, dropout=0.0, embed_dim=16)
    model = BrainQFormer(cfg, brain_width=24).eval()
    assert model.config.hidden_size == 384 and model.config.num_heads == 12
    bert = load_sentence_encoder(MINILM).model
    ids, mask = model.tokenize(["a red circle on the left", "two stars"])
    with torch.no_grad():
        ours = model.encode_text(ids, mask)
        theirs = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    # MiniLM is trained for mean pooling: its early [CLS] output is one vector for every caption, so
    # ITC must pool by mean here (text_pooling="mean"); BERT-base's [CLS] (BLIP-2) is informative
    cls = torch.nn.functional.cosine_similarity(ours[0, 0], ours[1, 0], dim=0)
    mean = torch.nn.functional.cosine_similarity(ours[0][real[0]].mean(0), ours[1][real[1]].mean(0), dim=0)
    assert cls > 0.999 and mean < 0.95
    # the query FFN starts from the same BERT FFN; cross-attention starts random
    layer = model.transformer.encoder.layer[0]
    torch.testing.assert_close(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert layer.has_cross_attention and not model.transformer.encoder.layer[1].has_cross_attention


def test_contrastive_targets_queue_and_same_image_positives():
    torch.manual_seed(0)
    E, Q = 8, 3
    brain = torch.nn.functional.normalize(torch.randn(4, Q, E), dim=-1)
    ids = torch.tensor([10, 11, 12, 13])
    queue = FeatureQueue(size=6, num_queries=Q, dim=E)
    # a perfect pairing (text = the first query's direction): loss near 0 in-batch
    first = contrastive_loss(brain, brain[:, 0], ids, torch.tensor(0.01), queue, label_smoothing=0.0)
    assert first.loss < 0.05 and first.accuracy == 1.0 and first.sim_b2o.shape == (4, 4)
    assert queue.brain.shape == (4, Q, E) and queue.ids.tolist() == [10, 11, 12, 13]
    # next step: each sample's copy in the queue is a second positive (target mass 1/2 each on two
    # equal logits -> loss log 2); were it a negative, the loss would be large
    again = contrastive_loss(brain, brain[:, 0], ids, torch.tensor(0.01), queue, label_smoothing=0.0)
    assert again.accuracy == 1.0
    assert abs(float(again.loss) - float(torch.log(torch.tensor(2.0)))) < 0.05
    assert queue.brain.shape[0] == 6 and queue.ids.tolist() == [10, 11, 12, 13, 10, 11]  # newest first, capped
    # label smoothing spreads target mass over the whole bank (BLIP-2: 0.1)
    smoothed = contrastive_loss(brain, brain[:, 0], ids, torch.tensor(0.01), None, label_smoothing=0.1)
    assert smoothed.loss > first.loss


def test_hard_negatives_are_other_images_and_favour_confusable_ones():
    ids = torch.tensor([0, 1, 2, 0])
    sim = torch.zeros(4, 4)
    sim[0, 2] = 20.0  # brain 0 is most confused with caption 2
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows, neg_text, neg_brain = sample_hard_negatives(sim, sim.T.clone(), ids, g)
        assert rows.tolist() == [0, 1, 2, 3]
        assert (ids[rows] != ids[neg_text]).all() and (ids[rows] != ids[neg_brain]).all()
        assert neg_text[0] == 2
    rows, *_ = sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([5, 5]))
    assert rows.numel() == 0  # nothing to contrast with


def test_representation_losses_fall_and_phase1_captions_name_the_concept(tiny_tokenizer):
    model = tiny_qformer(tiny_tokenizer, vision_dim=10)
    model.set_trainable(itc=True, itm=True, itg=True, vision=True)
    vision_table = torch.randn(len(CONCEPTS), 10, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    history = []
    for step in range(120):
        brain, captions, ids = concept_batch(12, g)
        out = representation_losses(model, brain, captions, ids, generator=g)
        vis = vision_alignment_loss(model, out.query_out, vision_table[ids], ids)
        loss = sum(out.losses.values()) + vis.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({**{k: v.item() for k, v in out.losses.items()}, "vision": vis.loss.item()})
    first = {k: sum(h[k] for h in history[:10]) / 10 for k in history[0]}
    last = {k: sum(h[k] for h in history[-10:]) / 10 for k in history[0]}
    for k in ("itc", "itm", "itg", "vision"):
        assert last[k] < 0.8 * first[k], (k, first[k], last[k])
    # the ITG decoder alone (no LLM) captions held-out brains: phase 1's own check
    model.eval()
    brain, captions, _ = concept_batch(12, g, noise=0.1)
    generated = model.generate(brain, max_length=10)
    assert sum(gen == ref for gen, ref in zip(generated, captions)) >= 9, list(zip(generated, captions))


def test_itg_vocabulary_shortlist_is_the_full_softmax_restricted_to_seen_tokens(tiny_tokenizer):
    torch.manual_seed(0)
    model = BrainQFormer(QFormerConfig(**TINY, tokenizer=tiny_tokenizer, itg_vocab="seen"), brain_width=24).train()
    brain, captions, ids = concept_batch(6, torch.Generator().manual_seed(0))
    out = representation_losses(model, brain, captions, ids, itc=False, itm=False, itg=True)
    input_ids, mask = model.tokenize(captions)
    assert set(model.seen_tokens.nonzero().squeeze(1).tolist()) == set(input_ids[mask.bool()].tolist())
    # the same loss from full logits with the unseen columns removed
    vocab = model.lm_vocabulary()
    dec = input_ids.clone()
    dec[:, 0] = model.decoder_bos_id
    _, text_out = model.encode_joint(brain, dec, mask, causal=True)
    full = model.lm_logits(text_out[:, :-1])[..., vocab]
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    remapped = torch.where(labels == -100, labels, torch.searchsorted(vocab, labels.clamp_min(0)))
    expected = torch.nn.functional.cross_entropy(full.flatten(0, 1), remapped.flatten(), ignore_index=-100,
                                                 label_smoothing=model.config.label_smoothing)
    torch.testing.assert_close(out.losses["itg"], expected)
    assert all(set(c.split()) <= set(" ".join(CONCEPTS).split()) for c in model.eval().generate(brain, 6))


def test_set_trainable_freezes_what_the_losses_cannot_reach(tiny_tokenizer):
    model = tiny_qformer(tiny_tokenizer)
    model.set_trainable(itc=False, itm=False, itg=False, vision=False)  # the generative phase
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "query_tokens" in trainable
    assert "transformer.encoder.layer.0.crossattention.attention.query.weight" in trainable
    assert "transformer.encoder.layer.0.intermediate_query.dense.weight" in trainable
    assert "transformer.encoder.layer.0.attention.output.dense.weight" in trainable  # shared self-attention
    assert not any(n.startswith(("text_embeddings", "itm_head", "lm_", "text_proj")) for n in trainable)
    assert "transformer.encoder.layer.0.intermediate.dense.weight" not in trainable
    # and what stays trainable really gets gradients from the query path alone
    brain, _, _ = concept_batch(2, torch.Generator().manual_seed(0))
    model.encode_brain(brain).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


# -- two processes (gloo): negatives gathered across ranks -------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    brain = torch.nn.functional.normalize(torch.randn(5, 3, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    ids = torch.arange(5)
    sizes = [3, 2]  # unequal batches, as a short last batch gives
    local = slice(0, 3) if rank == 0 else slice(3, 5)
    b = brain[local].clone().requires_grad_(True)
    gathered, offset = gather_across_ranks(b)
    loss = contrastive_loss(b, text[local], ids[local], torch.tensor(0.1), None, label_smoothing=0.0).loss
    loss.backward()
    out[rank] = {"gathered": gathered.detach(), "offset": offset, "loss": float(loss) * sizes[rank],
                 "grad": b.grad is not None and b.grad.abs().sum().item() > 0}
    dist.destroy_process_group()


def test_negatives_gathered_across_two_ranks_equal_one_big_batch():
    torch.manual_seed(0)
    brain = torch.nn.functional.normalize(torch.randn(5, 3, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    single = contrastive_loss(brain, text, torch.arange(5), torch.tensor(0.1), None, label_smoothing=0.0).loss
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gather_worker, args=(_free_port(), out), nprocs=2, join=True)
        out = dict(out)
    for rank in (0, 1):
        torch.testing.assert_close(out[rank]["gathered"], brain)
        assert out[rank]["grad"]
    assert (out[0]["offset"], out[1]["offset"]) == (0, 3)
    # per-rank losses (mean over local rows) weighted by rows = the single-process loss over all rows
    torch.testing.assert_close(torch.tensor((out[0]["loss"] + out[1]["loss"]) / 5), single, atol=1e-5, rtol=1e-5)
