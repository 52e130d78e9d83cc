"""Stage-1 diagnostics: does the embedding depend on what a rationale *says*, and are the rationales right?

Concept
    *Rationale sensitivity* (the shortcut meter, docs/method.md, problem 1): mean 1 - cos between
    e(q + own rationale) and e(q + another query's rationale) on hard items. An embedder that learned
    only the *format* of reasoning barely moves when the content is swapped (peers measured cosine
    0.95-0.98, i.e. sensitivity 0.02-0.05).

    *Step accuracy*: the model's own rationale clause by clause against the world's gold steps (the
    first step especially: it was the weak link of a prototype, docs/research-log.md, Prototypes),
    and *answer accuracy*: whether the last clause states the gold answer.

    *Slot probes* (:func:`slot_probe`): how much of what a retrieval task must match is linearly present in
    ONE embedding. Text-to-visual tasks (toy_t2i, toy_doc) match a caption that names two of a target's
    slots (an object at a cell, a letter's digit) against near misses that differ in one slot, so both
    embeddings must carry that slot's content, bound to the slot. A linear softmax per slot, fitted on
    embeddings of fresh easy items and scored on held-out ones, says how much of it they carry.

Used by: the demo (``stage1`` in summary.json), notebook 04; slot probes: notebook 05.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from ..data import item_candidate, item_query, load_eval
from ..model.backbone import Backbone
from ..model.embed import Input, embed
from ..model.inference import MAX_NEW_TOKENS, generate_rationales
from ..world.scenes import COLOURS, DIGITS, LETTERS, POSITIONS, SHAPES
from ..world.tasks import make_item
from .selection import swap_partners

_CLAUSE = re.compile(r"[^.]+\.")
PROBE_OFFSET = 1_000_000
"""Slot probes draw eval-split items from this index on: far past any world's evaluation pool."""


def clauses(text: str) -> list[str]:
    return [c.strip() for c in _CLAUSE.findall(text)]


@dataclass(frozen=True)
class RationaleDiagnostics:
    sensitivity: float
    step_accuracy: list[float]
    answer_accuracy: float
    n_items: int
    examples: list[dict]


def rationale_diagnostics(backbone: Backbone, world_root, registry, max_new_tokens: int = MAX_NEW_TOKENS,
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


@dataclass(frozen=True)
class SlotProbe:
    """Held-out accuracy of a linear readout of one attribute of every slot, on filled slots only."""

    dataset: str
    side: str
    """"target" (the image / page embedding) or "query" (the caption's embedding)."""
    attribute: str
    accuracy: float
    """Held-out, on slots the input fills (a named cell / letter), mean over slots."""
    train_accuracy: float
    """The same readout on its own training embeddings (an upper bound of what more data would give)."""
    majority: float
    """Always answering the commonest filled value of the slot (chance level)."""
    n: int


def _scene_slots(scene, named: set[int] | None = None) -> dict[str, list[int]]:
    """Per cell: object (1 + colour x shape), colour (1 + c), shape (1 + s); 0 = empty or not named."""
    out = {"object": [], "colour": [], "shape": []}
    for i, o in enumerate(scene.cells):
        c, sh = (-1, -1) if o is None or (named is not None and i not in named) else \
            (COLOURS.index(o.colour), SHAPES.index(o.shape))
        out["object"].append(0 if c < 0 else 1 + c * len(SHAPES) + sh)
        out["colour"].append(c + 1)
        out["shape"].append(sh + 1)
    return out


def _page_slots(page, named: set[str] | None = None) -> dict[str, list[int]]:
    """Per letter: 1 + its digit; 0 = not on the page or not named."""
    rows = dict(page.rows)
    return {"digit": [1 + DIGITS.index(rows[k]) if k in rows and (named is None or k in named) else 0
                      for k in LETTERS]}


def slot_labels(item) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(target slots, query slots) of an easy toy_t2i or toy_doc item; the query fills only what it names."""
    target = item.candidates[item.labels[0]][1]
    if item.dataset == "toy_t2i":
        named = {i for i, p in enumerate(POSITIONS) if f" at {p}" in item.query_text}
        return _scene_slots(target), _scene_slots(target, named)
    if item.dataset == "toy_doc":
        return _page_slots(target), _page_slots(target, {k for k, _ in item.meta["conditions"]})
    raise ValueError(f"slot probes are defined for toy_t2i and toy_doc, not {item.dataset!r}")


def linear_readout(x: np.ndarray, y: np.ndarray, n_train: int, steps: int = 400, seed: int = 0
                   ) -> tuple[float, float, float]:
    """Fit a softmax readout of labels ``y`` (n, slots; 0 = unfilled) from ``x`` (n, dim) on the first
    ``n_train`` rows, one per slot; returns (held-out accuracy, training accuracy, majority), each on filled
    slots and averaged over the slots that have filled rows on both sides."""
    torch.manual_seed(seed)
    xt, xv = torch.as_tensor(x[:n_train], dtype=torch.float32), torch.as_tensor(x[n_train:], dtype=torch.float32)
    scale = 1.0 / max(1e-6, float(xt.std()))
    held, train, major = [], [], []
    for s in range(y.shape[1]):
        yt, yv = y[:n_train, s], y[n_train:, s]
        ft, fv = yt != 0, yv != 0
        if not ft.any() or not fv.any():
            continue
        k = int(y[:, s].max()) + 1
        w = torch.zeros(x.shape[1], k, requires_grad=True)
        b = torch.zeros(k, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.05)
        target = torch.as_tensor(yt)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(scale * xt @ w + b, target) + 1e-4 * (w ** 2).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            held.append(float(((scale * xv @ w + b).argmax(1).numpy() == yv)[fv].mean()))
            train.append(float(((scale * xt @ w + b).argmax(1).numpy() == yt)[ft].mean()))
        major.append(float(np.bincount(yt[ft]).max() / ft.sum()))
    return float(np.mean(held)), float(np.mean(train)), float(np.mean(major))


def slot_probe(backbone: Backbone, dataset: str = "toy_t2i", n: int = 2000, seed: int = 0,
               train_share: float = 0.75) -> list[SlotProbe]:
    """Linear slot readouts from the target and the query embeddings of ``n`` fresh easy items of ``dataset``
    (toy_t2i: object / colour / shape at each cell; toy_doc: each letter's digit)."""
    items = [make_item(dataset, seed, "eval", PROBE_OFFSET + i, 0.0) for i in range(n)]
    slots = [slot_labels(it) for it in items]
    emb = {"target": embed(backbone, [item_candidate(it, it.labels[0]) for it in items]).numpy(),
           "query": embed(backbone, [item_query(it) for it in items]).numpy()}
    n_train = int(train_share * n)
    out = []
    for side, k in (("target", 0), ("query", 1)):
        for attr in slots[0][k]:
            y = np.array([s[k][attr] for s in slots])
            acc, tr, maj = linear_readout(emb[side], y, n_train)
            out.append(SlotProbe(dataset, side, attr, acc, tr, maj, n))
    return out
