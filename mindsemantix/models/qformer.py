"""Stage 2 model: the Brain Q-Former (BLIP-2's querying transformer, fed brain tokens, not image patches).

    brain tokens (B, N, D) from the stage-1 encoder --LayerNorm--------------------+
                                                                                   | keys/values
    learned queries (Q, H) --[self-attn]--[cross-attn, every 2nd layer]--[query FFN]--> query outputs (B, Q, H)
                                 | shared
    caption ids (B, T) ------[self-attn]--------------------------------[text FFN]--> text outputs (B, T, H)

One transformer carries both streams (transformers' `Blip2QFormerModel`: it takes the queries and
text as one sequence, applies cross-attention and the query FFN to the first `query_length`
positions only, and accepts a ready (B, 1, L, L) attention mask). What the streams may see is set by
the attention mask, as in BLIP-2:

    ITC (contrastive)  queries alone | text alone            brain <-> text in a joint 256-d space
    ITM (matching)     queries + text, fully bidirectional   does this caption belong to this brain?
    ITG (generation)   queries see queries only; text sees all queries and the text before it

Because in the ITG mask the queries cannot see the text, the query outputs of the ITG pass equal
those of a queries-only pass; `representation_losses` uses one pass for both (BLIP-2 gets the same
saving from its query key/value cache).

Text side: BLIP-2 initialises the Q-Former from BERT-base; here `text_init` can name any BERT-family
encoder (hub id, path, or `offline:all-minilm-l6-v2`, which ships offline: 6 layers of 384 with its
WordPiece tokenizer). Its embeddings, self-attention and FFN weights seed the text stream, the same
FFN weights seed the query FFN, and the cross-attention starts random — BLIP-2's recipe. Without
`text_init` the transformer starts random but still uses that tokenizer. `[unused0]` of the BERT
vocabulary plays BLIP-2's `[DEC]` token (the ITG start token), so the tokenizer needs no new entry.

The losses are plain functions below; the LightningModule (`mindsemantix.stages.align`) weights and
logs them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mindsemantix.models.pretrained import MINILM, OFFLINE_PREFIX, load_sentence_encoder


@dataclass(frozen=True)
class QFormerConfig:
    """The Brain Q-Former's architecture (BLIP-2's Q-Former over brain tokens).

    Args:
        num_queries: learned query tokens (the brain representation's length).
        num_layers: transformer layers.
        hidden_size: width (replaced by the text model's when `text_init` is set).
        num_heads: attention heads (idem).
        intermediate_size: MLP width (idem).
        cross_attention_frequency: cross-attention to the brain tokens in every n-th layer (0, n, 2n, ...).
        embed_dim: the joint brain-text (and brain-vision) space of the contrastive losses.
        max_text_length: Q-Former tokens per caption, [CLS]/[DEC] and [SEP] included.
        dropout: dropout in the transformer.
        text_init: BERT-family encoder whose weights seed the text stream (null: random).
        tokenizer: WordPiece tokenizer (null: text_init's, else all-MiniLM-L6-v2's).
        decoder_bos_token: the token that starts ITG's captions (BLIP-2's [DEC]).
        label_smoothing: of ITC and ITG, as BLIP-2.
        itg_vocab: "full", or "seen": ITG's softmax over tokens seen in training captions only.
        text_pooling: ITC's text vector: "cls" (BLIP-2, BERT) or "mean" over tokens (for models
            trained for mean pooling, e.g. all-MiniLM-L6-v2, whose [CLS] output is the same vector
            for every caption).
        train_word_embeddings: false keeps the (pretrained) word-embedding table, also ITG's tied
            output layer, frozen: on a CPU its dense 30522 x H gradient and AdamW update are most of
            a small Q-Former's step.
    """

    num_queries: int = 32
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    embed_dim: int = 256
    max_text_length: int = 32
    dropout: float = 0.1
    text_init: str | None = None
    tokenizer: str | None = None
    decoder_bos_token: str = "[unused0]"
    label_smoothing: float = 0.1
    itg_vocab: str = "full"
    text_pooling: str = "cls"
    train_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "QFormerConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown Q-Former config fields {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or self.text_init or MINILM


def load_text_side(config: QFormerConfig):
    """(tokenizer, BERT model or None). Models go through the project's one loader (`pretrained.py`);
    a tokenizer named apart from a model may be a folder holding only a tokenizer."""
    name = config.tokenizer_name
    if name == config.text_init or name.startswith(OFFLINE_PREFIX):
        tokenizer = load_sentence_encoder(name).tokenizer
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    bert = load_sentence_encoder(config.text_init).model if config.text_init else None
    return tokenizer, bert


class BrainQFormer(nn.Module):
    """Learned queries that read brain tokens, plus a text transformer sharing their self-attention.

    Build with `BrainQFormer(config, brain_width)`; with `config.text_init` set, the width, heads and
    FFN size come from that text model (the resolved config is `self.config`). `vision_dim` adds the
    brain-vision alignment heads. `load_text_weights=False` skips copying the text model's weights
    (used when the weights come from an export anyway).
    """

    def __init__(self, config: QFormerConfig, brain_width: int, vision_dim: int | None = None,
                 load_text_weights: bool = True):
        super().__init__()
        from transformers import Blip2QFormerConfig
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

        tokenizer, bert = load_text_side(config)
        if bert is not None:
            bc = bert.config
            if config.num_layers > bc.num_hidden_layers:
                raise ValueError(f"num_layers={config.num_layers} but {config.text_init} has only "
                                 f"{bc.num_hidden_layers} layers to initialise from")
            config = replace(config, hidden_size=bc.hidden_size, num_heads=bc.num_attention_heads,
                             intermediate_size=bc.intermediate_size)
        self.config, self.brain_width, self.vision_dim = config, brain_width, vision_dim
        self.tokenizer = tokenizer
        self.decoder_bos_id = tokenizer.convert_tokens_to_ids(config.decoder_bos_token)
        if self.decoder_bos_id in (None, tokenizer.unk_token_id):
            raise ValueError(f"decoder_bos_token {config.decoder_bos_token!r} is not in the tokenizer's vocabulary")
        H, Q = config.hidden_size, config.num_queries

        self.transformer_config = Blip2QFormerConfig(
            vocab_size=len(tokenizer), hidden_size=H, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size, hidden_act="gelu",
            hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout,
            max_position_embeddings=bert.config.max_position_embeddings if bert is not None else 512,
            layer_norm_eps=1e-12, pad_token_id=tokenizer.pad_token_id,
            cross_attention_frequency=config.cross_attention_frequency, encoder_hidden_size=brain_width,
            use_qformer_text_input=True)
        # SDPA takes our boolean (B, 1, L, L) masks as they are (True = may attend).
        self.transformer_config._attn_implementation = "sdpa"
        if config.max_text_length > self.transformer_config.max_position_embeddings:
            raise ValueError(f"max_text_length {config.max_text_length} exceeds the "
                             f"{self.transformer_config.max_position_embeddings} text positions")

        self.brain_norm = nn.LayerNorm(brain_width)  # BLIP-2's ln_vision: the encoder's scale is not ours
        self.query_tokens = nn.Parameter(torch.randn(1, Q, H) * 0.02)
        self.text_embeddings = Blip2TextEmbeddings(self.transformer_config)  # word + position, no LayerNorm
        self.transformer = Blip2QFormerModel(self.transformer_config)       # LayerNorm over the input, then layers
        # ITC
        self.brain_proj = nn.Linear(H, config.embed_dim)
        self.text_proj = nn.Linear(H, config.embed_dim)
        self.temperature = nn.Parameter(torch.tensor(0.07))
        # ITM
        self.itm_head = nn.Linear(H, 2)
        # ITG: BERT's LM head (transform, then the word embeddings transposed as the decoder)
        self.lm_transform = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.LayerNorm(H, eps=1e-12))
        self.lm_bias = nn.Parameter(torch.zeros(len(tokenizer)))
        # Vocabulary shortlist (itg_vocab="seen"): the full WordPiece softmax (30522 x width per text
        # position) is the largest single cost of a CPU step; captions of one study use a few
        # hundred tokens. Which tokens were seen is saved with the model, so generation after
        # loading draws from the same list.
        if config.text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be 'cls' or 'mean', got {config.text_pooling!r}")
        if config.itg_vocab not in ("full", "seen"):
            raise ValueError(f"itg_vocab must be 'full' or 'seen', got {config.itg_vocab!r}")
        self.register_buffer("seen_tokens", torch.zeros(len(tokenizer), dtype=torch.bool))
        # brain-vision alignment (a second contrastive space, against frozen image features)
        if vision_dim:
            self.vision_brain_proj = nn.Linear(H, config.embed_dim)
            self.vision_proj = nn.Linear(vision_dim, config.embed_dim)
            self.vision_temperature = nn.Parameter(torch.tensor(0.07))
        for m in (self.text_embeddings, self.lm_transform):
            m.apply(self.transformer._init_weights)
        if bert is not None and load_text_weights:
            self._load_text_weights(bert.state_dict())

    # -- initialisation from a BERT-family encoder --------------------------------------------------

    def _load_text_weights(self, bert: dict[str, Tensor]) -> None:
        """Copy a BertModel's weights: embeddings -> text embeddings (+ the input LayerNorm), each
        layer's self-attention -> the shared self-attention, its FFN -> both the text and the query
        FFN. Cross-attention stays random (BLIP-2 does the same)."""
        own = self.state_dict()
        copied: dict[str, Tensor] = {}
        type0 = bert["embeddings.token_type_embeddings.weight"][0]  # BERT adds segment 0 to every token
        copied["text_embeddings.word_embeddings.weight"] = bert["embeddings.word_embeddings.weight"]
        copied["text_embeddings.position_embeddings.weight"] = bert["embeddings.position_embeddings.weight"] + type0
        for p in ("weight", "bias"):
            copied[f"transformer.layernorm.{p}"] = bert[f"embeddings.LayerNorm.{p}"]
        for i in range(self.config.num_layers):
            src, dst = f"encoder.layer.{i}.", f"transformer.encoder.layer.{i}."
            for p in ("weight", "bias"):
                for proj in ("query", "key", "value"):
                    copied[f"{dst}attention.attention.{proj}.{p}"] = bert[f"{src}attention.self.{proj}.{p}"]
                for part in ("dense", "LayerNorm"):
                    copied[f"{dst}attention.output.{part}.{p}"] = bert[f"{src}attention.output.{part}.{p}"]
                for suffix in ("", "_query"):
                    copied[f"{dst}intermediate{suffix}.dense.{p}"] = bert[f"{src}intermediate.dense.{p}"]
                    for part in ("dense", "LayerNorm"):
                        copied[f"{dst}output{suffix}.{part}.{p}"] = bert[f"{src}output.{part}.{p}"]
        for k, v in copied.items():
            if own[k].shape != v.shape:
                raise ValueError(f"text weights: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict(copied, strict=False)

    # -- which parameters a set of losses trains ----------------------------------------------------

    def set_trainable(self, itc: bool, itm: bool, itg: bool, vision: bool) -> None:
        """Freeze what the chosen losses cannot reach (DDP requires every trainable parameter to get
        a gradient). The query path (queries, self- and cross-attention, query FFN) always trains."""
        text = itc or itm or itg
        self.requires_grad_(True)
        for name, p in self.named_parameters():
            parts = name.split(".")
            if name.startswith("text_embeddings.") or (len(parts) > 4 and parts[1:3] == ["encoder", "layer"]
                                                       and parts[4] in ("intermediate", "output")):
                p.requires_grad_(text)  # the text stream's own FFN ("..._query" is the query FFN)
            elif name.startswith(("brain_proj.", "text_proj.", "temperature")):
                p.requires_grad_(itc)
            elif name.startswith("itm_head."):
                p.requires_grad_(itm)
            elif name.startswith(("lm_transform.", "lm_bias")):
                p.requires_grad_(itg)
            elif name.startswith("vision"):
                p.requires_grad_(vision)
        if not self.config.train_word_embeddings:
            self.text_embeddings.word_embeddings.weight.requires_grad_(False)

    # -- the three attention patterns -------------------------------------------------------------

    def tokenize(self, captions: list[str], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """captions -> input_ids (B, T) starting with [CLS], attention_mask (B, T)."""
        tok = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.config.max_text_length,
                             return_tensors="pt")
        device = device or self.query_tokens.device
        return tok["input_ids"].to(device), tok["attention_mask"].to(device)

    def queries(self, batch_size: int, query_bias: Tensor | None = None) -> Tensor:
        """The learned queries (B, Q, H), plus a per-sample `query_bias` (B, Q, H) when given (a
        brain summary that conditions the queries directly; see BrainAlign's ridge readout)."""
        q = self.query_tokens.expand(batch_size, -1, -1)
        return q if query_bias is None else q + query_bias.to(q.dtype)

    def encode_brain(self, brain_tokens: Tensor, query_bias: Tensor | None = None) -> Tensor:
        """brain tokens (B, N, D) -> query outputs (B, Q, H)."""
        out = self.transformer(query_embeds=self.queries(brain_tokens.shape[0], query_bias),
                               query_length=self.config.num_queries, encoder_hidden_states=self.brain_norm(brain_tokens))
        return out.last_hidden_state

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text alone, bidirectional: (B, T) -> (B, T, H); position 0 ([CLS]) is the text summary."""
        out = self.transformer(query_embeds=self.text_embeddings(input_ids=input_ids), query_length=0,
                               attention_mask=attention_mask)
        return out.last_hidden_state

    def encode_joint(self, brain_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor,
                     causal: bool, query_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Queries and text in one sequence -> (query outputs (B, Q, H), text outputs (B, T, H)).

        causal=False: everything sees everything (ITM). causal=True: the ITG mask (see
        `multimodal_causal_mask`)."""
        B, Q = input_ids.shape[0], self.config.num_queries
        embeds = self.text_embeddings(input_ids=input_ids, query_embeds=self.queries(B, query_bias))  # (B, Q+T, H)
        if causal:
            mask = multimodal_causal_mask(attention_mask, Q)                                   # (B, 1, Q+T, Q+T)
        else:
            mask = torch.cat([attention_mask.new_ones(B, Q), attention_mask], dim=1)          # (B, Q+T)
        out = self.transformer(query_embeds=embeds, query_length=Q, attention_mask=mask,
                               encoder_hidden_states=self.brain_norm(brain_tokens)).last_hidden_state
        return out[:, :Q], out[:, Q:]

    # -- heads ----------------------------------------------------------------------------------

    def brain_embedding(self, query_out: Tensor) -> Tensor:
        return F.normalize(self.brain_proj(query_out).float(), dim=-1)                     # (B, Q, E)

    def text_embedding(self, text_out: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T, H) -> (B, E) unit vectors from [CLS] or the mean over real tokens."""
        if self.config.text_pooling == "cls":
            pooled = text_out[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(text_out.dtype)
            pooled = (text_out * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def lm_vocabulary(self) -> Tensor | None:
        """Token ids the ITG softmax runs over: None = all; else the seen tokens plus [SEP]/[PAD]."""
        if self.config.itg_vocab == "full":
            return None
        seen = self.seen_tokens.clone()
        seen[[self.tokenizer.sep_token_id, self.tokenizer.pad_token_id]] = True
        return seen.nonzero().squeeze(1)

    def lm_logits(self, text_out: Tensor, vocab: Tensor | None = None) -> Tensor:
        """(B, T, H) -> (B, T, len(vocab) or vocab size), the word embeddings as output matrix
        (BERT's tying); `vocab` (ids) restricts the output to a shortlist."""
        h = self.lm_transform(text_out)
        weight, bias = self.text_embeddings.word_embeddings.weight, self.lm_bias
        if vocab is not None:
            weight, bias = weight[vocab], bias[vocab]
        return F.linear(h, weight.to(h.dtype), bias.to(h.dtype))

    def itm_logits(self, query_out: Tensor) -> Tensor:
        return self.itm_head(query_out).float().mean(1)                                     # (B, 2)

    # -- the Q-Former's own captioner (phase 1 has no LLM) -----------------------------------------

    @torch.no_grad()
    def generate(self, brain_tokens: Tensor, max_length: int | None = None,
                 query_bias: Tensor | None = None) -> list[str]:
        """Greedy captions from the ITG decoder. No cache: the whole (short) sequence is re-run per
        token, which is cheap at Q-Former size and keeps the model code free of cache logic."""
        B, device = brain_tokens.shape[0], brain_tokens.device
        max_length = max_length or self.config.max_text_length
        ids = torch.full((B, 1), self.decoder_bos_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        sep, pad = self.tokenizer.sep_token_id, self.tokenizer.pad_token_id
        vocab = self.lm_vocabulary()
        for _ in range(max_length - 1):
            _, text_out = self.encode_joint(brain_tokens, ids, torch.ones_like(ids), causal=True, query_bias=query_bias)
            next_id = self.lm_logits(text_out[:, -1], vocab).argmax(-1)
            if vocab is not None:
                next_id = vocab[next_id]
            next_id = torch.where(done, torch.full_like(next_id, pad), next_id)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            done |= next_id == sep
            if done.all():
                break
        return [t.strip() for t in self.tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True)]


def multimodal_causal_mask(text_mask: Tensor, num_queries: int) -> Tensor:
    """BLIP-2's ITG mask: (B, T) text padding mask -> (B, 1, Q+T, Q+T) bool, True = may attend.

        keys ->      queries   text
        queries    [   all   | none  ]
        text       [   all   | causal]     and padded text is never a key
    """
    B, T = text_mask.shape
    Q, L = num_queries, num_queries + text_mask.shape[1]
    allowed = torch.zeros(L, L, dtype=torch.bool, device=text_mask.device)
    allowed[:, :Q] = True
    allowed[:Q, Q:] = False
    allowed[Q:, Q:] = torch.ones(T, T, dtype=torch.bool, device=text_mask.device).tril()
    key_ok = torch.cat([text_mask.new_ones(B, Q), text_mask], dim=1).bool()                   # (B, L)
    return (allowed[None] & key_ok[:, None, :])[:, None]


# ----------------------------------------------------------------------------------------------
# Negatives from every rank and from earlier batches
# ----------------------------------------------------------------------------------------------

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_across_ranks(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate `x` (B_rank, ...) from all ranks along dim 0 -> (sum B, ...), and return this
    rank's offset in it. Other ranks' rows carry no gradient; this rank's rows keep theirs (so both
    sides of a contrastive loss get gradients from the local rows). Batch sizes may differ between
    ranks (a short last batch). On one process it returns `x` unchanged."""
    if not _distributed():
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = x.detach().new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [p[:s] for p, s in zip(parts, sizes)]
    parts[rank] = x
    return torch.cat(parts), sum(sizes[:rank])


class FeatureQueue:
    """First-in-first-out store of detached (brain, other, image id) features from earlier batches,
    used as extra contrastive negatives: fMRI batches are small (tens of samples), and contrastive
    learning wants hundreds of negatives. No momentum encoder: entries are a few steps stale, so
    keep the queue short (a few batches) and turn it on after warm-up (`BrainAlign.queue_start`;
    from a random start, stale features stall ITC). Same-image entries count as positives, never as
    negatives. Plain tensors, not module buffers: nothing to checkpoint (it refills in a few steps)
    and nothing for DDP to broadcast (every rank pushes the same gathered features)."""

    def __init__(self, size: int, num_queries: int, dim: int):
        self.size = int(size)
        self.brain = torch.zeros(0, num_queries, dim)
        self.other = torch.zeros(0, dim)
        self.ids = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    @torch.no_grad()
    def push(self, brain: Tensor, other: Tensor, ids: Tensor) -> None:
        if self.size <= 0:
            return
        device = brain.device
        self.brain = torch.cat([brain.detach().float(), self.brain.to(device)])[: self.size]
        self.other = torch.cat([other.detach().float(), self.other.to(device)])[: self.size]
        self.ids = torch.cat([ids.detach(), self.ids.to(device)])[: self.size]


@dataclass
class ContrastiveOutput:
    loss: Tensor
    sim_b2o: Tensor    # (B, B) local brain -> local other similarities (logits), for hard negatives
    sim_o2b: Tensor    # (B, B) local other -> local brain
    accuracy: Tensor   # brain -> other top-1 over the whole bank (same image counts as correct)


def contrastive_loss(brain: Tensor, other: Tensor, image_ids: Tensor, temperature: Tensor,
                     queue: FeatureQueue | None = None, label_smoothing: float = 0.1) -> ContrastiveOutput:
    """BLIP-2's ITC between brain queries and one vector per sample of the other side.

    brain (B, Q, E) and other (B, E) are unit vectors; similarity = max over queries of the cosine,
    divided by the (learned, clamped) temperature. Each local row is scored against the bank: all
    ranks' samples plus the queue. Targets: every bank entry of the same image is a positive (other
    subjects saw it too; in-batch duplicates are possible across ranks), smoothed by
    `label_smoothing`. The queue is filled with this step's (gathered) samples afterwards.
    """
    temp = temperature.clamp(0.001, 0.5)
    B = brain.shape[0]
    brain_all, offset = gather_across_ranks(brain)                    # (N, Q, E)
    other_all, _ = gather_across_ranks(other)                         # (N, E)
    ids_all, _ = gather_across_ranks(image_ids)                       # (N,)
    if queue is not None and queue.size > 0:
        brain_bank = torch.cat([brain_all, queue.brain.to(brain.device, brain.dtype)])
        other_bank = torch.cat([other_all, queue.other.to(other.device, other.dtype)])
        ids_bank = torch.cat([ids_all, queue.ids.to(image_ids.device)])
    else:
        brain_bank, other_bank, ids_bank = brain_all, other_all, ids_all

    sim_b2o = torch.einsum("bqe,ne->bqn", brain, other_bank).amax(1) / temp       # (B, N_bank)
    sim_o2b = torch.einsum("be,nqe->bnq", other, brain_bank).amax(2) / temp       # (B, N_bank)
    positives = (image_ids[:, None] == ids_bank[None, :]).float()                  # (B, N_bank), >= 1 per row
    targets = positives / positives.sum(1, keepdim=True)
    loss = (F.cross_entropy(sim_b2o, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_o2b, targets, label_smoothing=label_smoothing)) / 2
    accuracy = positives.gather(1, sim_b2o.argmax(1, keepdim=True)).mean()
    if queue is not None:
        queue.push(brain_all, other_all, ids_all)
    local = slice(offset, offset + B)
    return ContrastiveOutput(loss, sim_b2o[:, local].detach(), sim_o2b[:, local].detach(), accuracy.detach())


def sample_hard_negatives(sim_b2t: Tensor, sim_t2b: Tensor, image_ids: Tensor,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """BLIP-2's ITM negatives: for each brain a caption drawn from softmax(similarity) over the
    captions of *other* images (so the most confusable ones are drawn most), and for each caption a
    brain likewise. Returns (rows, negative text index, negative brain index) for the rows that have
    any other image in the batch."""
    other_image = image_ids[:, None] != image_ids[None, :]                         # (B, B)
    rows = other_image.any(1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return rows, rows, rows
    w_b2t = F.softmax(sim_b2t.float(), dim=1) * other_image + 1e-12 * other_image   # never the own image
    w_t2b = F.softmax(sim_t2b.float(), dim=1) * other_image + 1e-12 * other_image
    neg_text = torch.multinomial(w_b2t[rows], 1, generator=generator).squeeze(1)
    neg_brain = torch.multinomial(w_t2b[rows], 1, generator=generator).squeeze(1)
    return rows, neg_text, neg_brain


# ----------------------------------------------------------------------------------------------
# The representation phase's losses in one call
# ----------------------------------------------------------------------------------------------

@dataclass
class RepresentationOutput:
    losses: dict[str, Tensor]       # itc / itm / itg, whichever were asked for
    metrics: dict[str, Tensor]      # detached diagnostics (retrieval accuracy, ITM accuracy)
    query_out: Tensor               # (B, Q, H) query outputs, reusable by the vision and LM losses


def representation_losses(model: BrainQFormer, brain_tokens: Tensor, captions: list[str], image_ids: Tensor,
                          itc: bool = True, itm: bool = True, itg: bool = True,
                          queue: FeatureQueue | None = None, generator: torch.Generator | None = None,
                          query_bias: Tensor | None = None) -> RepresentationOutput:
    """BLIP-2 stage-1 objectives for a batch of brain tokens (B, N, D) and one caption per sample
    (`query_bias`: see `BrainQFormer.queries`)."""
    label_smoothing = model.config.label_smoothing
    losses: dict[str, Tensor] = {}
    metrics: dict[str, Tensor] = {}
    input_ids, text_mask = model.tokenize(captions, brain_tokens.device)          # (B, T)

    if itg:
        # One pass gives the query outputs (queries cannot see the text under this mask) and the
        # decoder's text outputs. The text starts with [DEC] instead of [CLS].
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = model.decoder_bos_id
        query_out, text_out = model.encode_joint(brain_tokens, dec_ids, text_mask, causal=True, query_bias=query_bias)
        labels = input_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)          # tokens 1..T-1
        if model.training:
            model.seen_tokens[input_ids[text_mask.bool()]] = True
        vocab = model.lm_vocabulary()
        if vocab is not None:  # ids -> positions in the shortlist (every label is in it: just seen)
            position = torch.full_like(model.seen_tokens, -100, dtype=torch.long)
            position[vocab] = torch.arange(len(vocab), device=vocab.device)
            labels = torch.where(labels == -100, labels, position[labels.clamp_min(0)])
        logits = model.lm_logits(text_out[:, :-1], vocab)                           # position t predicts t+1
        losses["itg"] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                        label_smoothing=label_smoothing)
    else:
        query_out = model.encode_brain(brain_tokens, query_bias)                    # (B, Q, H)

    if itc or itm:
        text_out = model.encode_text(input_ids, text_mask)                          # (B, T, H)
        con = contrastive_loss(model.brain_embedding(query_out), model.text_embedding(text_out, text_mask), image_ids,
                               model.temperature, queue, label_smoothing)
        if itc:
            losses["itc"] = con.loss
            metrics["itc_acc"] = con.accuracy

    if itm:
        rows, neg_text, neg_brain = sample_hard_negatives(con.sim_b2o, con.sim_o2b, image_ids, generator)
        if rows.numel() > 0:
            # positives (B), each brain with a confusable caption, each caption with a confusable brain
            brains = torch.cat([brain_tokens, brain_tokens[rows], brain_tokens[neg_brain]])
            ids = torch.cat([input_ids, input_ids[neg_text], input_ids[rows]])
            masks = torch.cat([text_mask, text_mask[neg_text], text_mask[rows]])
            bias = None if query_bias is None else torch.cat([query_bias, query_bias[rows], query_bias[neg_brain]])
            itm_query_out, _ = model.encode_joint(brains, ids, masks, causal=False, query_bias=bias)
            logits = model.itm_logits(itm_query_out)                                # (B + 2R, 2)
            target = torch.cat([torch.ones(len(input_ids)), torch.zeros(2 * len(rows))]).long().to(logits.device)
            losses["itm"] = F.cross_entropy(logits, target)
            metrics["itm_acc"] = (logits.argmax(1) == target).float().mean().detach()
    return RepresentationOutput(losses, metrics, query_out)


def vision_alignment_loss(model: BrainQFormer, query_out: Tensor, vision_features: Tensor, image_ids: Tensor,
                          queue: FeatureQueue | None = None) -> ContrastiveOutput:
    """Brain-vision alignment: the queries against the seen image's pooled features from a frozen
    vision encoder, in a contrastive space of their own (both sides projected; the image side's
    projection is the only trainable part on that side). Same form as ITC."""
    if model.vision_dim is None:
        raise RuntimeError("this BrainQFormer was built without vision heads (vision_dim=None)")
    brain = F.normalize(model.vision_brain_proj(query_out).float(), dim=-1)         # (B, Q, E)
    image = F.normalize(model.vision_proj(vision_features.to(model.vision_proj.weight.dtype)).float(), dim=-1)  # (B, E)
    return contrastive_loss(brain, image, image_ids, model.vision_temperature, queue, model.config.label_smoothing)


__all__ = ["QFormerConfig", "BrainQFormer", "RidgeReadout", "caption_word_targets", "FeatureQueue", "ContrastiveOutput", "RepresentationOutput",
           "multimodal_causal_mask", "gather_across_ranks", "contrastive_loss", "sample_hard_negatives",
           "representation_losses", "vision_alignment_loss", "load_text_side"]


# ----------------------------------------------------------------------------------------------
# Ridge readout: a closed-form brain summary that conditions the queries
# ----------------------------------------------------------------------------------------------

class RidgeReadout(nn.Module):
    """Per-subject linear readout fmri (B, V) -> (B, K), fitted in closed form on the training split
    (ridge, leave-one-out penalty) to the caption's word content (K frequent WordPiece tokens, per
    image the share of its captions that contain each); a trainable Linear(K -> Q * H), zero at the
    start, turns it into a per-sample bias of the learned queries (`BrainQFormer.queries`).

    Why: on a CPU budget the deep path (stage-1 encoder -> cross-attention) leaves chance slowly
    from ~4k noisy samples, while a ridge map averages over all voxels at once and is exact after one
    pass over the data (MindEye2-style per-subject linear layers, here initialised by least squares
    instead of SGD). The readout is fixed; the projection and everything downstream train.
    Fitted weights are buffers: they go into checkpoints and exports with the model.
    """

    def __init__(self, token_ids: Tensor, num_queries: int, hidden_size: int):
        super().__init__()
        self.num_queries, self.hidden_size = num_queries, hidden_size
        self.register_buffer("token_ids", token_ids.long())                     # (K,) what each output means
        self.maps = nn.ModuleDict()
        self.proj = nn.Linear(len(token_ids), num_queries * hidden_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @property
    def dim(self) -> int:
        return len(self.token_ids)

    def add_subject(self, name: str, n_voxels: int) -> None:
        """An empty (unfitted) map; `fit_subject` or a state dict fills it."""
        if name in self.maps:
            return
        m = nn.Module()
        m.register_buffer("weight", torch.zeros(n_voxels, self.dim))   # (V, K)
        m.register_buffer("out_mean", torch.zeros(self.dim))           # standardises the outputs
        m.register_buffer("out_std", torch.ones(self.dim))
        m.register_buffer("alpha", torch.zeros(()))                    # chosen ridge penalty (0 = not fitted)
        self.maps[name] = m.to(self.proj.weight.device)

    def fitted(self, name: str) -> bool:
        return name in self.maps and float(self.maps[name].alpha) > 0

    @torch.no_grad()
    def fit_subject(self, name: str, x, targets) -> float:
        """x (N, V) training fMRI (mean over repetitions), targets (N, K). Returns the penalty."""
        import numpy as np

        from mindsemantix.numerics import fit_ridge

        fit = fit_ridge(np.asarray(x, dtype=np.float64), np.asarray(targets, dtype=np.float64))
        pred = fit.predict(x)                                                   # (N, K) in-sample
        self.add_subject(name, fit.weights.shape[0])
        m, dev = self.maps[name], self.proj.weight.device
        m.weight.copy_(torch.as_tensor(fit.weights, dtype=torch.float32, device=dev))
        # x @ W + (y_mean - x_mean @ W) is the ridge prediction; standardise it with its training stats
        intercept = torch.as_tensor(fit.y_mean - fit.x_mean @ fit.weights, dtype=torch.float32, device=dev)
        m.out_mean.copy_(torch.as_tensor(pred.mean(0), dtype=torch.float32, device=dev) - intercept)
        m.out_std.copy_(torch.as_tensor(pred.std(0), dtype=torch.float32, device=dev).clamp_min(1e-6))
        m.alpha.fill_(max(fit.alpha, 1e-12))
        return fit.alpha

    def forward(self, fmri: Tensor, subject: str) -> Tensor | None:
        """(B, V) -> query bias (B, Q, H), or None for a subject without a fitted map."""
        if not self.fitted(subject):
            return None
        m = self.maps[subject]
        z = (fmri.float() @ m.weight - m.out_mean) / m.out_std                  # (B, K) standardised
        return self.proj(z).view(-1, self.num_queries, self.hidden_size)


def caption_word_targets(captions: list[list[str]], tokenizer, vocab: int | Tensor) -> tuple[Tensor, Tensor]:
    """Word-content targets of images: per image, the share of its captions that contain each token.

    vocab: K -> the K most frequent non-special tokens of these captions; or a (K,) id tensor.
    Returns the (K,) token ids and the (N, K) float32 targets."""
    flat = tokenizer([c for caps in captions for c in caps], add_special_tokens=False)["input_ids"]  # one call
    per_image, start = [], 0
    for caps in captions:
        per_image.append([set(ids) for ids in flat[start:start + len(caps)]])
        start += len(caps)
    if isinstance(vocab, int):
        special, counts = set(tokenizer.all_special_ids), {}
        for caps in per_image:
            for ids in caps:
                for i in ids - special:
                    counts[i] = counts.get(i, 0) + 1
        vocab = torch.tensor(sorted(counts, key=lambda i: (-counts[i], i))[:vocab], dtype=torch.long)
    column = {int(i): k for k, i in enumerate(vocab)}
    targets = np.zeros((len(captions), len(column)), dtype=np.float32)  # numpy: per-element torch indexing is slow
    for n, caps in enumerate(per_image):
        for ids in caps:
            for i in ids:
                if i in column:
                    targets[n, column[i]] += 1.0 / len(caps)
    return vocab, torch.from_numpy(targets)
