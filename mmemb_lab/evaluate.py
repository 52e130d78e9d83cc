"""Evaluation by MMEB-V2's rules, on the toy world or real MMEB data (same harness).

Concept
    Each query is ranked against its candidates by cosine similarity of embeddings: its own candidate
    list for *local* tasks, the whole deduplicated corpus for *global* ones (every candidate embedded
    once). Scores per dataset are Hit@1 (image, video) or linear NDCG@5 with graded relevance (visual
    documents), in percent. Columns: per modality and meta-task, unweighted means over datasets;
    overall = unweighted mean over *datasets* (not over modalities) - docs/method.md, MMEB-V2.

    The toy world adds what no benchmark has: every query knows whether it ``needs_reasoning``, so
    each score splits into **easy** and **hard** (each again an unweighted mean over datasets).

    A *mode* decides how queries are embedded: "direct" here; reasoning modes plug in as another
    ``QueryEncoder`` (later stages). Latency per query is measured at batch size 1 on a sample of
    queries (what a user waiting for one answer sees); batched time per query is reported beside it.

Used by: the demo (``eval.direct`` in summary.json), notebooks 01 and 06, ``mmemb-lab evaluate``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .backbone import Backbone
from .data import EvalSet, load_eval
from .embed import embed
from .inference import LATENCY_SAMPLE
from .metrics import aggregate, score_queries
from .modes import QueryEncoder, direct_encoder  # noqa: F401 - one definition each, importable from here too
from .modes import latency_ms as _latency
from .registry import DatasetInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetScore:
    name: str
    metric: str
    score: float
    """Headline metric in percent."""
    per_query: np.ndarray
    """(n_queries,) headline metric per query, in [0, 1]."""
    needs_reasoning: np.ndarray
    """(n_queries,) the world's label (all False where unknown)."""
    top1: list[str]
    """Key of the top-ranked candidate per query (the predictions file)."""
    at_k: dict[str, float]
    """hit@k and ndcg_linear@k for k in 1, 5, 10, in percent."""
    skipped: int = 0
    problems: tuple[str, ...] = ()
    """Why rows were skipped (the first few reasons)."""
    warnings: tuple[str, ...] = ()
    """Why the score may mean nothing (query or candidate embeddings (near) constant: a collapsed model)."""

    def split(self, hard: bool) -> float | None:
        m = self.needs_reasoning == hard
        return float(100 * self.per_query[m].mean()) if m.any() else None


@dataclass(frozen=True)
class EvalResult:
    mode: str
    per_dataset: dict[str, DatasetScore]
    overall: float
    easy: float | None
    hard: float | None
    per_modality: dict[str, float]
    per_meta_task: dict[str, float]
    latency_ms_per_query: float
    """Mean wall time to embed one query alone (batch size 1), ms."""
    batched_ms_per_query: float
    """Wall time per query when queries are embedded in batches, ms."""
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"overall": self.overall, "easy": self.easy, "hard": self.hard,
                "per_dataset": {k: v.score for k, v in self.per_dataset.items()},
                "per_dataset_easy": {k: v.split(False) for k, v in self.per_dataset.items()},
                "per_dataset_hard": {k: v.split(True) for k, v in self.per_dataset.items()},
                "per_modality": self.per_modality, "per_meta_task": self.per_meta_task,
                "latency_ms_per_query": self.latency_ms_per_query,
                "batched_ms_per_query": self.batched_ms_per_query,
                "skipped": {k: v.skipped for k, v in self.per_dataset.items() if v.skipped},
                "skip_reasons": {k: list(v.problems[:3]) for k, v in self.per_dataset.items() if v.problems},
                **self.extra}


COLLAPSE_DISTANCE = 1e-3
"""Mean pairwise cosine distance below which a set of embeddings counts as (near) constant."""


def mean_cosine_distance(emb: torch.Tensor) -> float | None:
    """Mean of ``1 - cos(e_i, e_j)`` over all pairs i != j of rows of ``emb`` (None for fewer than 2 rows).

    Exact and O(n dim): for unit vectors u_i, sum over i != j of u_i . u_j = |sum_i u_i|^2 - n.
    """
    n = len(emb)
    if n < 2:
        return None
    u = torch.nn.functional.normalize(emb.double(), dim=-1)
    total = u.sum(0)
    mean_cos = (total @ total - (u * u).sum()) / (n * (n - 1))
    return float(1.0 - mean_cos)


def collapse_warnings(name: str, q_emb: torch.Tensor, c_emb: torch.Tensor,
                      threshold: float = COLLAPSE_DISTANCE) -> tuple[str, ...]:
    """One message per side (queries, candidates) whose embeddings are (near) constant, each also logged.

    A collapsed model maps every input to (almost) the same vector; its ranking is then decided by ties
    or float noise, so its score says nothing about retrieval, whatever its value.
    """
    out = []
    for side, emb in (("query", q_emb), ("candidate", c_emb)):
        d = mean_cosine_distance(emb)
        if d is not None and d < threshold:
            out.append(f"{name}: {side} embeddings are (near) constant (mean pairwise cosine distance {d:.2e} "
                       f"< {threshold:g} over {len(emb)}): a collapsed model, the score is not meaningful")
            log.warning(out[-1])
    return tuple(out)


def _top1(s: np.ndarray, grades: dict[int, float]) -> int:
    """The candidate ranked first under ``metrics.rank_candidates``' tie rule (worst grade wins a tie)."""
    tied = np.flatnonzero(s == s.max())
    return int(min(tied, key=lambda j: (grades.get(int(j), 0.0), j)))


def score_set(es: EvalSet, q_emb: torch.Tensor, c_emb: torch.Tensor, metric: str) -> DatasetScore:
    """Rank candidates by cosine similarity and score each query.

    Ties count against the model (``metrics.rank_candidates``), and (near) constant query or candidate
    embeddings are flagged in ``warnings`` (``collapse_warnings``).
    """
    keys = list(es.candidates)
    index = {k: i for i, k in enumerate(keys)}
    sims = (q_emb @ c_emb.T).numpy()
    scores, labels, top1 = [], [], []
    for qi, q in enumerate(es.queries):
        cols = [index[k] for k in q.candidates]
        s = sims[qi, cols]
        scores.append(s)
        labels.append({j: q.relevance[k] for j, k in enumerate(q.candidates) if k in q.relevance})
        top1.append(q.candidates[_top1(s, labels[-1])])
    qs = score_queries(scores, labels, metric=metric, ks=(1, 5, 10))
    main = qs.hit[1] if metric.startswith("hit") else qs.ndcg_linear[int(metric.split("@")[1])]
    nr = np.array([bool(q.needs_reasoning) for q in es.queries])
    at_k = {k: 100 * float(v) for k, v in qs.means.items()}
    return DatasetScore(es.name, metric, 100 * float(np.mean(main)), np.asarray(main, dtype=float), nr, top1, at_k,
                        es.skipped, warnings=collapse_warnings(es.name, q_emb, c_emb))


def evaluate(backbone: Backbone, world_root: str | Path, registry: dict[str, DatasetInfo], mode: str = "direct",
             encoder: QueryEncoder | None = None, out_dir: str | Path | None = None, strict: bool = False,
             latency_sample: int = LATENCY_SAMPLE, progress: bool = True) -> EvalResult:
    """Score every dataset of ``registry`` found under ``world_root``; optionally write per-dataset files."""
    from tqdm.auto import tqdm

    encode = encoder or direct_encoder(backbone)
    cand_encode = direct_encoder(backbone)
    per: dict[str, DatasetScore] = {}
    lat, batched, nq, gen_tokens = [], 0.0, 0, 0
    for name, info in tqdm(registry.items(), desc=f"eval {mode}", disable=not progress):
        es = load_eval(world_root, name, info.eval_type, strict=strict)
        if not es.queries:
            log.warning("%s: no usable queries (%d rows skipped: %s)", name, es.skipped, "; ".join(es.problems[:3]))
            continue
        c_emb = cand_encode(list(es.candidates.values()))
        inputs = [q.query for q in es.queries]
        n_tok0 = sum(getattr(encode, "generated_tokens", []))
        t = time.perf_counter()
        q_emb = encode(inputs)
        batched += time.perf_counter() - t
        nq += len(inputs)
        gen_tokens += sum(getattr(encode, "generated_tokens", [])) - n_tok0
        lat.append(_latency(encode, inputs, latency_sample))
        per[name] = replace(score_set(es, q_emb, c_emb, info.metric), skipped=es.skipped, problems=es.problems)
        if out_dir is not None:
            write_dataset_files(Path(out_dir) / mode, per[name], es)
    return eval_result(mode, per, registry, float(np.mean(lat)) if lat else float("nan"), 1000 * batched / max(1, nq),
                       {"generated_tokens_per_query": gen_tokens / max(1, nq)})


def eval_result(mode: str, per: dict[str, DatasetScore], registry: dict[str, DatasetInfo], latency_ms: float,
                batched_ms: float, extra: dict | None = None) -> EvalResult:
    """An ``EvalResult`` from per-dataset scores: aggregates by MMEB-V2 rules, easy / hard as unweighted
    means over the datasets that have such items (``evaluate``, the oracle, the gate pass)."""
    agg = aggregate({k: v.score for k, v in per.items()}, {k: registry[k] for k in per})

    def split(hard: bool) -> float | None:
        vals = [v.split(hard) for v in per.values() if v.split(hard) is not None]
        return float(np.mean(vals)) if vals else None

    return EvalResult(mode, per, agg.overall, split(False), split(True), dict(agg.per_modality),
                      dict(agg.per_meta_task), latency_ms, batched_ms, dict(extra or {}))


def mixed_cost(direct: float, always: float, share: float) -> float:
    """Per-query cost when a ``share`` of queries reason and the rest embed directly."""
    return direct + share * (always - direct)


def combine_oracle(direct: EvalResult, always: EvalResult, registry: dict[str, DatasetInfo]) -> EvalResult:
    """Per query, the better of direct and always (ties go to direct): an upper bound for any gate.

    Latency and tokens are charged per query to the mode the oracle picks (reasoning only where it is
    strictly better)."""
    per, reason_share = {}, []
    for name, d in direct.per_dataset.items():
        a = always.per_dataset[name]
        use = a.per_query > d.per_query
        reason_share.append(use)
        pq = np.where(use, a.per_query, d.per_query)
        top1 = [ta if u else td for u, ta, td in zip(use, a.top1, d.top1)]
        per[name] = DatasetScore(name, d.metric, 100 * float(pq.mean()), pq, d.needs_reasoning, top1, {}, d.skipped)
    share = float(np.mean(np.concatenate(reason_share))) if reason_share else 0.0
    lat = mixed_cost(direct.latency_ms_per_query, always.latency_ms_per_query, share)
    bat = mixed_cost(direct.batched_ms_per_query, always.batched_ms_per_query, share)
    tok = share * always.extra.get("generated_tokens_per_query", 0.0)
    return eval_result("oracle", per, registry, lat, bat, {"generated_tokens_per_query": tok, "reasoning_share": share})


def write_dataset_files(out: Path, s: DatasetScore, es: EvalSet) -> None:
    """``{dataset}_score.json`` (hit@k / ndcg_linear@k, k in 1, 5, 10) and ``{dataset}_pred.jsonl``."""
    from .train import atomic_write_text

    atomic_write_text(out / f"{s.name}_score.json", json.dumps(
        {"dataset": s.name, "metric": s.metric, "score": s.score, **s.at_k, "n_queries": len(s.per_query),
         "skipped": s.skipped, "problems": list(s.problems)}, indent=1))
    lines = [json.dumps({"query": q.item_id, "top1": t, "correct": float(c), "needs_reasoning": bool(h)})
             for q, t, c, h in zip(es.queries, s.top1, s.per_query, s.needs_reasoning)]
    atomic_write_text(out / f"{s.name}_pred.jsonl", "\n".join(lines) + "\n")


@dataclass(frozen=True)
class ItemScores:
    """One toy item scored by the embedder: what notebooks show for a single example."""

    item: object
    similarities: np.ndarray
    """(n_candidates,) cosine similarity of the query to each candidate."""
    top1: int
    correct: bool


def score_item(backbone: Backbone, item, rationale: str | None = None, pool: Sequence | None = None) -> ItemScores:
    """Embed one toy-world item's query (direct, or after ``rationale``) and its candidates.

    Global items (one target) are scored against ``pool`` (other items of the same dataset) when given.
    """
    from .data import item_candidates, item_query

    items = [item] + list(pool or [])
    cands = [c for it in items for c in item_candidates(it)]
    q = embed(backbone, [item_query(item, rationale)])
    c = embed(backbone, cands)
    sims = (q @ c.T)[0].numpy()
    top = int(np.argmax(sims))
    return ItemScores(item, sims, top, top in item.labels)
