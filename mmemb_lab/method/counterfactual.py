"""Counterfactual gains: how much a rationale raises the evaluator's confidence in the positive, against not
reasoning (removal) and against the rationale of another pair (swap), for every candidate of every pair.

Used by: ``selection`` (the posterior choice among the candidates), ``bench`` (batched scoring).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from ..data import item_candidates, item_query, to_pil
from ..model.backbone import Backbone
from ..model.embed import Input, embed
from ..train.contrastive import TEMPERATURE, log_prob_positive
from ..train.foundation import near_miss
from ..world.tasks import Item
from .workers import Rationale, states_gold_facts, step_accuracy

TAU = math.log(2)


@dataclass(frozen=True)
class Pair:
    """A query with its positive, its negatives and its candidate rationales (one per worker).

    A toy pair carries its world ``item`` (the query is rendered from it, and its gold facts score the
    selection); a pair of real data has ``item=None`` and gives its query, id and dataset instead."""

    item: Item | None
    positive: Input
    negatives: list[Input]
    rationales: list[Rationale]
    query_input: Input | None = None
    pair_id: str = ""
    dataset_name: str = ""

    def __post_init__(self):
        if self.item is None and (self.query_input is None or not self.pair_id or not self.dataset_name):
            raise ValueError("a pair without a world item needs query_input, pair_id and dataset_name")

    @property
    def id(self) -> str:
        return self.item.item_id if self.item is not None else self.pair_id

    @property
    def dataset(self) -> str:
        return self.item.dataset if self.item is not None else self.dataset_name

    def query(self, rationale: str | None = None) -> Input:
        """The query as the embedder reads it, with ``rationale`` in its reasoning span when given."""
        if self.item is not None:
            return item_query(self.item, rationale)
        return replace(self.query_input, rationale=rationale)


@dataclass(frozen=True)
class GainTable:
    """Counterfactual scores of every (pair, worker); arrays are (n_pairs,) or (n_pairs, n_workers)."""

    item_ids: list[str]
    datasets: list[str]
    needs_reasoning: np.ndarray
    """(n,) the world's hard flag (ground truth; False for real pairs, where none exists)."""
    workers: list[str]
    texts: list[list[str]]
    valid: np.ndarray
    """(n, K) the worker produced a usable rationale."""
    correct: np.ndarray
    """(n, K) the rationale states the gold facts (ground truth, for scoring the selection only)."""
    logp_direct: np.ndarray
    logp_with: np.ndarray
    logp_swap: np.ndarray
    cos_direct: np.ndarray
    cos_with: np.ndarray
    cos_swap: np.ndarray
    swap_partner: np.ndarray
    """(n,) index of the pair whose rationales served as the swap."""
    step_accuracy: np.ndarray | None = None
    """(n, K) share of the gold facts each rationale states (ground truth, for scoring the workers only)."""

    @property
    def gain_removal(self) -> np.ndarray:
        return self.logp_with - self.logp_direct[:, None]

    @property
    def gain_swap(self) -> np.ndarray:
        return self.logp_with - self.logp_swap

    @property
    def gain_swap_max(self) -> np.ndarray:
        """Gain against the STRONGEST rationale written for the partner query (any worker's usable one; an
        unusable partner rationale has no logp_swap): one intervention per pair, shared by its candidates."""
        swapped = np.nan_to_num(self.logp_swap, nan=-np.inf).max(axis=1)
        return self.logp_with - swapped[:, None]

    def gains(self, variant: str) -> np.ndarray:
        if variant == "removal":
            return self.gain_removal
        if variant == "swap":
            return self.gain_swap
        if variant == "swap_max":
            return self.gain_swap_max
        if variant == "both":
            return np.minimum(self.gain_removal, self.gain_swap)
        if variant == "both_max":
            return np.minimum(self.gain_removal, self.gain_swap_max)
        raise ValueError(f"unknown counterfactual {variant!r}: removal, swap, swap_max, both or both_max")


def swap_partners(datasets: Sequence[str], targets: Sequence | None = None) -> np.ndarray:
    """Index of the next pair of the same dataset (cyclic); -1 when there is none.

    With ``targets`` (one identity per pair), the partner is the next pair of the same dataset whose
    target differs: a rationale written for a query with the SAME target is not a counterfactual - it
    states content that is right for this pair too (without this rule a correct rationale failed tau:
    docs/research-log.md, Selection: swap partners)."""
    out = np.full(len(datasets), -1)
    by: dict[str, list[int]] = {}
    for i, d in enumerate(datasets):
        by.setdefault(d, []).append(i)
    for idx in by.values():
        for t, a in enumerate(idx):
            for s in range(1, len(idx)):
                b = idx[(t + s) % len(idx)]
                if targets is None or targets[b] != targets[a]:
                    out[a] = b
                    break
    return out


def pair_partners(pairs: Sequence[Pair]) -> np.ndarray:
    """``swap_partners`` of training pairs: same dataset, another positive target."""
    return swap_partners([p.dataset for p in pairs], [target_key(p.positive) for p in pairs])


def toy_pairs(items: Sequence[Item], rationales: Sequence[list[Rationale]], pool_negatives: int = 15,
              seed: int = 0) -> list[Pair]:
    """Pairs from toy items: local tasks use their other candidates as negatives; global tasks use
    near-miss targets and other items' targets of the same dataset."""

    rng = np.random.default_rng([seed, 3])
    by: dict[str, list[Item]] = {}
    for it in items:
        by.setdefault(it.dataset, []).append(it)
    pairs = []
    for it, rats in zip(items, rationales):
        cands = item_candidates(it)
        pos = cands[it.labels[0]]
        if len(cands) > 1:
            negs = [c for j, c in enumerate(cands) if j not in it.labels]
        else:
            others = [o for o in by[it.dataset] if o is not it]
            pick = rng.choice(len(others), min(pool_negatives, len(others)), replace=False) if others else []

            negs = [item_candidates(others[int(j)])[0] for j in pick]
            negs += [Input("", to_pil(near_miss(it, rng)), it.target_inst, None, f"{it.item_id}/near{j}")
                     for j in range(3)]
        pairs.append(Pair(it, pos, negs, list(rats)))
    return pairs


def score_pairs(evaluator: Backbone | Callable[[list[Input]], torch.Tensor], pairs: Sequence[Pair],
                temperature: float = TEMPERATURE, batch_size: int = 64, progress: bool = False) -> GainTable:
    """Embed every distinct target once and every query variant in batches; score C under each intervention.

    ``evaluator``: a backbone (its direct embedder is used) or any function from inputs to unit vectors.
    """
    if isinstance(evaluator, Backbone):
        bb = evaluator
        evaluator = lambda xs: embed(bb, xs, batch_size=batch_size, progress=progress)  # noqa: E731
    workers = [r.worker for r in pairs[0].rationales]
    n, k = len(pairs), len(workers)
    datasets = [p.dataset for p in pairs]
    # targets: each distinct one embedded once; per pair, the rows of its positive and negatives
    tkeys, tinputs, rows = {}, [], []
    for p in pairs:
        r = []
        for x in [p.positive] + p.negatives:
            key = target_key(x)
            if key not in tkeys:
                tkeys[key] = len(tinputs)
                tinputs.append(x)
            r.append(tkeys[key])
        rows.append(r)
    partner = swap_partners(datasets, [r[0] for r in rows])  # same row = same target
    t_emb = evaluator(tinputs)
    # queries: direct, with own rationale, with the swap partner's rationale (same worker)
    qinputs: list[Input] = []
    idx_direct, idx_with, idx_swap = np.zeros(n, int), np.full((n, k), -1), np.full((n, k), -1)
    for i, p in enumerate(pairs):
        idx_direct[i] = len(qinputs)
        qinputs.append(p.query())
        for j, r in enumerate(p.rationales):
            if r.status == "ok":
                idx_with[i, j] = len(qinputs)
                qinputs.append(p.query(r.text))
            if partner[i] >= 0:
                s = pairs[partner[i]].rationales[j]
                if s.status == "ok":
                    idx_swap[i, j] = len(qinputs)
                    qinputs.append(p.query(s.text))
    q_emb = evaluator(qinputs)

    def conf(qi: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        pos, neg = t_emb[rows[i][0]], t_emb[rows[i][1:]]
        sel = torch.as_tensor(np.where(qi >= 0, qi, 0))
        q = q_emb[sel]
        lp = log_prob_positive(q, pos.expand_as(q), neg.unsqueeze(0).expand(len(q), -1, -1), temperature)
        cs = q @ pos
        lp, cs = lp.numpy().astype(float), cs.numpy().astype(float)
        lp[qi < 0], cs[qi < 0] = np.nan, np.nan
        return lp, cs

    lpd, csd = np.zeros(n), np.zeros(n)
    lpw, csw, lps, css = (np.zeros((n, k)) for _ in range(4))
    for i in range(n):
        a, b = conf(np.array([idx_direct[i]]), i)
        lpd[i], csd[i] = a[0], b[0]
        lpw[i], csw[i] = conf(idx_with[i], i)
        lps[i], css[i] = conf(idx_swap[i], i)
    valid = np.array([[r.status == "ok" for r in p.rationales] for p in pairs])
    # ground truth exists in the toy world only; real pairs read False / 0 (never used to select)
    correct = np.array([[r.status == "ok" and p.item is not None and states_gold_facts(r.text, p.item)
                         for r in p.rationales] for p in pairs])
    step_acc = np.array([[step_accuracy(r.text, p.item) if r.status == "ok" and p.item is not None else 0.0
                          for r in p.rationales] for p in pairs])
    return GainTable([p.id for p in pairs], datasets,
                     np.array([p.item is not None and bool(p.item.needs_reasoning) for p in pairs]), workers,
                     [[r.text for r in p.rationales] for p in pairs], valid, correct,
                     lpd, lpw, lps, csd, csw, css, partner, step_acc)


def score_candidate(evaluator: Backbone, pair: Pair, rationale: str, swap: str | None,
                    temperature: float = TEMPERATURE) -> tuple[float, float | None]:
    """(removal gain, swap gain) of ONE candidate, computed on its own: the reference that
    :func:`score_pairs` batches. Embeds the direct query, the query with ``rationale``, the query with
    ``swap`` (a rationale written for another query) and the pair's targets in one call of its own,
    sharing nothing with other candidates. Used by ``make bench`` (throughput baseline) and the tests."""
    q = [pair.query(), pair.query(rationale)] + ([pair.query(swap)] if swap else [])
    e = embed(evaluator, q + [pair.positive] + list(pair.negatives), batch_size=len(q) + 1 + len(pair.negatives))
    qe, pos, neg = e[:len(q)], e[len(q)], e[len(q) + 1:]
    lp = log_prob_positive(qe, pos.expand_as(qe), neg.unsqueeze(0).expand(len(qe), -1, -1), temperature).tolist()
    return lp[1] - lp[0], (lp[1] - lp[2]) if swap else None


def target_key(x: Input) -> str:
    """Identity of a target: text, or the image's bytes digest (the same object crop is one target)."""
    if x.visual is None:
        return f"t|{x.instruction}|{x.text}"

    ims = x.visual if isinstance(x.visual, list) else [x.visual]
    h = hashlib.sha1()
    for im in ims:
        h.update(im.tobytes())
    return f"v|{x.instruction}|{x.text}|{h.hexdigest()}"
