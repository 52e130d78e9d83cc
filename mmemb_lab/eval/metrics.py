"""Retrieval metrics and MMEB-V2 score aggregation, computed the way the reference (VLM2Vec) does.

An embedding model is judged by ranking: each query scores a pool of candidates (its own list for
"local" datasets, the whole deduplicated corpus for "global" ones; see ``registry``), the candidates are
sorted best-first, and the metric looks at where the labelled candidates landed.

- **Hit@k**: 1 if any positive is in the first k, else 0. MMEB-V2 reports Hit@1 for image and video.
- **NDCG@k, linear gain**: DCG = sum_{i=1..k} rel_i / log2(i+1), divided by the ideal DCG, i.e. the
  DCG of that query's own labels sorted by grade (top k). Visdoc reports NDCG@5 on graded BEIR qrels.
  Linear, not exponential (2^rel - 1), gain: the two differ as soon as a grade exceeds 1.
- **Aggregation**: a dataset's score is the mean over its queries; a meta-task or modality column is
  the unweighted mean over its datasets; the overall score is the unweighted mean over *all datasets*
  (78 for MMEB-V2), not the mean of the three modality means, so modalities weigh by dataset count.

Used by the evaluation loop and the paper table (notebook on evaluation). Deviations from the reference:

- **Ties count against the model.** Candidates with equal scores are ordered worst case first: among
  them, the lower grade ranks higher (non-relevant before relevant), then the lower index. A positive
  therefore ranks below every candidate with the same score, and a collapsed model (every embedding
  equal) scores 0 Hit@1 on a local list instead of 100. The reference sorts with numpy's default
  ``argsort(-scores)``, which is not stable, but on all-equal scores returns the candidates in list
  order (numpy 2.4, checked); its local lists put the positive first, so there the same collapsed
  model gets Hit@1 = 100. Real embeddings almost never tie exactly, so this changes no honest score;
  it only stops a degenerate one from looking perfect. ``rank_candidates`` without grades keeps the
  plain order (lower index first), used where no labels exist.
- Hit@k counts a labelled candidate as positive only if its grade is > 0; the reference counts every
  qrels entry. The two agree whenever qrels hold positives only (the usual BEIR case).
- Negative relevance grades are rejected, so every metric lies in [0, 1].
- **Graded NDCG is the textbook one** (and agrees with pytrec_eval's ``ndcg_cut`` and ranx's ``ndcg``):
  each candidate's gain is its own grade. The reference's ``RankingMetrics`` deduplicates a query's
  labels with ``list(set(labels))`` and then zips them with the grades in their original order, so on
  a query with two or more distinct grades the grades are paired with the wrong documents in an order
  that depends on Python's string hashing (``PYTHONHASHSEED``). Example: qrels p0 -> 2, p1 -> 1 and a
  perfect ranking p0, p1, p2. Ours: DCG@5 = 2/log2(2) + 1/log2(3) = 2.6309298 = IDCG, NDCG@5 = 1.
  Reference, whenever the set iterates as [p1, p0] (PYTHONHASHSEED 0, 2, 3, 4, 5; not 1): p1 gets
  grade 2 and p0 grade 1, DCG@5 = 1/log2(2) + 2/log2(3) = 2.2618595, NDCG@5 = 2.2618595 / 2.6309298
  = 0.8597187. Queries whose labels all share one grade (every image and video task) are unaffected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mmemb_lab.data import DatasetInfo

__all__ = ["rank_candidates", "hit_at_k", "ndcg_at_k", "QueryScores", "score_queries",
           "Aggregate", "aggregate", "percent"]

logger = logging.getLogger(__name__)

Labels = int | Sequence[int] | Mapping[int, float]


def rank_candidates(scores, grades: Labels | None = None) -> np.ndarray:
    """Candidate indices sorted by score, best first.

    Without ``grades``, ties keep the lower index first. With ``grades`` (one query's labels, any form
    ``score_queries`` accepts; unlabelled candidates have grade 0), ties are broken against the model:
    the lower grade first, then the lower index, so a relevant candidate ranks below every candidate
    with the same score (see the module docstring). Works along the last axis, so a
    ``(n_queries, n_candidates)`` matrix gives one ranking per row (``grades`` then apply to every row).
    """
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if grades is None:
        return np.argsort(-s, axis=-1, kind="stable")  # stable sort on negated scores = lower index wins ties
    g = np.zeros(s.shape[-1])
    for c, v in _as_grades(grades).items():
        g[c] = v
    # lexsort sorts by the last key first and is stable: score descending, then grade ascending, then index
    return np.lexsort((np.broadcast_to(g, s.shape), -s), axis=-1)


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _as_grades(labels: Labels) -> dict[int, float]:
    """Normalise one query's labels to {candidate index: grade}: an int or a list means grade 1."""
    if isinstance(labels, Mapping):
        grades = {int(c): float(g) for c, g in labels.items()}
    elif isinstance(labels, (int, np.integer)):
        grades = {int(labels): 1.0}
    else:
        grades = {int(c): 1.0 for c in labels}
    if any(g < 0 for g in grades.values()):
        raise ValueError(f"relevance grades must be >= 0, got {grades}")
    return grades


def hit_at_k(ranking, positives, k: int) -> float:
    """1.0 if any positive candidate index is among the first ``k`` of ``ranking``, else 0.0."""
    k = _check_k(k)
    pos = {c for c, g in _as_grades(positives).items() if g > 0}
    return float(any(int(c) in pos for c in np.asarray(ranking)[:k]))


def ndcg_at_k(ranking, relevance, k: int) -> float:
    """Linear-gain NDCG@k. ``relevance``: {candidate index: grade}, or a dense per-candidate grade list
    (``relevance[c]`` is candidate c's grade; note this differs from ``hit_at_k``, where a list names
    the positives).

    Returns 0.0 when the ideal DCG is 0 (no candidate has a positive grade).
    """
    k = _check_k(k)
    grades = (_as_grades(relevance) if isinstance(relevance, Mapping)
              else _as_grades(dict(enumerate(np.asarray(relevance, dtype=np.float64).tolist()))))
    top = np.asarray(ranking)[:k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))  # position i (1-based) -> 1 / log2(i + 1)
    gains = np.array([grades.get(int(c), 0.0) for c in top])
    ideal = np.sort(np.array(list(grades.values()) or [0.0]))[::-1][:k]
    idcg = float(ideal @ discounts[: len(ideal)])
    return float(gains @ discounts[: len(gains)]) / idcg if idcg > 0 else 0.0


@dataclass(frozen=True)
class QueryScores:
    """Per-query metrics of one dataset and their means (all in [0, 1])."""

    metric: str
    """Canonical headline metric, ``"hit@k"`` or ``"ndcg_linear@k"``."""
    ks: tuple[int, ...]
    """Cut-offs computed, ascending."""
    hit: dict[int, np.ndarray]
    """k -> (n_queries,) array of 0/1 Hit@k."""
    ndcg_linear: dict[int, np.ndarray]
    """k -> (n_queries,) array of linear-gain NDCG@k."""
    means: dict[str, float]
    """``"hit@k"`` / ``"ndcg_linear@k"`` -> mean over queries."""

    @property
    def main(self) -> float:
        """Mean of the headline metric (the dataset's score, before ``percent``)."""
        return self.means[self.metric]

    @property
    def n_queries(self) -> int:
        return len(next(iter(self.hit.values())))


def _canonical_metric(metric: str) -> tuple[str, int]:
    name, _, k = metric.partition("@")
    names = {"hit": "hit", "ndcg": "ndcg_linear", "ndcg_linear": "ndcg_linear"}
    if name not in names or not k.isdigit():
        raise ValueError(f"metric must be 'hit@k' or 'ndcg@k', got {metric!r}")
    return f"{names[name]}@{_check_k(int(k))}", int(k)


def score_queries(score_matrix_or_list, labels: Sequence[Labels], metric: str = "hit@1",
                  ks: Sequence[int] = (1, 5, 10)) -> QueryScores:
    """Rank every query's candidates (ties counted against the model, see ``rank_candidates``) and compute
    Hit@k and linear NDCG@k for each k in ``ks``.

    ``score_matrix_or_list``: a ``(n_queries, n_candidates)`` array (global pool, or equal-sized local
    lists) or a list of 1-D score arrays (local lists of different sizes). ``labels[q]``: a positive
    index, a list of positive indices, or a {candidate index: grade} dict (graded qrels).
    ``metric`` names the headline (``"hit@1"`` or ``"ndcg@5"``); its k is added to ``ks`` if missing.
    """
    metric, metric_k = _canonical_metric(metric)
    ks = tuple(sorted({_check_k(k) for k in ks} | {metric_k}))
    rows = list(score_matrix_or_list)
    if len(rows) == 0 or len(rows) != len(labels):
        raise ValueError(f"need one label per query and at least one query: {len(rows)} rows, "
                         f"{len(labels)} labels")
    hit = {k: np.zeros(len(rows)) for k in ks}
    ndcg = {k: np.zeros(len(rows)) for k in ks}
    for q, (row, lab) in enumerate(zip(rows, labels)):
        grades = _as_grades(lab)
        n = np.shape(row)[-1]
        if any(not 0 <= c < n for c in grades):
            raise ValueError(f"query {q}: label index out of range for {n} candidates: {grades}")
        ranking = rank_candidates(row, grades)  # ties counted against the model
        for k in ks:
            hit[k][q] = hit_at_k(ranking, grades, k)
            ndcg[k][q] = ndcg_at_k(ranking, grades, k)
    means = {f"hit@{k}": float(hit[k].mean()) for k in ks}
    means.update({f"ndcg_linear@{k}": float(ndcg[k].mean()) for k in ks})
    return QueryScores(metric=metric, ks=ks, hit=hit, ndcg_linear=ndcg, means=means)


@dataclass(frozen=True)
class Aggregate:
    """Benchmark-level scores, in the unit of the per-dataset input (callers pass percent)."""

    overall: float
    """Unweighted mean over all scored datasets (not the mean of modality means)."""
    per_modality: dict[str, float]
    """Modality -> unweighted mean over its scored datasets."""
    per_meta_task: dict[str, float]
    """``"<modality>/<meta_task>"`` (e.g. ``"image/CLS"``) -> unweighted mean over its scored datasets."""
    n_datasets: int
    """How many datasets went into ``overall``."""
    missing: tuple[str, ...]
    """Registry datasets without a score; non-empty means the numbers are not comparable to the paper's."""


def aggregate(per_dataset: Mapping[str, float], registry: Mapping[str, DatasetInfo]) -> Aggregate:
    """Average per-dataset scores by the MMEB-V2 rules (see module docstring)."""
    unknown = sorted(set(per_dataset) - set(registry))
    if unknown:
        raise KeyError(f"datasets not in the registry: {unknown}")
    if not per_dataset:
        raise ValueError("no dataset scores to aggregate")
    values = {name: float(v) for name, v in per_dataset.items()}
    if not all(np.isfinite(v) for v in values.values()):
        raise ValueError(f"non-finite dataset scores: {values}")
    missing = tuple(name for name in registry if name not in values)
    if missing:
        logger.warning("aggregating %d of %d datasets; missing: %s", len(values), len(registry), missing)
    by_modality: dict[str, list[float]] = {}
    by_column: dict[str, list[float]] = {}
    for name, info in registry.items():  # registry order gives the table's column order
        if name in values:
            by_modality.setdefault(info.modality, []).append(values[name])
            by_column.setdefault(f"{info.modality}/{info.meta_task}", []).append(values[name])
    return Aggregate(
        overall=float(np.mean(list(values.values()))),
        per_modality={m: float(np.mean(v)) for m, v in by_modality.items()},
        per_meta_task={c: float(np.mean(v)) for c, v in by_column.items()},
        n_datasets=len(values),
        missing=missing,
    )


def percent(x):
    """Fraction -> percent (``100 * x``); MMEB-V2 tables and ``aggregate`` inputs are in percent."""
    return 100.0 * x if isinstance(x, np.ndarray) else 100.0 * float(x)
