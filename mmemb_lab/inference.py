"""Inference modes of a trained embedder: direct, always (reason then embed), oracle (the better of the two).

Concept (method.md, steps 3 and 5)
    *direct*: embed at ``<|emb|>`` right after the prompt (r = none).
    *always*: the model opens ``<think>``, writes its own rationale (batched, greedy, KV-cached
    ``generate`` that stops at ``</think>``), then the embedding is read at ``<|emb|>`` after the span.
    If the model never closes the span within the budget, the span is closed for it (counted as
    ``unclosed``) so every query still gets an embedding.
    *oracle*: per query, the better of direct and always - an upper bound for any gate.

Implementation note: the embedding after generation is a second prefill over prompt + rationale (not a
continuation of the generation cache); its cost is included in the measured latency.

Used by: stage 1 evaluation (summary.json ``eval.always`` / ``eval.oracle``), stage 2, notebooks 04-05.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .backbone import THINK_CLOSE, THINK_OPEN, Backbone
from .embed import Input, collate, embed


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


@torch.no_grad()
def generate_rationales(backbone: Backbone, inputs: Sequence[Input], max_new_tokens: int = 64,
                        batch_size: int = 32) -> Generated:
    """Greedy rationales after a forced ``<think>``; stops at ``</think>`` (or the budget).

    A second ``<think>`` cannot be drawn inside the span (a nested span is malformed; and stage 2's
    decision-only GRPO moves that token's output row, which must not change what is written inside)."""
    bb = backbone
    close, think = bb.token_id(THINK_CLOSE), bb.token_id(THINK_OPEN)
    was = bb.model.training
    bb.model.eval()
    texts, closed, span_ids = [], [], []
    for s in range(0, len(inputs), batch_size):
        chunk = list(inputs[s:s + batch_size])
        batch = collate(bb, chunk, [THINK_OPEN] * len(chunk))
        gen = bb.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=close,
                                pad_token_id=bb.tokenizer.pad_token_id, suppress_tokens=[think])
        for row in gen[:, batch["input_ids"].shape[1]:].tolist():
            c = close in row
            ids = row[:row.index(close)] if c else [i for i in row if i != bb.tokenizer.pad_token_id]
            texts.append(bb.tokenizer.decode(ids, skip_special_tokens=True).strip())
            closed.append(c)
            span_ids.append(ids)
    bb.model.train(was)
    return Generated(texts, closed, span_ids)


@dataclass
class ReasoningEncoder:
    """A query encoder for ``evaluate``: generate a rationale, then embed after it. Keeps token counts."""

    backbone: Backbone
    max_new_tokens: int = 64
    batch_size: int = 32
    generated_tokens: list[int] = field(default_factory=list)
    unclosed: int = 0
    last_rationales: list[str] = field(default_factory=list)

    def __call__(self, inputs: Sequence[Input]) -> torch.Tensor:
        g = generate_rationales(self.backbone, inputs, self.max_new_tokens, self.batch_size)
        self.generated_tokens += g.n_tokens
        self.unclosed += sum(not c for c in g.closed)
        self.last_rationales = g.texts
        return embed(self.backbone, [Input(x.text, x.visual, x.instruction, t, x.name)
                                     for x, t in zip(inputs, g.texts)], batch_size=self.batch_size)
