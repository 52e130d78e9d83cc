"""Inference modes of a trained embedder: direct, always (reason then embed), oracle (the better of the two).

Concept (docs/method.md, steps 3 and 5)
    *direct*: embed at ``<|emb|>`` right after the prompt (r = none).
    *always*: the model opens ``<think>``, writes its own rationale (batched, greedy, KV-cached, stops at
    ``</think>``: :func:`write_spans`), then the embedding is read at ``<|emb|>`` after the span.
    If the model never closes the span within the budget, the span is closed for it (counted as
    ``unclosed``) so every query still gets an embedding.
    *oracle*: per query, the better of direct and always - an upper bound for any gate.

Implementation note: the embedding after generation is a second prefill over prompt + rationale (not a
continuation of the generation cache); its cost is included in the measured latency.

Used by: stage 1 evaluation (summary.json ``eval.always`` / ``eval.oracle``), stage 2, notebooks 04-05.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from .backbone import THINK_CLOSE, THINK_OPEN, Backbone
from .embed import Input, base_model, collate, embed

MAX_NEW_TOKENS = 64
"""Budget of one rationale (an unclosed span is closed for it), read by every mode, stage and worker; the toy
world's longest gold chain is 45 tokens, so the budget cuts no gold-length chain short."""
THRESHOLD = 0.5
"""The adaptive gate's default threshold on p_open: the policy's own pick between its two legal first tokens,
``<think>`` and ``<|emb|>`` (a run with a validation split chooses its own: ``stage2.threshold_on_val``)."""
LATENCY_SAMPLE = 8
"""Queries per dataset timed one at a time: 8 x the toy world's 8 datasets = 64 timed queries."""


@dataclass
class Generated:
    texts: list[str]
    closed: list[bool]
    ids: list[list[int]]
    """The span's token ids per input (without ``</think>``), as decoded into ``texts``."""

    @property
    def n_tokens(self) -> list[int]:
        """Tokens generated per input: the span's tokens, plus ``</think>`` where it closed."""
        return [len(i) + int(c) for i, c in zip(self.ids, self.closed)]


def rope_positions(backbone: Backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(3, batch, seq) rotary positions, as the base model computes them when given none: multimodal RoPE
    from the visual grids, else 0..seq-1 (left padding included, as the model does for text). Passing them
    explicitly lets a cache be continued without the model's stored ``rope_deltas``."""
    ids = batch["input_ids"]
    if "image_grid_thw" in batch or "video_grid_thw" in batch:
        pos, _ = base_model(backbone.model).get_rope_index(
            ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"), attention_mask=batch["attention_mask"])
        return pos
    return torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, ids.shape[0], -1)


def cache_of(out):
    """The KV cache of a model output (``cache`` in transformers 5, ``past_key_values`` before)."""
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


@torch.no_grad()
def write_spans(backbone: Backbone, cache, mask: torch.Tensor, next_pos: torch.Tensor, max_new_tokens: int) -> Generated:
    """Greedy reasoning spans after prompts held in a KV cache.

    ``mask`` (n, len) is the prompts' attention mask (left padding) and ``next_pos`` (n,) the rotary
    position of the token after each prompt. ``<think>`` is fed there, then tokens are drawn greedily
    until ``</think>`` or ``max_new_tokens``; a second ``<think>`` is never drawn (a nested span is
    malformed; and stage 2's decision-only GRPO moves that token's output row, which must not change what
    is written inside). Finished rows are fed padding until all are done. The cache is consumed."""
    bb = backbone
    think, close, pad = bb.token_id(THINK_OPEN), bb.token_id(THINK_CLOSE), bb.tokenizer.pad_token_id
    base, head = base_model(bb.model), bb.model.get_output_embeddings()
    n = mask.shape[0]
    tok = torch.full((n,), think, dtype=torch.long, device=mask.device)
    ids: list[list[int]] = [[] for _ in range(n)]
    closed = [False] * n
    was = bb.model.training
    bb.model.eval()
    try:
        for k in range(max_new_tokens):
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            pos = (next_pos + k).view(1, n, 1).expand(3, n, 1)
            out = base(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            cache = cache_of(out)
            logits = head(out.last_hidden_state[:, -1]).float()
            logits[:, think] = float("-inf")
            nxt = logits.argmax(dim=-1)
            for i, t in enumerate(nxt.tolist()):
                if closed[i]:
                    continue
                if t == close:
                    closed[i] = True
                else:
                    ids[i].append(t)
            if all(closed):
                break
            tok = torch.where(torch.tensor(closed, device=nxt.device), torch.full_like(nxt, pad), nxt)
    finally:
        bb.model.train(was)
    texts = [bb.tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]
    return Generated(texts, closed, ids)


@torch.no_grad()
def generate_rationales(backbone: Backbone, inputs: Sequence[Input], max_new_tokens: int = MAX_NEW_TOKENS,
                        batch_size: int = 32) -> Generated:
    """Greedy rationales after a forced ``<think>``; stops at ``</think>`` (or the budget).

    One KV-cached prefill of the prompt per batch, then :func:`write_spans` (the decoding loop the
    adaptive gate continues its own prefill with, so both modes pay the same per generated token; it
    draws the tokens ``model.generate`` draws greedily with ``<think>`` suppressed, tests/test_gate.py)."""
    bb = backbone
    base = base_model(bb.model)
    was = bb.model.training
    bb.model.eval()
    texts, closed, span_ids = [], [], []
    try:
        for s in range(0, len(inputs), batch_size):
            chunk = list(inputs[s:s + batch_size])
            batch = collate(bb, chunk, [""] * len(chunk))  # the prompt, up to the assistant start
            pos = rope_positions(bb, batch)
            out = base(**batch, position_ids=pos, use_cache=True)
            g = write_spans(bb, cache_of(out), batch["attention_mask"], pos[0, :, -1] + 1, max_new_tokens)
            texts, closed, span_ids = texts + g.texts, closed + g.closed, span_ids + g.ids
    finally:
        bb.model.train(was)
    return Generated(texts, closed, span_ids)


def embed_after(backbone: Backbone, inputs: Sequence[Input], rationales: Sequence[str],
                batch_size: int = 32) -> torch.Tensor:
    """Embeddings of ``inputs`` read after their reasoning spans (one prefill each over prompt + span)."""
    return embed(backbone, [replace(x, rationale=r) for x, r in zip(inputs, rationales)], batch_size=batch_size)


@dataclass
class ReasoningEncoder:
    """A query encoder (the ``always`` mode): generate a rationale, then embed after it. Keeps token counts."""

    backbone: Backbone
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 32
    generated_tokens: list[int] = field(default_factory=list)
    unclosed: int = 0
    last_rationales: list[str] = field(default_factory=list)

    def __call__(self, inputs: Sequence[Input]) -> torch.Tensor:
        g = generate_rationales(self.backbone, inputs, self.max_new_tokens, self.batch_size)
        self.generated_tokens += g.n_tokens
        self.unclosed += sum(not c for c in g.closed)
        self.last_rationales = g.texts
        return embed_after(self.backbone, inputs, g.texts, self.batch_size)
