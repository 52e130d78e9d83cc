"""Does the query text give the answer key away? The surface-marker audit of a world's evaluation queries.

Concept
    The gate's job is to see, from the *input*, whether reasoning will pay. If one word or word pair of the
    query text tells hard items from easy ones ("then", "follow", "object appears"), the gate can learn a
    keyword lookup instead, which no real benchmark would allow: real benchmarks do not mark their hard
    items. This audit fits the best single rule "the query text contains X -> hard" (or "-> easy") over
    every token and bigram of a dataset's evaluation queries and reports its accuracy, next to the
    majority rule (always the commoner label) it must be compared with.

    For datasets whose queries carry an image or video, the text is only part of the input and hardness
    should live in the visual (a decoy chain, a longer chain); for text-only queries the text *is* the
    input, so a marker there is reported, not forbidden.

Used by: ``tests/test_world.py`` (the acceptance line), the demo's summary (``world.surface_marker``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..data import load_eval

_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def features(text: str) -> set[str]:
    """The lower-cased tokens and adjacent token pairs of ``text``."""
    toks = _TOKEN.findall(text.lower())
    return set(toks) | {f"{a} {b}" for a, b in zip(toks, toks[1:])}


@dataclass(frozen=True)
class MarkerRule:
    """The best single-feature rule on one dataset."""

    dataset: str
    accuracy: float
    """Share of queries the rule labels right (easy / hard)."""
    feature: str
    """The token or bigram; ``""`` when no rule beats the majority rule."""
    predicts: str
    """"hard" or "easy": the label the rule gives queries that contain the feature."""
    majority: float
    """Accuracy of always answering the commoner label."""
    n: int
    visual_queries: bool
    """Whether this dataset's queries carry an image or video."""


def best_rule(texts: list[str], hard: list[bool], dataset: str = "", visual_queries: bool = False) -> MarkerRule:
    """The single "contains X -> label" rule with the highest accuracy (others -> the other label)."""
    n = len(texts)
    n_hard = sum(hard)
    majority = max(n_hard, n - n_hard) / max(1, n)
    with_f: Counter = Counter()
    hard_with_f: Counter = Counter()
    for t, h in zip(texts, hard):
        for f in features(t):
            with_f[f] += 1
            hard_with_f[f] += h
    best = MarkerRule(dataset, majority, "", "hard" if n_hard >= n - n_hard else "easy", majority, n, visual_queries)
    for f, k in with_f.items():
        kh = hard_with_f[f]
        # "contains f -> hard, else easy": right on the hard ones with f and the easy ones without it
        to_hard = (kh + (n - n_hard) - (k - kh)) / n
        for acc, label in ((to_hard, "hard"), (1 - to_hard, "easy")):
            if acc > best.accuracy + 1e-12:
                best = MarkerRule(dataset, acc, f, label, majority, n, visual_queries)
    return best


def surface_markers(world_root: str | Path, info: dict) -> dict[str, MarkerRule]:
    """The best marker rule of every dataset of a world, from its evaluation files on disk."""
    out = {}
    for name, d in info["datasets"].items():
        es = load_eval(world_root, name, d["eval_type"])
        texts = [q.query.text for q in es.queries]
        hard = [bool(q.needs_reasoning) for q in es.queries]
        visual = any(q.query.visual is not None for q in es.queries)
        out[name] = best_rule(texts, hard, name, visual)
    return out


__all__ = ["MarkerRule", "best_rule", "features", "surface_markers"]
