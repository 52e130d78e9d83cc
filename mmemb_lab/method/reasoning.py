"""Reasoning as a latent variable: p(t | q) = sum_r p(r | q) p(t | q, r), with r = "no reasoning" one value.

Concept (docs/method.md, step 1)
    A query does not come with "its" rationale. Treat the rationale r as a latent variable with a prior
    p(r | q) - here: the candidates the workers wrote for q plus "no reasoning", uniform unless told
    otherwise - and a likelihood p(t | q, r) - the evaluator's InfoNCE softmax over the candidate
    targets when the query is embedded after r. Then

        marginal     p(t+ | q)     = sum_r p(r | q) p(t+ | q, r)
        posterior    p(r | q, t+)  = p(r | q) p(t+ | q, r) / p(t+ | q)

    Intuition for pair-awareness: the prior only sees the query, so a fluent but wrong rationale looks as
    good as a right one; the posterior conditions on the *pair* (q, t+) and moves its mass to the
    rationales that make t+ likely. Chain-of-thought written per instance is judged per pair.

    The counterfactual selection (``mmemb_lab.method.selection``) is the operational version of this posterior:
    it asks not only "does t+ become likely after r" but "because of what r says" (swap intervention).

Used by: notebook 02 (single examples), ``mmemb_lab.method.selection``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..data import item_candidates, item_query
from ..model.backbone import Backbone
from ..model.embed import embed
from ..train.contrastive import TEMPERATURE
from ..world.tasks import Item
from .workers import Rationale


@dataclass(frozen=True)
class LatentView:
    """One query's latent reasoning: values of r and their prior, likelihood and posterior."""

    item: Item
    labels: list[str]
    """Name of each value of r ("none" = no reasoning, else the worker)."""
    texts: list[str | None]
    prior: np.ndarray
    """(R,) p(r | q)."""
    likelihood: np.ndarray
    """(R,) p(t+ | q, r): the evaluator's softmax over the candidate targets."""
    candidate_probs: np.ndarray
    """(R, n_candidates) p(t | q, r) for every candidate target t."""
    marginal: float
    """p(t+ | q) = sum_r p(r | q) p(t+ | q, r)."""
    posterior: np.ndarray
    """(R,) p(r | q, t+)."""


def latent_view(evaluator: Backbone, item: Item, rationales: Sequence[Rationale], temperature: float = TEMPERATURE,
                prior: Sequence[float] | None = None) -> LatentView:
    """Prior, likelihood and posterior over r for one local-task item (candidates = its own list)."""
    usable = [r for r in rationales if r.status == "ok"]
    labels = ["none"] + [r.worker for r in usable]
    texts = [None] + [r.text for r in usable]
    q = embed(evaluator, [item_query(item, t) for t in texts])  # (R, D)
    c = embed(evaluator, item_candidates(item))  # (n_candidates, D)
    probs = torch.softmax(q @ c.T / temperature, dim=-1).numpy().astype(float)  # (R, n_candidates)
    pos = item.labels[0]
    lik = probs[:, pos]
    pri = np.full(len(labels), 1 / len(labels)) if prior is None else np.asarray(prior, float) / np.sum(prior)
    marginal = float(np.sum(pri * lik))
    return LatentView(item, labels, texts, pri, lik, probs, marginal, pri * lik / marginal)
