"""The adaptive gate at inference: one prefill decides whether to reason and already holds the direct embedding.

Concept (docs/method.md, step 5)
    After stage 2 the model's first assistant token is a decision: ``<think>`` (reason, then embed) or
    ``<|emb|>`` (embed now). We feed ``prompt + <|emb|>`` once. Under causal attention that single
    forward gives both

    - the **direct embedding** e(q): the final-normed state at the last position (``<|emb|>``),
      exactly what ``embed.embed`` computes, and
    - the **decision**: the next-token distribution at the position *before* ``<|emb|>`` (the
      assistant start), which does not see ``<|emb|>``. The gate reads

          p_open = p(<think>) / (p(<think>) + p(<|emb|>))

      i.e. the policy's choice between the two legal first tokens (stage 2 samples exactly these two;
      ``p_think``, the unrenormalised probability, is kept too).

    An input with ``p_open > threshold`` goes on from that same prefill: its KV cache, cropped to the
    prompt, is continued with ``<think>`` and the span is written greedily (:func:`continue_spans`, the
    same tokens as ``inference.generate_rationales``), then it is re-embedded after the rationale. Every
    other input keeps its direct embedding, so it costs one forward - the direct path plus one row of the
    LM head. The threshold is an inference-time knob (equivalently a logit bias b on ``<think>``: open
    iff z_think + b > z_emb, b = -logit(threshold)); sweeping it traces accuracy against invocation rate
    and latency (``method.gate.sweep``).

Costs to know: the prompt is prefilled once for the gate and the generation together (the rotary
positions are computed here, so continuing the cache does not depend on the model's stored
``rope_deltas``); the re-embedding after the rationale is a second prefill, as in the "always" mode
(``inference``), so the two modes pay the same for the same rationale.

Used by: evaluation mode "adaptive" (``AdaptiveEncoder``, through ``modes.encoder_for``), the threshold sweep
(``method.gate``, summary.json ``gate.curve``), stage 2's invocation probe, notebook 05.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from .backbone import EMB_TOKEN, THINK_OPEN, Backbone
from .embed import Input, base_model, collate, pool
from .inference import MAX_NEW_TOKENS, THRESHOLD, Generated, cache_of, embed_after, rope_positions, write_spans


@dataclass(frozen=True)
class GateOutput:
    """The single prefill's two products, for n inputs."""

    direct: torch.Tensor
    """(n, hidden) unit-norm direct embeddings (state at ``<|emb|>``)."""
    p_think: torch.Tensor
    """(n,) p(<think>) at the assistant start, full softmax over the vocabulary."""
    p_emb: torch.Tensor
    """(n,) p(<|emb|>) at the assistant start."""
    state: torch.Tensor | None = None
    """(n, hidden) the final-normed state at the assistant start, which the output layer turns into the decision
    (float32): with it, another ``<think>`` row's p_open needs no forward (:func:`p_open_for_row`)."""

    @property
    def p_open(self) -> torch.Tensor:
        """(n,) p(<think>) renormalised over the two legal first tokens: the gate's score."""
        return self.p_think / (self.p_think + self.p_emb).clamp_min(1e-30)


@dataclass
class _Prefill:
    """One gate prefill over ``prompt + <|emb|>`` for a batch: its outputs, and what continuing needs."""

    gate: GateOutput
    mask: torch.Tensor
    positions: torch.Tensor
    cache: object


def _prefill(backbone: Backbone, inputs: Sequence[Input], keep_cache: bool) -> _Prefill:
    bb = backbone
    think, emb = bb.token_id(THINK_OPEN), bb.token_id(EMB_TOKEN)
    batch = collate(bb, [replace(x, rationale=None) for x in inputs])
    pos = rope_positions(bb, batch)
    out = base_model(bb.model)(**batch, position_ids=pos, use_cache=keep_cache)
    states = out.last_hidden_state  # (b, seq, hidden), final-normed, left-padded
    logp = torch.log_softmax(bb.model.get_output_embeddings()(states[:, -2]).float(), dim=-1)  # after the prompt
    g = GateOutput(pool(states).cpu(), logp[:, think].exp().cpu(), logp[:, emb].exp().cpu(),
                   states[:, -2].float().cpu())
    return _Prefill(g, batch["attention_mask"], pos, cache_of(out) if keep_cache else None)


@torch.no_grad()
def continue_spans(backbone: Backbone, pre: _Prefill, rows: Sequence[int], max_new_tokens: int) -> Generated:
    """Greedy reasoning spans for ``rows`` of a gate prefill, continuing its KV cache (which is consumed).

    The cache is cropped to the prompt (``<|emb|>`` dropped) and ``inference.write_spans`` feeds
    ``<think>`` at the position ``<|emb|>`` had: the same tokens as ``inference.generate_rationales``,
    without a second prefill of the prompt (tests/test_gate.py)."""
    rows = list(rows)
    if not rows:
        return Generated([], [], [])
    idx = torch.tensor(rows, device=pre.mask.device)
    pre.cache.crop(-1)
    if len(rows) < pre.mask.shape[0]:
        pre.cache.batch_select_indices(idx)
    return write_spans(backbone, pre.cache, pre.mask[idx, :-1], pre.positions[0, idx, -1], max_new_tokens)


@torch.no_grad()
def gate_forward(backbone: Backbone, inputs: Sequence[Input], batch_size: int = 32) -> GateOutput:
    """One forward over ``prompt + <|emb|>`` per input: direct embedding and decision probabilities.

    Rationales set on the inputs are ignored (the gate always sees the bare prompt)."""
    bb = backbone
    was = bb.model.training
    bb.model.eval()
    outs = []
    try:
        for s in range(0, len(inputs), batch_size):
            outs.append(_prefill(bb, inputs[s:s + batch_size], keep_cache=False).gate)
    finally:
        bb.model.train(was)
    return _cat_gates(bb, outs)


def _cat_gates(bb: Backbone, outs: list[GateOutput]) -> GateOutput:
    if not outs:
        h = bb.model.config.text_config.hidden_size
        return GateOutput(torch.zeros(0, h), torch.zeros(0), torch.zeros(0), torch.zeros(0, h))
    return GateOutput(*(torch.cat([getattr(o, f) for o in outs]) for f in ("direct", "p_think", "p_emb", "state")))


def p_open_for_row(backbone: Backbone, state: torch.Tensor, think_row: torch.Tensor) -> torch.Tensor:
    """(n,) the gate's p_open on states of :class:`GateOutput` had the output layer's ``<think>`` row been
    ``think_row``: p_open is the sigmoid of z(<think>) - z(<|emb|>), whatever the other rows (the softmax's
    normaliser cancels), so a row kept during stage 2 is scored without running the model again."""
    head = backbone.model.get_output_embeddings()
    emb_row = head.weight[backbone.token_id(EMB_TOKEN)].detach().float().cpu()
    z = state.float() @ (think_row.detach().float().cpu() - emb_row)
    if getattr(head, "bias", None) is not None:
        b = head.bias.detach().float().cpu()
        z = z + b[backbone.token_id(THINK_OPEN)] - b[backbone.token_id(EMB_TOKEN)]
    return torch.sigmoid(z)


@dataclass(frozen=True)
class GateRun:
    """The gate over many inputs, and the spans of those it opened for."""

    gate: GateOutput
    opened: list[int]
    """Indices (ascending) of the inputs whose p_open exceeds the threshold."""
    spans: Generated
    """Their greedy spans, in the order of ``opened``."""
    gate_s: float
    """Wall time of the prefills (s)."""
    span_s: float
    """Wall time of the span continuations (s)."""


@torch.no_grad()
def gate_and_spans(backbone: Backbone, inputs: Sequence[Input], threshold: float, max_new_tokens: int = MAX_NEW_TOKENS,
                   batch_size: int = 32) -> GateRun:
    """The gate prefill for every input; inputs with ``p_open > threshold`` go on to write their span from
    the same prefill (:func:`continue_spans`). Re-embedding after the span is the caller's."""
    bb = backbone
    inputs = list(inputs)
    was = bb.model.training
    bb.model.eval()
    outs, opened, texts, closed, ids = [], [], [], [], []
    gate_s = span_s = 0.0
    try:
        for s in range(0, len(inputs), batch_size):
            t0 = time.perf_counter()
            pre = _prefill(bb, inputs[s:s + batch_size], keep_cache=True)
            t1 = time.perf_counter()
            rows = [i for i, v in enumerate(pre.gate.p_open.tolist()) if v > threshold]
            g = continue_spans(bb, pre, rows, max_new_tokens)
            pre.cache = None
            span_s += time.perf_counter() - t1
            gate_s += t1 - t0
            outs.append(pre.gate)
            opened += [s + i for i in rows]
            texts, closed, ids = texts + g.texts, closed + g.closed, ids + g.ids
    finally:
        bb.model.train(was)
    return GateRun(_cat_gates(bb, outs), opened, Generated(texts, closed, ids), gate_s, span_s)


@dataclass
class AdaptiveEncoder:
    """A query encoder (``modes.encoder_for``): reason only where the gate opens.

    Records, per query and in call order (warm-up and latency calls of ``evaluate`` included; slice by
    length before/after a call to isolate one): ``generated_tokens`` (0 where not invoked),
    ``invoked``, ``p_open`` and ``latency_ms``. Latency of a batched call is shared out: the prefill
    time equally over all queries, the generation + re-embedding time equally over invoked ones (at
    batch size 1 it is exact).
    """

    backbone: Backbone
    threshold: float = THRESHOLD
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 32
    generated_tokens: list[int] = field(default_factory=list)
    invoked: list[bool] = field(default_factory=list)
    p_open: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    unclosed: int = 0
    last_rationales: list[str | None] = field(default_factory=list)

    def __call__(self, inputs: Sequence[Input]) -> torch.Tensor:
        inputs = list(inputs)
        run = gate_and_spans(self.backbone, inputs, self.threshold, self.max_new_tokens, self.batch_size)
        t0 = time.perf_counter()
        idx, gen = run.opened, run.spans
        out = run.gate.direct.clone()
        tokens = [0] * len(inputs)
        rats: list[str | None] = [None] * len(inputs)
        if idx:
            sub = [inputs[i] for i in idx]
            out[idx] = embed_after(self.backbone, sub, gen.texts, self.batch_size)
            for j, i in enumerate(idx):
                tokens[i], rats[i] = gen.n_tokens[j], gen.texts[j]
            self.unclosed += sum(not c for c in gen.closed)
        reembed_s = time.perf_counter() - t0
        p = run.gate.p_open.tolist()
        base = 1000 * run.gate_s / max(1, len(inputs))
        extra = 1000 * (run.span_s + reembed_s) / max(1, len(idx))
        chosen = set(idx)
        self.latency_ms += [base + (extra if i in chosen else 0.0) for i in range(len(inputs))]
        self.generated_tokens += tokens
        self.invoked += [i in chosen for i in range(len(inputs))]
        self.p_open += p
        self.last_rationales = rats
        return out

    def reset(self) -> None:
        self.generated_tokens, self.invoked, self.p_open, self.latency_ms = [], [], [], []
        self.unclosed, self.last_rationales = 0, []
