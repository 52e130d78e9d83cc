"""The chains that make an item hard, and the item itself: visual chains (follow "the other object of its
colour" from an anchor, with a decoy chain in hard scenes) and text chains (an attribute given by composition).

Used by: ``world.tasks`` (every dataset's items).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np

from .scenes import COLOURS, POSITIONS, SHAPES, Obj, Page, Scene, Video, colour_after, random_obj, step

Visual = Union[Scene, Video, Page, Obj, None]

@dataclass(frozen=True)
class Item:
    """One query with its candidates (local tasks) or its target (global tasks) and its ground truth."""

    dataset: str
    item_id: str
    query_inst: str
    query_text: str
    query_visual: Visual
    candidates: tuple  # of (text, visual) pairs; for global tasks: just the target
    labels: tuple[int, ...]
    needs_reasoning: bool
    gold_steps: tuple[str, ...]
    answer: str
    target_inst: str = ""
    meta: dict = field(default_factory=dict, compare=False)  # predicate data for global qrels


def obj_at(scene: Scene, pos: int) -> str:
    return f"{POSITIONS[pos]} {scene.cells[pos].name}"


# ---------------------------------------------------------------------------------------------
# visual chains


def follow_chain(scene: Scene, start: int, attrs: tuple[str, ...]) -> list[int] | None:
    """Positions visited from ``start`` following "the other object sharing <attr>"; None if ambiguous."""
    path = [start]
    for attr in attrs:
        cur = scene.cells[path[-1]]
        value = getattr(cur, attr)
        others = [i for i in (scene.where(colour=value) if attr == "colour" else scene.where(shape=value))
                  if i != path[-1]]
        if len(others) != 1 or others[0] in path:
            return None
        path.append(others[0])
    return path


def chain_scene(rng: np.random.Generator, n_links: int, anchor_unique: bool = True,
                decoy: bool = False) -> tuple[Scene, list[int], tuple[str, ...]]:
    """A scene holding a valid chain of ``n_links`` hops from an anchor, built then verified.

    With ``decoy`` the scene also holds a second chain of the same form from another anchor (its own
    colours and shapes), and no other object. Without it, the chain's end is found by structure alone -
    "the object two links away from something, not sharing the anchor's colour" is a set-level feature one
    forward pass computes; with a decoy only following the links from the named anchor tells the two ends
    apart (docs/research-log.md, World: decoy chains)."""
    attrs = tuple("colour" if k % 2 == 0 else "shape" for k in range(n_links))
    n_chains = 2 if decoy else 1
    for _ in range(5000):
        cells: list[Obj | None] = [None] * 9
        order = [int(p) for p in rng.choice(9, n_chains * (n_links + 1), replace=False)]
        paths = [order[c * (n_links + 1):(c + 1) * (n_links + 1)] for c in range(n_chains)]
        for path in paths:
            cols = list(rng.choice(len(COLOURS), n_links + 1))
            shps = list(rng.choice(len(SHAPES), n_links + 1))
            for k, attr in enumerate(attrs):  # link k joins path[k] and path[k+1]
                if attr == "colour":
                    cols[k + 1] = cols[k]
                else:
                    shps[k + 1] = shps[k]
            for k, p in enumerate(path):
                cells[p] = Obj(COLOURS[int(cols[k])], SHAPES[int(shps[k])])
        if not decoy:
            for p in rng.choice([i for i in range(9) if i not in paths[0]], int(rng.integers(0, 3)), replace=False):
                cells[int(p)] = random_obj(rng)
        scene = Scene(tuple(cells))
        if (not anchor_unique or len(scene.where(shape=scene.cells[paths[0][0]].shape)) == 1) and \
                all(follow_chain(scene, path[0], attrs) == path for path in paths):
            return scene, paths[0], attrs
    raise RuntimeError("could not build a chain scene")  # pragma: no cover


def chain_steps(scene: Scene, path: list[int], attrs: tuple[str, ...], first: str) -> tuple[str, ...]:
    steps = [f"{first}: {obj_at(scene, path[0])}."]
    for k, attr in enumerate(attrs):
        value = getattr(scene.cells[path[k]], attr)
        steps.append(f"other {value}: {obj_at(scene, path[k + 1])}.")
    return tuple(steps)


def chain_phrase(attrs: tuple[str, ...]) -> str:
    return "follow " + " then ".join(attrs)


def image_query(rng: np.random.Generator, hard: bool) -> tuple[Scene, str, int, tuple[str, ...]]:
    """(scene, referring expression, referred position, gold steps) for image-query tasks: the same
    wording for easy and hard items; only a hard scene holds a decoy chain."""
    scene, path, attrs = chain_scene(rng, int(rng.integers(2, 4)), decoy=hard)
    shape = scene.cells[path[0]].shape
    return scene, f"from the {shape} {chain_phrase(attrs)}", path[-1], chain_steps(scene, path, attrs, shape)


def _distinct_texts(rng, positive: str, hard_negs: list[str], sample: Callable[[], str], n: int) -> tuple[list[str], int]:
    texts = [positive] + [t for t in dict.fromkeys(hard_negs) if t != positive]
    texts = texts[:n]
    while len(texts) < n:
        t = sample()
        if t not in texts:
            texts.append(t)
    order = rng.permutation(n)
    shuffled = [texts[i] for i in order]
    return shuffled, int(np.where(order == 0)[0][0])


def _rand_obj_at(rng) -> str:
    return f"{POSITIONS[rng.integers(9)]} {random_obj(rng).name}"


# ---------------------------------------------------------------------------------------------
# text chains


def colour_chain(rng, colour: str, hops: int) -> tuple[str, list[str]]:
    """Describe ``colour`` as ``hops`` successors of another colour; returns (phrase, steps)."""
    seed = COLOURS[(COLOURS.index(colour) - hops) % len(COLOURS)]
    phrase, steps, cur = seed, [], seed
    for _ in range(hops):
        phrase = f"the colour after {phrase}"
        steps.append(f"after {cur} is {colour_after(cur)}.")
        cur = colour_after(cur)
    return phrase, steps


def position_chain(rng, pos: int, hops: int) -> tuple[str, list[str]] | None:
    """Describe cell ``pos`` by ``hops`` moves from another cell; None if no such walk exists."""
    for _ in range(50):
        dirs, cur = [], pos
        for _ in range(hops):  # walk backwards from pos
            opts = [d for d in ("right", "left", "above", "below") if step(cur, _opposite(d)) is not None]
            d = opts[int(rng.integers(len(opts)))]
            cur = step(cur, _opposite(d))
            dirs.append(d)
        dirs.reverse()
        phrase, steps, c = POSITIONS[cur], [], cur
        for d in dirs:
            phrase = f"the cell {d} of {phrase}"
            steps.append(f"{d} of {POSITIONS[c]} is {POSITIONS[step(c, d)]}.")
            c = step(c, d)
        if c == pos:
            return phrase, steps
    return None


def _opposite(d: str) -> str:
    return {"right": "left", "left": "right", "above": "below", "below": "above"}[d]


def described_object(rng, obj: Obj, pos: int, hard: bool) -> tuple[str, list[str]]:
    if not hard:
        art = "an" if obj.colour[0] in "aeiou" else "a"
        return f"{art} {obj.colour} {obj.shape} at {POSITIONS[pos]}", []
    hc = int(rng.integers(1, 3))
    cphrase, csteps = colour_chain(rng, obj.colour, hc)
    pphrase, psteps = position_chain(rng, pos, 3 - hc if hc == 1 else int(rng.integers(1, 3)))
    return (f"a {obj.shape} of {cphrase} at {pphrase}",
            csteps + psteps + [f"so a {obj.colour} {obj.shape} at {POSITIONS[pos]}."])
