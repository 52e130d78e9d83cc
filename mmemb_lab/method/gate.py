"""The gate's operating point: one gate pass per split, a sweep of thresholds, and the choice on validation.

Concept (docs/method.md, step 5)
    The trained gate (``model.gating``) opens where p_open exceeds a threshold, an inference-time knob.
    One gate pass (:func:`gate_pass`) decides for every query at the lowest threshold and writes every span
    that any threshold would need, so each threshold of a sweep (:func:`sweep_points`) is scored from the
    same pass: accuracy against invocation rate and latency. The threshold that runs is chosen on the
    validation split (:func:`choose_threshold`); evaluation only reports.

Used by: stage 2 (``method.stage2``: the threshold on validation, summary.json ``gate.curve``), notebook 05.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import load_eval
from ..eval.scoring import aggregate_results, score_set
from ..model.backbone import Backbone
from ..model.embed import embed
from ..model.gating import gate_and_spans, p_open_for_row
from ..model.inference import LATENCY_SAMPLE, MAX_NEW_TOKENS, embed_after


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
    state: torch.Tensor | None = None
    """(n, hidden) each query's state at the assistant start (``gating.GateOutput.state``)."""

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
        per[name] = DatasetGate(es, c_emb, g.direct, reasoned, p, tokens, hard, info.metric, g.state)
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


def with_think_row(gp: GatePass, backbone: Backbone, think_row: torch.Tensor) -> GatePass:
    """``gp`` with every query's p_open recomputed for another ``<think>`` output row (a stage-2 snapshot):
    the embeddings and spans stay, since that row is all GRPO trains with ``RLConfig.train = "decision"``.
    ``gp`` must have reasoned for every query (``min_threshold`` < 0), so that any threshold finds its spans."""
    per = {}
    for name, dg in gp.per.items():
        if dg.state is None:
            raise ValueError(f"{name}: the gate pass kept no decision states")
        per[name] = replace(dg, p=p_open_for_row(backbone, dg.state, think_row).numpy().astype(float))
    # the latency sample's gate scores were the old row's: no latency is estimated for another row
    return replace(gp, per=per, lat_gate=gp.lat_gate[:0], lat_reason=gp.lat_reason[:0], lat_p=gp.lat_p[:0])


def choose_step_and_threshold(gp: GatePass, backbone: Backbone, rows: dict[int, torch.Tensor], registry: dict,
                              thresholds: Sequence[float]) -> dict:
    """The stage-2 snapshot and threshold with the best overall score on ``gp`` (a validation pass that reasoned
    for every query): for each kept ``<think>`` row ({GRPO step: row}; step 0 is the stage-1 gate), the
    sweep and its :func:`choose_threshold`; the best step by overall score, ties going to the fewest
    openings, then to the later step. Early stopping on validation: what GRPO's steps are worth is measured,
    not assumed (docs/research-log.md, Stage 2: the GRPO step chosen on validation)."""
    per_step, curves = [], {}
    for step in sorted(rows):
        points = sweep_points(with_think_row(gp, backbone, rows[step]), registry, thresholds)
        best = choose_threshold(points)
        curves[step] = points
        per_step.append({"step": step, "threshold": best.threshold, "overall": best.overall,
                         "invocation_rate": best.invocation_rate})
    top = max(r["overall"] for r in per_step)
    pick = min((r for r in per_step if r["overall"] >= top - 1e-9), key=lambda r: (r["invocation_rate"], -r["step"]))
    return {"step": pick["step"], "threshold": pick["threshold"], "per_step": per_step,
            "curve": [{k: v for k, v in p.summary().items() if k not in ("per_meta_task", "latency_ms_per_query")}
                      for p in curves[pick["step"]]]}
