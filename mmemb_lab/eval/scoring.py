"""Scores and results: one scoring function and one result type per level, for every mode and source.

Concept
    Each query is ranked against its candidates by cosine similarity of embeddings: its own candidate
    list for *local* tasks, the whole deduplicated corpus for *global* ones (every candidate embedded
    once). :func:`score_set` scores one dataset: Hit@1 (image, video) or linear NDCG@5 with graded
    relevance (visual documents), in percent, plus every query's own score and top-ranked candidate.
    :func:`aggregate_results` makes the benchmark's result from the datasets': per modality and meta-task,
    unweighted means over datasets; overall = unweighted mean over *datasets* (``metrics.aggregate``).

    The toy world adds what no benchmark has: every query knows whether it ``needs_reasoning``, so each
    score splits into **easy** and **hard** (each again an unweighted mean over datasets).

    :class:`DatasetResult` and :class:`BenchmarkResult` are the only result types: the harness writes and
    reads them (``<dataset>_score.json``, ``<dataset>_pred.jsonl``, ``results.json``), the gate's
    threshold sweep and the demo's ``summary.json`` are made of them.

Used by: ``harness`` (every mode, every source), ``gate`` and ``stage2`` (modes scored from one gate
pass), ``selection`` (the gold rationale's gain), notebooks 00 and 01 (:func:`score_item`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..data import DatasetInfo, item_candidates, item_query
from ..model.embed import embed
from ..runs import atomic_write_text
from ..summary import ModeScores
from .metrics import aggregate, score_queries

__all__ = ["COLLAPSE_DISTANCE", "mean_cosine_distance", "collapse_warnings", "DatasetResult", "BenchmarkResult",
           "score_set", "aggregate_results", "mixed_cost", "oracle_picks", "prediction_ids", "write_dataset",
           "read_dataset", "ItemScores", "score_item"]

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------
# the result types

_PER_QUERY = ("per_query", "needs_reasoning", "top1")  # kept in the predictions file, not the score file


@dataclass(frozen=True)
class DatasetResult:
    """One dataset's score and everything needed to compare it with someone else's (the score file), with
    every query's own score and top-ranked candidate (the predictions file)."""

    name: str
    metric: str
    score: float
    """Headline metric in percent."""
    at_k: dict
    """``hit@k`` and ``ndcg_linear@k`` for k in 1, 5, 10, in percent."""
    n_queries: int
    n_candidates: int
    modality: str = ""
    meta_task: str = ""
    skipped: int = 0
    """Records skipped (bad data), all counted; ``problems`` keeps the first messages."""
    problems: tuple[str, ...] = ()
    split_version: str = ""
    mode: str = ""
    prompt: str = "user"
    video_mode: str = ""
    latency_ms_per_query: float | None = None
    """Mean wall time to embed one query alone (batch size 1), ms."""
    batched_ms_per_query: float | None = None
    """Wall time per query when embedded in batches, ms."""
    generated_tokens_per_query: float | None = None
    """Mean tokens generated per query (None: the encoder does not generate)."""
    easy: float | None = None
    """Score on items that need no reasoning (toy world only), percent."""
    hard: float | None = None
    """Score on items that need reasoning (toy world only), percent."""
    warnings: tuple[str, ...] = ()
    """Why the score may mean nothing (collapsed embeddings: :func:`collapse_warnings`)."""
    reasoned_share: float | None = None
    """Share of the scored queries that reasoned first (None: the encoder does not say)."""
    per_query: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    """(n_queries,) headline metric per query, in [0, 1]."""
    needs_reasoning: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)
    """(n_queries,) the world's label (False where unknown: then ``easy`` and ``hard`` are None)."""
    top1: list = field(default_factory=list, repr=False)
    """Key of the top-ranked candidate per query."""
    resumed: bool = False
    """True when read back from an existing score file instead of computed in this run."""

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _PER_QUERY + ("resumed",)}
        d = json.loads(json.dumps(d, default=list))
        d.update({"dataset": self.name, **self.at_k})
        return d

    @classmethod
    def from_json(cls, d: dict, per_query: Sequence[dict] = ()) -> "DatasetResult":
        """From a score file's dict and, optionally, the rows of the predictions file."""
        names = {f.name for f in fields(cls)} - set(_PER_QUERY) - {"resumed"}
        kw = {k: v for k, v in d.items() if k in names}
        kw["problems"] = tuple(kw.get("problems", ()))
        kw["warnings"] = tuple(kw.get("warnings", ()))
        if per_query:
            kw["per_query"] = np.array([float(r["score"]) for r in per_query])
            kw["needs_reasoning"] = np.array([bool(r.get("needs_reasoning")) for r in per_query])
            kw["top1"] = [r["top1"] for r in per_query]
        return cls(**kw, resumed=True)


@dataclass(frozen=True)
class BenchmarkResult:
    """Every scored dataset of one mode, aggregated by MMEB-V2's rules (``results.json``)."""

    benchmark: str
    mode: str
    prompt: str
    video_mode: str
    backbone: str
    per_dataset: dict[str, DatasetResult]
    overall: float
    """Unweighted mean over the scored datasets (NaN when none was scored)."""
    per_modality: dict[str, float]
    per_meta_task: dict[str, float]
    n_datasets: int
    missing: tuple[str, ...] = ()
    """Registry datasets without a score (not found, or no usable query)."""
    skipped_records: int = 0
    """Bad records skipped over all datasets."""
    embedded: dict = field(default_factory=dict)
    """Inputs embedded in THIS run: {"queries": n, "candidates": n} (0 and 0 for a fully resumed run)."""
    upper_bound: bool = False
    """True for the oracle: it picks per query with the answers known, so no method can score above it."""
    extra: dict = field(default_factory=dict)
    """Run-level measurements that replace the per-dataset means of the same name (a latency timed on a
    sample drawn across datasets, for instance) or add to them (``summary()``)."""

    def _mean(self, key: str) -> float | None:
        if key in self.extra:
            return self.extra[key]
        vals = [getattr(r, key) for r in self.per_dataset.values() if getattr(r, key) is not None]
        return float(np.mean(vals)) if vals else None

    easy = property(lambda self: self._mean("easy"), doc="Unweighted mean over datasets of their easy scores.")
    hard = property(lambda self: self._mean("hard"), doc="Unweighted mean over datasets of their hard scores.")
    latency_ms_per_query = property(lambda self: self._mean("latency_ms_per_query"))
    batched_ms_per_query = property(lambda self: self._mean("batched_ms_per_query"))
    generated_tokens_per_query = property(lambda self: self._mean("generated_tokens_per_query"))
    reasoned_share = property(lambda self: self._mean("reasoned_share"))

    def scores(self) -> ModeScores:
        """This result as the demo's summary holds a mode (``Summary.eval``), for the figures."""
        return ModeScores.from_json(self.summary())

    def summary(self) -> dict:
        per = self.per_dataset
        return {"benchmark": self.benchmark, "mode": self.mode, "prompt": self.prompt, "video_mode": self.video_mode,
                "backbone": self.backbone, "overall": self.overall, "n_datasets": self.n_datasets,
                "missing": list(self.missing), "per_modality": self.per_modality,
                "per_meta_task": self.per_meta_task, "per_dataset": {k: v.score for k, v in per.items()},
                "per_dataset_easy": {k: v.easy for k, v in per.items()},
                "per_dataset_hard": {k: v.hard for k, v in per.items()},
                "split_versions": {k: v.split_version for k, v in per.items()},
                "skipped_records": self.skipped_records,
                "skipped": {k: v.skipped for k, v in per.items() if v.skipped},
                "skip_reasons": {k: list(v.problems[:3]) for k, v in per.items() if v.problems},
                "easy": self.easy, "hard": self.hard, "latency_ms_per_query": self.latency_ms_per_query,
                "batched_ms_per_query": self.batched_ms_per_query,
                "generated_tokens_per_query": self.generated_tokens_per_query,
                "reasoned_share": self.reasoned_share, "upper_bound": self.upper_bound, "embedded": self.embedded,
                **self.extra}


# ---------------------------------------------------------------------------------------------
# scoring


def _top1(s: np.ndarray, grades: dict[int, float]) -> int:
    """The candidate ranked first under ``metrics.rank_candidates``' tie rule (worst grade wins a tie)."""
    tied = np.flatnonzero(s == s.max())
    return int(min(tied, key=lambda j: (grades.get(int(j), 0.0), j)))


def score_set(es, q_emb: torch.Tensor, c_emb: torch.Tensor, metric: str) -> DatasetResult:
    """Rank candidates by cosine similarity and score each query of ``es`` (``data.EvalSet`` or
    ``mmeb.MMEBSet``, ``q_emb`` row i for query i, ``c_emb`` in the order of ``es.candidates``).

    Ties count against the model (``metrics.rank_candidates``), and (near) constant query or candidate
    embeddings are flagged in ``warnings`` (:func:`collapse_warnings`). Easy and hard are set where the
    queries know whether they need reasoning (the toy world)."""
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
    main = np.asarray(qs.hit[1] if metric.startswith("hit") else qs.ndcg_linear[int(metric.split("@")[1])],
                      dtype=float)
    nr = np.array([bool(q.needs_reasoning) for q in es.queries], dtype=bool)
    known = any(q.needs_reasoning is not None for q in es.queries)

    def split(hard: bool) -> float | None:
        m = nr == hard
        return float(100 * main[m].mean()) if known and m.any() else None

    return DatasetResult(es.name, metric, 100 * float(np.mean(main)), {k: 100 * float(v) for k, v in qs.means.items()},
                         len(es.queries), len(es.candidates), skipped=es.skipped, problems=tuple(es.problems),
                         easy=split(False), hard=split(True), warnings=collapse_warnings(es.name, q_emb, c_emb),
                         per_query=main, needs_reasoning=nr, top1=top1)


def aggregate_results(per: Mapping[str, DatasetResult], registry: Mapping[str, DatasetInfo], mode: str,
                      benchmark: str = "toy", prompt: str = "user", video_mode: str = "", backbone: str = "",
                      embedded: dict | None = None, upper_bound: bool = False,
                      extra: dict | None = None) -> BenchmarkResult:
    """The benchmark's result from its datasets' (MMEB-V2's rules: ``metrics.aggregate``)."""
    scores = {k: v.score for k, v in per.items()}
    agg = aggregate(scores, {k: registry[k] for k in per}) if scores else None
    return BenchmarkResult(benchmark, mode, prompt, video_mode, backbone, dict(per),
                           agg.overall if agg else float("nan"), dict(agg.per_modality) if agg else {},
                           dict(agg.per_meta_task) if agg else {}, len(per), tuple(n for n in registry if n not in per),
                           sum(r.skipped for r in per.values()), dict(embedded or {}), upper_bound, dict(extra or {}))


def mixed_cost(direct: float, always: float, share: float) -> float:
    """Per-query cost when a ``share`` of queries reason and the rest embed directly."""
    return direct + share * (always - direct)


def oracle_picks(direct: np.ndarray, always: np.ndarray) -> np.ndarray:
    """The oracle's rule, per query: reason where that query scores strictly higher after reasoning (ties go
    to direct: reasoning must pay for its cost). An upper bound for any gate, since it reads the answers."""
    return np.asarray(always) > np.asarray(direct)


# ---------------------------------------------------------------------------------------------
# the per-dataset files


def prediction_ids(item_ids: Sequence[str]) -> list[str]:
    """Query ids of the predictions file: unique, and stable across runs and modes (so files can be joined).

    An item id that repeats in the loaded set (a table with a repeated qry_id) or is empty gets the query's
    position in the loaded set appended; positions are taken before unreadable queries are dropped, so one
    query's id does not depend on whether another could be read."""
    counts: dict[str, int] = {}
    for iid in item_ids:
        counts[iid] = counts.get(iid, 0) + 1
    used = {iid for iid in item_ids if iid and counts[iid] == 1}
    out = []
    for i, iid in enumerate(item_ids):
        new = iid
        if not iid or counts[iid] > 1:
            new = f"{iid}@{i}"
            while new in used:  # an item id of the set already reads "<id>@<position>"
                new = f"{new}@{i}"
            used.add(new)
        out.append(new)
    return out


def write_dataset(res_dir: Path, r: DatasetResult, item_ids: Sequence[str], generated: Sequence | None = None,
                  reasoned: Sequence | None = None, rationales: Sequence | None = None) -> None:
    """``<dataset>_pred.jsonl`` (per scored query: id, top-1 key, score, label, what it generated), then
    ``<dataset>_score.json``, written last: a dataset with a score file is finished.

    ``item_ids``: the scored queries' ids (:func:`prediction_ids`); the per-query lists are aligned with them
    (None: not reported)."""
    n = len(item_ids)
    generated, reasoned, rationales = (list(x) if x is not None else [None] * n
                                       for x in (generated, reasoned, rationales))
    known = r.easy is not None or r.hard is not None
    lines = [json.dumps({"query": q, "top1": t, "score": float(v), "needs_reasoning": bool(h) if known else None,
                         "generated_tokens": g, "reasoned": d, "rationale": ra})
             for q, t, v, h, g, d, ra in zip(item_ids, r.top1, r.per_query, r.needs_reasoning, generated, reasoned,
                                            rationales)]
    atomic_write_text(Path(res_dir) / f"{r.name}_pred.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(Path(res_dir) / f"{r.name}_score.json", json.dumps(r.to_json(), indent=1))


def read_dataset(res_dir: Path, name: str) -> DatasetResult:
    """A finished dataset read back from its score and predictions files."""
    res_dir = Path(res_dir)
    pred = res_dir / f"{name}_pred.jsonl"
    rows = [json.loads(x) for x in pred.read_text().splitlines() if x.strip()] if pred.exists() else []
    if rows and "score" not in rows[0]:  # a predictions file from before per-query scores were written
        rows = []
    return DatasetResult.from_json(json.loads((res_dir / f"{name}_score.json").read_text()), rows)


# ---------------------------------------------------------------------------------------------
# one item, for the notebooks


@dataclass(frozen=True)
class ItemScores:
    """One toy item scored by the embedder: what notebooks show for a single example."""

    item: object
    similarities: np.ndarray
    """(n_candidates,) cosine similarity of the query to each candidate."""
    top1: int
    correct: bool


def score_item(backbone, item, rationale: str | None = None, pool: Sequence | None = None) -> ItemScores:
    """Embed one toy-world item's query (direct, or after ``rationale``) and its candidates.

    Global items (one target) are scored against ``pool`` (other items of the same dataset) when given.
    """

    items = [item] + list(pool or [])
    cands = [c for it in items for c in item_candidates(it)]
    q = embed(backbone, [item_query(item, rationale)])
    c = embed(backbone, cands)
    sims = (q @ c.T)[0].numpy()
    top = int(np.argmax(sims))
    return ItemScores(item, sims, top, top in item.labels)
