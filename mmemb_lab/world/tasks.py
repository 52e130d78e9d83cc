"""The toy world's tasks: MMEB-V2-shaped datasets whose items are easy (direct suffices) or hard (a chain).

Concept
    Every dataset mixes **easy** items, which a direct embedding can solve, and **hard** items whose
    answer needs following a chain of atomic hops that one forward pass of a small model does not compose
    (docs/research-log.md, Prototypes); a short rationale - one clause per hop - turns it back into
    lookups.

    Two kinds of chain, depending on which side holds the information:
    - **visual chains** (the query has an image or video): start at an anchor object, then "go to the
      other object of its colour", "... of that one's shape", ... Easy and hard items are asked in the
      *same words* (2-3 links); what makes an item hard is in the image: a hard scene also holds a
      *decoy*, a second chain of the same form from another anchor, so the end cannot be picked by
      structure and only following the links from the named anchor tells the two ends apart; an easy
      scene holds one chain, whose end a direct embedding finds by structure ("toy-world-v3": in v2 easy
      items were single lookups written from other templates, so one word of the query told hard from
      easy; ``mmemb_lab.world.audit`` measures that).
    - **text chains** (the query is text: text-to-image, video retrieval, visual documents): an attribute
      is given by composition - "the colour after the colour after red", "the cell below the cell right
      of top-left", "the letter after B", "3 plus 4 minus 2" - and a rationale resolves it. A hard video
      query brings two near misses into the pool (``make_video_ret``), which only the resolved chain
      rules out. Here the text is the whole input, so its wording does show the depth.

    For analysis only, every item stores ``needs_reasoning``, its gold reasoning steps and hop count;
    the model never sees them.

Used by: ``mmemb_lab.world.build`` (datasets on disk), the stage-0 foundation (fresh items every step)
and notebook 01. Paper mapping: the MMEB-V2 meta-tasks (image CLS/QA/RET/GD, video QA/RET, visdoc).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .chains import (
    Item,
    Visual,
    _distinct_texts,
    _rand_obj_at,
    chain_phrase,
    chain_scene,
    chain_steps,
    described_object,
    follow_chain,
    image_query,
    obj_at,
)
from .scenes import (
    COLOURS,
    LETTERS,
    POSITIONS,
    SHAPES,
    Event,
    Obj,
    Page,
    Scene,
    Video,
    letter_after,
    random_obj,
    random_page,
    random_scene,
)

N_LOCAL_CANDIDATES = 24  # local tasks rank 24 candidates: chance = 1/24 = 4.2%
HARD_FRACTION = 0.65
"""Share of hard items in every dataset and in the stage-0 stream: the world's one default mix."""


def make_cls(rng, idx, hard):
    scene, expr, pos, steps = image_query(rng, hard)
    pos_text = scene.cells[pos].name
    negs = [o.name for _, o in scene.objects()]
    texts, label = _distinct_texts(rng, pos_text, negs, lambda: random_obj(rng).name, N_LOCAL_CANDIDATES)
    return Item("toy_cls", f"cls-{idx}", "Classify the indicated object in the image:", expr + ".", scene,
                tuple((t, None) for t in texts), (label,), hard, steps, pos_text)


def make_qa(rng, idx, hard):
    scene, expr, pos, steps = image_query(rng, hard)
    pos_text = obj_at(scene, pos)
    negs = [obj_at(scene, i) for i, _ in scene.objects()]
    texts, label = _distinct_texts(rng, pos_text, negs, lambda: _rand_obj_at(rng), N_LOCAL_CANDIDATES)
    return Item("toy_qa", f"qa-{idx}", "Represent the given image with the following question:",
                f"which object is {expr}?", scene, tuple((t, None) for t in texts), (label,), hard, steps, pos_text)


def make_gd(rng, idx, hard):
    scene, expr, pos, steps = image_query(rng, hard)
    target = scene.cells[pos]
    negs = [o for _, o in scene.objects() if o != target]
    objs = [target] + list(dict.fromkeys(negs))
    while len(objs) < N_LOCAL_CANDIDATES:
        o = random_obj(rng)
        if o not in objs:
            objs.append(o)
    order = rng.permutation(len(objs))
    cands = tuple(("", objs[i]) for i in order)
    return Item("toy_gd", f"gd-{idx}", "Select the portion of the image that isolates the object:", expr + ".",
                scene, cands, (int(np.where(order == 0)[0][0]),), hard, steps, target.name,
                target_inst="Represent the given cropped image of the object.")


def scene_caption(scene: Scene) -> str:
    return ", ".join(f"{o.name} at {POSITIONS[i]}" for i, o in scene.objects()) + "."


def make_i2t(rng, idx, hard):
    scene, expr, pos, steps = image_query(rng, hard)
    o = scene.cells[pos]
    pos_text = f"{o.name} at {POSITIONS[pos]}."
    negs = [f"{x.name} at {POSITIONS[i]}." for i, x in scene.objects()]
    sample = lambda: f"{random_obj(rng).name} at {POSITIONS[rng.integers(9)]}."  # noqa: E731
    texts, label = _distinct_texts(rng, pos_text, negs, sample, N_LOCAL_CANDIDATES)
    return Item("toy_i2t", f"i2t-{idx}", "Find an image caption describing the given everyday image:",
                f"find a caption of the object reached {expr}.", scene, tuple((t, None) for t in texts), (label,),
                hard, steps, pos_text)


def make_t2i(rng, idx, hard):
    scene = random_scene(rng, 2, 5)
    objs = scene.objects()
    (pa, oa), (pb, ob) = [objs[int(i)] for i in rng.choice(len(objs), 2, replace=False)]
    da, _ = described_object(rng, oa, pa, False)
    db, steps = described_object(rng, ob, pb, hard)
    cands = [scene]
    while len(cands) < N_LOCAL_CANDIDATES:  # near misses keep the easy object and change the other
        cells = list(random_scene(rng, 1, 4).cells)
        cells[pa] = oa
        if rng.random() < 0.7:
            alt = Obj(COLOURS[rng.integers(6)] if rng.random() < 0.5 else ob.colour,
                      SHAPES[rng.integers(5)] if rng.random() < 0.5 else ob.shape)
            cells[int(rng.integers(9)) if rng.random() < 0.5 else pb] = alt
            cells[pa] = oa
        cand = Scene(tuple(cells))
        if cand.cells[pb] != ob and cand not in cands:
            cands.append(cand)
    order = rng.permutation(len(cands))
    return Item("toy_t2i", f"t2i-{idx}", "Find me an everyday image that matches the given caption:",
                f"{da} and {db}.", None, tuple(("", cands[i]) for i in order),
                (int(np.where(order == 0)[0][0]),), hard, tuple(steps), scene_caption(scene),
                target_inst="Represent the given image.")


def video_scene_chain(rng, hard: bool) -> tuple[Video, list[int], tuple[str, ...]]:
    """A 3-frame video: an anchor object appears, then another object appears, moves or leaves.

    Built backwards from the final frame, which holds a chain starting at the anchor (the anchor need
    not have a unique shape: the event identifies it) and, for hard items, a decoy chain.
    """
    for _ in range(200):
        final, path, attrs = chain_scene(rng, int(rng.integers(2, 4)), anchor_unique=False, decoy=hard)
        others = [i for i, _ in final.objects() if i not in path]
        empty = [i for i in range(9) if final.cells[i] is None]
        kinds = [k for k, ok in (("appears", bool(others)), ("moves", bool(others) and bool(empty)),
                                 ("leaves", bool(empty))) if ok]
        if not kinds:
            continue
        kind = kinds[int(rng.integers(len(kinds)))]
        mid = list(final.cells)
        if kind == "appears":
            x = int(rng.choice(others))
            ev2 = Event(kind, final.cells[x], None, x)
            mid[x] = None
        elif kind == "moves":
            x, s = int(rng.choice(others)), int(rng.choice(empty))
            ev2 = Event(kind, final.cells[x], s, x)
            mid[x], mid[s] = None, final.cells[x]
        else:
            s = int(rng.choice(empty))
            ev2 = Event(kind, random_obj(rng), s, None)
            mid[s] = ev2.obj
        first = list(mid)
        first[path[0]] = None
        ev1 = Event("appears", final.cells[path[0]], None, path[0])
        video = Video((Scene(tuple(first)), Scene(tuple(mid)), final), (ev1, ev2))
        if follow_chain(final, path[0], attrs) == path:
            return video, path, attrs
    raise RuntimeError("could not build a video")  # pragma: no cover


def make_video_qa(rng, idx, hard):
    video, path, attrs = video_scene_chain(rng, hard)
    final = video.frames[-1]
    first = f"appears: {obj_at(final, path[0])}."
    steps = (first,) + chain_steps(final, path, attrs, "x")[1:]
    text = f"start at the object that appears first, then {chain_phrase(attrs)}. which object is it?"
    pos_text = obj_at(final, path[-1])
    negs = [obj_at(final, i) for i, _ in final.objects()]
    texts, label = _distinct_texts(rng, pos_text, negs, lambda: _rand_obj_at(rng), N_LOCAL_CANDIDATES)
    return Item("toy_video_qa", f"vqa-{idx}", "Given the video, answer the question:", text, video,
                tuple((t, None) for t in texts), (label,), hard, steps, pos_text)


def video_near_miss(video: Video, rng, how: str) -> Video:
    """``video`` with its first event's object recoloured (``how="colour"``) or appearing at another cell
    that is free in every frame (``"cell"``; recoloured when none is free). Each breaks only what a hard
    retrieval query gives by a chain, so a near miss is told apart from the target by resolving it."""
    first, mid, final = video.frames
    ev1, ev2 = video.events
    p0, obj = ev1.dst, ev1.obj
    free = [i for i in range(9) if all(f.cells[i] is None for f in video.frames)]
    q, new = p0, obj
    if how == "cell" and free:
        q = int(rng.choice(free))
    else:
        others = [c for c in COLOURS if c != obj.colour]
        new = Obj(others[int(rng.integers(len(others)))], obj.shape)

    def edit(scene: Scene) -> Scene:
        cells = list(scene.cells)
        cells[p0], cells[q] = None, new
        return Scene(tuple(cells))

    return Video((first, edit(mid), edit(final)), (Event("appears", new, None, q), ev2))


def make_video_ret(rng, idx, hard):
    """A hard query resolves the first object's colour and cell through chains; its item carries two near
    misses (``meta["distractors"]``: recoloured, moved) that join the global pool, so that the rest of
    the description - the shape and the second event, which identify a video among random ones - is not
    enough. Each attribute is a chain of 1-2 hops, which one forward of the 3-layer model still composes,
    so for this model these items do not need reasoning: selection keeps no rationale for them and the
    gate stays shut on them. Deeper chains were measured and not adopted: the model reads a resolved
    description in the span poorly (docs/research-log.md, World: near-miss videos)."""
    video, _, _ = video_scene_chain(rng, False)
    ev1, ev2 = video.events
    d1, steps = described_object(rng, ev1.obj, ev1.dst, hard)
    text = f"first {d1} appears, then {ev2.describe()}"
    meta = {"events": [ev1.describe(), ev2.describe()]}
    if hard:
        meta["distractors"] = tuple(video_near_miss(video, rng, how) for how in ("colour", "cell"))
    return Item("toy_video_ret", f"vret-{idx}", "Find the video that matches the description:", text, None,
                (("", video),), (0,), hard, tuple(steps), f"{ev1.describe()} {ev2.describe()}",
                target_inst="Understand the content of the provided video.", meta=meta)


def make_doc(rng, idx, hard):
    page = random_page(rng)
    (ka, va), (kb, vb) = [page.rows[int(i)] for i in rng.choice(len(page.rows), 2, replace=False)]
    steps: list[str] = []
    kphrase, vphrase = kb, vb
    if hard:
        hops = int(rng.integers(1, 3))
        k0 = LETTERS[(LETTERS.index(kb) - hops) % len(LETTERS)]
        kphrase, cur = k0, k0
        for _ in range(hops):
            kphrase = f"the letter after {kphrase}"
            steps.append(f"after {cur} is {letter_after(cur)}.")
            cur = letter_after(cur)
        v = int(vb)
        a = int(rng.integers(0, v + 1))
        vphrase = f"{a} plus {v - a}"
        if len(steps) < 2:  # a second arithmetic hop: a + b - c
            c = int(rng.integers(0, 10 - v))
            vphrase = f"{a} plus {v - a + c} minus {c}"
            steps += [f"{a} plus {v - a + c} is {v + c}.", f"{v + c} minus {c} is {v}."]
        else:
            steps.append(f"{a} plus {v - a} is {v}.")
        steps.append(f"so {kb} is {vb}.")
    text = f"a page where {ka} is {va} and {kphrase} is {vphrase}."
    return Item("toy_doc", f"doc-{idx}", "Find a document image that matches the given query:", text, None,
                (("", page),), (0,), hard, tuple(steps), f"{ka} is {va} and {kb} is {vb}",
                target_inst="Understand the content of the provided document image.",
                meta={"conditions": [[ka, va], [kb, vb]]})


# name -> (builder, modality, meta_task, eval_type)
DATASETS: dict[str, tuple[Callable, str, str, str]] = {
    "toy_cls": (make_cls, "image", "CLS", "local"),
    "toy_qa": (make_qa, "image", "QA", "local"),
    "toy_i2t": (make_i2t, "image", "RET", "local"),
    "toy_t2i": (make_t2i, "image", "RET", "local"),
    "toy_gd": (make_gd, "image", "GD", "local"),
    "toy_video_qa": (make_video_qa, "video", "QA", "local"),
    "toy_video_ret": (make_video_ret, "video", "RET", "global"),
    "toy_doc": (make_doc, "visdoc", "VDRv1", "global"),
}


def item_rng(seed: int, dataset: str, split: str, idx: int) -> np.random.Generator:
    """Independent stream per (seed, dataset, split, index): any item is reproducible on its own."""
    key = [seed, sorted(DATASETS).index(dataset), {"train": 0, "eval": 1, "stream": 2, "val": 3}[split], idx]
    return np.random.default_rng(key)


def make_item(dataset: str, seed: int, split: str, idx: int, hard_fraction: float) -> Item:
    rng = item_rng(seed, dataset, split, idx)
    hard = bool(rng.random() < hard_fraction)
    return DATASETS[dataset][0](rng, idx, hard)


def relevant(item: Item, target: Visual) -> bool:
    """Does a pool entry satisfy a global query? (builds the qrels of toy_doc and toy_video_ret)."""
    if isinstance(target, Page):
        return all(target.value(k) == v for k, v in item.meta["conditions"])
    if isinstance(target, Video):
        return [e.describe() for e in target.events] == item.meta["events"]
    return False
