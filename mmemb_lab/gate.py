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
    and latency (:func:`sweep`).

Costs to know: the prompt is prefilled once for the gate and the generation together (the rotary
positions are computed here, so continuing the cache does not depend on the model's stored
``rope_deltas``); the re-embedding after the rationale is a second prefill, as in the "always" mode
(``inference``), so the two modes pay the same for the same rationale.

Used by: evaluation mode "adaptive" (``AdaptiveEncoder``, through ``modes.encoder_for``), the
threshold sweep in summary.json ``gate.curve``, stage 2's invocation probe, notebook 05.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import EMB_TOKEN, THINK_OPEN, Backbone
from .data import load_eval
from .embed import Input, base_model, collate, embed, pool
from .inference import (
    LATENCY_SAMPLE,
    MAX_NEW_TOKENS,
    THRESHOLD,
    Generated,
    cache_of,
    embed_after,
    rope_positions,
    write_spans,
)
from .scoring import aggregate_results, score_set


@dataclass(frozen=True)
class GateOutput:
    """The single prefill's two products, for n inputs."""

    direct: torch.Tensor
    """(n, hidden) unit-norm direct embeddings (state at ``<|emb|>``)."""
    p_think: torch.Tensor
    """(n,) p(<think>) at the assistant start, full softmax over the vocabulary."""
    p_emb: torch.Tensor
    """(n,) p(<|emb|>) at the assistant start."""

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
    g = GateOutput(pool(states).cpu(), logp[:, think].exp().cpu(), logp[:, emb].exp().cpu())
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
        return GateOutput(torch.zeros(0, h), torch.zeros(0), torch.zeros(0))
    return GateOutput(*(torch.cat([getattr(o, f) for o in outs]) for f in ("direct", "p_think", "p_emb")))


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


def gate_precision_recall(invoked: Sequence[bool], positive: Sequence[bool]) -> tuple[float | None, float | None]:
    """Precision and recall of the gate's invocations against a reference (``needs_reasoning``, the
    oracle's choice...); None where undefined (nothing invoked / no positives)."""
    inv, pos = np.asarray(invoked, bool), np.asarray(positive, bool)
    tp = float((inv & pos).sum())
    precision = tp / inv.sum() if inv.any() else None
    recall = tp / pos.sum() if pos.any() else None
    return precision, recall


@dataclass(frozen=True)
class SweepPoint:
    """One threshold of the sweep."""

    threshold: float
    invocation_rate: float
    """Fraction of all evaluation queries whose p_open exceeds the threshold."""
    invocation_rate_easy: float | None
    invocation_rate_hard: float | None
    overall: float
    """MMEB-style overall score (unweighted mean over datasets), percent."""
    easy: float | None
    hard: float | None
    per_meta_task: dict
    latency_ms_per_query: float
    """Gate prefill + (invoked) generation and re-embedding, per query at batch size 1, from the
    per-query times measured on the latency sample."""
    generated_tokens_per_query: float

    def summary(self) -> dict:
        return {"threshold": self.threshold, "invocation_rate": self.invocation_rate,
                "invocation_rate_easy": self.invocation_rate_easy, "invocation_rate_hard": self.invocation_rate_hard,
                "overall": self.overall, "easy": self.easy, "hard": self.hard, "per_meta_task": self.per_meta_task,
                "latency_ms_per_query": self.latency_ms_per_query,
                "generated_tokens_per_query": self.generated_tokens_per_query}


@dataclass
class DatasetGate:
    """One evaluation set after :func:`gate_pass`: every query's gate score, direct and reasoned embedding."""

    es: object
    c_emb: torch.Tensor
    direct: torch.Tensor
    reasoned: torch.Tensor
    """Rows valid where ``p`` exceeds the pass's smallest threshold (elsewhere: the direct embedding)."""
    p: np.ndarray
    tokens: np.ndarray
    hard: np.ndarray
    metric: str

    def score(self, use: np.ndarray):
        """The dataset's result when the queries in ``use`` reason and the others embed directly."""
        q = torch.where(torch.as_tensor(use)[:, None], self.reasoned, self.direct)
        return score_set(self.es, q, self.c_emb, self.metric)


@dataclass(frozen=True)
class GatePass:
    """Everything a threshold needs, computed once: per-dataset gates and per-query batch-1 timings."""

    per: dict[str, DatasetGate]
    lat_gate: np.ndarray
    """Gate prefill alone (ms), per sampled query."""
    lat_reason: np.ndarray
    """Generation + re-embedding (ms), per sampled query."""
    lat_p: np.ndarray
    """The sampled queries' gate scores."""
    batched_ms: dict
    """Batched wall time per query (ms): "gate" (the prefill) and "reason" (per reasoned query)."""


def gate_pass(backbone: Backbone, world_root, registry: dict, min_threshold: float, max_new_tokens: int = MAX_NEW_TOKENS,
              batch_size: int = 32, latency_sample: int = LATENCY_SAMPLE, progress: bool = False, split: str = "eval") -> GatePass:
    """ONE pass over the evaluation sets (``split``: ``eval``, or the world's ``val`` queries): gate prefill for
    every query, a rationale and re-embedding for every query whose p_open exceeds ``min_threshold`` (all of
    them when it is below 0), and batch-1 timings of the gate and of the reasoning on the first
    ``latency_sample`` queries of each set."""

    per: dict[str, DatasetGate] = {}
    lat_gate, lat_reason, lat_p = [], [], []
    t_gate, t_reason, n_q, n_r = 0.0, 0.0, 0, 0
    for name, info in tqdm(registry.items(), desc=f"gate pass ({split})", disable=not progress):
        es = load_eval(world_root, name, info.eval_type, split=split)
        if not es.queries:
            continue
        inputs = [q.query for q in es.queries]
        c_emb = embed(backbone, list(es.candidates.values()), batch_size=batch_size)
        run = gate_and_spans(backbone, inputs, min_threshold, max_new_tokens, batch_size)
        g, idx, gen = run.gate, run.opened, run.spans
        t_gate += run.gate_s
        p = g.p_open.numpy().astype(float)
        reasoned = g.direct.clone()
        tokens = np.zeros(len(inputs))
        if idx:
            sub = [inputs[i] for i in idx]
            t0 = time.perf_counter()
            reasoned[idx] = embed_after(backbone, sub, gen.texts, batch_size)
            t_reason += run.span_s + time.perf_counter() - t0
            tokens[idx] = gen.n_tokens
        n_q, n_r = n_q + len(inputs), n_r + len(idx)
        hard = np.array([bool(q.needs_reasoning) for q in es.queries])
        per[name] = DatasetGate(es, c_emb, g.direct, reasoned, p, tokens, hard, info.metric)
        for i, x in enumerate(inputs[:latency_sample]):
            one = gate_and_spans(backbone, [x], -1.0, max_new_tokens)  # every sampled query writes its span
            t0 = time.perf_counter()
            embed_after(backbone, [x], one.spans.texts)
            lat_gate.append(1000 * one.gate_s)
            lat_reason.append(1000 * (one.span_s + time.perf_counter() - t0))
            lat_p.append(p[i])
    if not per:
        raise ValueError(f"no {split} queries under {world_root}")
    return GatePass(per, np.asarray(lat_gate), np.asarray(lat_reason), np.asarray(lat_p),
                    {"gate": 1000 * t_gate / max(1, n_q), "reason": 1000 * t_reason / max(1, n_r)})


def sweep_points(gp: GatePass, registry: dict, thresholds: Sequence[float]) -> list[SweepPoint]:
    """Every threshold's point from one :class:`GatePass`, in decreasing threshold order (so with
    non-decreasing invocation rate and latency, by construction)."""

    points = []
    for t in sorted({float(t) for t in thresholds}, reverse=True):
        per, n_inv, n_all, toks = {}, 0, 0, 0.0
        inv_easy, inv_hard = [], []
        for name, dg in gp.per.items():
            use = dg.p > t
            per[name] = dg.score(use)
            n_inv += int(use.sum())
            n_all += len(use)
            toks += float(dg.tokens[use].sum())
            inv_easy += list(use[~dg.hard])
            inv_hard += list(use[dg.hard])
        agg = aggregate_results(per, registry, "adaptive")
        lat = float(np.mean(gp.lat_gate + (gp.lat_p > t) * gp.lat_reason)) if len(gp.lat_gate) else float("nan")
        points.append(SweepPoint(
            t, n_inv / n_all, float(np.mean(inv_easy)) if inv_easy else None,
            float(np.mean(inv_hard)) if inv_hard else None, agg.overall, agg.easy, agg.hard,
            dict(agg.per_meta_task), lat, toks / n_all))
    return points


def choose_threshold(points: Sequence[SweepPoint]) -> SweepPoint:
    """A sweep's best point by its overall score; among points tied with the best (within 1e-9), the one
    with the highest threshold: the fewest openings, hence the lowest cost. Run on the validation split."""
    best = max(p.overall for p in points)
    return max((p for p in points if p.overall >= best - 1e-9), key=lambda p: p.threshold)


def sweep(backbone: Backbone, world_root, registry: dict, thresholds: Sequence[float], max_new_tokens: int = MAX_NEW_TOKENS,
          batch_size: int = 32, latency_sample: int = LATENCY_SAMPLE, progress: bool = False) -> list[SweepPoint]:
    """Accuracy, invocation rate and latency for every threshold, from ONE pass over the evaluation sets.

    Each query's gate score, direct embedding and (where it exceeds the smallest threshold) reasoned
    embedding are computed once (:func:`gate_pass`); each threshold then picks per query
    (:func:`sweep_points`). Latency: on the first ``latency_sample`` queries of each dataset, the gate
    prefill and the reasoning (generation + re-embedding) are timed separately at batch size 1; a
    threshold's latency is the mean of gate + [p_open > threshold] * reasoning over those queries.
    Points come back in decreasing threshold order, hence non-decreasing invocation rate (and latency).
    """
    ths = [float(t) for t in thresholds]
    if not ths:
        raise ValueError("no thresholds")
    gp = gate_pass(backbone, world_root, registry, min(ths), max_new_tokens, batch_size, latency_sample, progress)
    return sweep_points(gp, registry, ths)
