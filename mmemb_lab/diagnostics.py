"""Stage-1 diagnostics: does the embedding depend on what a rationale *says*, and are the rationales right?

Concept
    *Rationale sensitivity* (the shortcut meter, method.md "problem 1"): mean 1 - cos between
    e(q + own rationale) and e(q + another query's rationale) on hard items. An embedder that learned
    only the *format* of reasoning barely moves when the content is swapped (peers measured cosine
    0.95-0.98, i.e. sensitivity 0.02-0.05).

    *Step accuracy*: the model's own rationale clause by clause against the world's gold steps (the
    first step especially: it was the weak link of a prototype, ../shared/notes/tiny-vlm-from-scratch.md),
    and *answer accuracy*: whether the last clause states the gold answer.

Used by: the demo (``stage1`` in summary.json), notebook 04.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .backbone import Backbone
from .data import load_eval
from .embed import Input, embed
from .inference import generate_rationales
from .selection import swap_partners

_CLAUSE = re.compile(r"[^.]+\.")


def clauses(text: str) -> list[str]:
    return [c.strip() for c in _CLAUSE.findall(text)]


@dataclass(frozen=True)
class RationaleDiagnostics:
    sensitivity: float
    step_accuracy: list[float]
    answer_accuracy: float
    n_items: int
    examples: list[dict]


def rationale_diagnostics(backbone: Backbone, world_root, registry, max_new_tokens: int = 64,
                          n_examples: int = 8) -> RationaleDiagnostics:
    """Generate the model's own rationales for the hard eval queries and measure them."""
    queries, golds, names = [], [], []
    for name, info in registry.items():
        es = load_eval(world_root, name, info.eval_type)
        for q in es.queries:
            if q.needs_reasoning and q.gold_steps:
                queries.append(q.query)
                golds.append(list(q.gold_steps))
                names.append(name)
    if not queries:
        return RationaleDiagnostics(float("nan"), [], float("nan"), 0, [])
    gen = generate_rationales(backbone, queries, max_new_tokens)
    partner = swap_partners(names)
    own = embed(backbone, [Input(q.text, q.visual, q.instruction, t, q.name) for q, t in zip(queries, gen.texts)])
    swapped = embed(backbone, [Input(q.text, q.visual, q.instruction, gen.texts[p], q.name)
                               for q, p in zip(queries, partner) if p >= 0])
    keep = partner >= 0
    sens = float(np.mean(1 - (own[keep] * swapped).sum(-1).numpy()))
    depth = max(len(g) for g in golds)
    steps = []
    for k in range(depth):
        hits = [clauses(t)[k] == g[k] if len(clauses(t)) > k else False
                for t, g in zip(gen.texts, golds) if len(g) > k]
        steps.append(float(np.mean(hits)))
    answers = [bool(clauses(t)) and clauses(t)[-1] == g[-1] for t, g in zip(gen.texts, golds)]
    ex = [{"dataset": n, "query": q.text, "gold": " ".join(g), "own": t}
          for n, q, g, t in list(zip(names, queries, golds, gen.texts))[:n_examples]]
    return RationaleDiagnostics(sens, steps, float(np.mean(answers)), len(queries), ex)
