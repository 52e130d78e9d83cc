"""Atomic skills of the toy world: the single steps that hard items chain, as question -> answer pairs.

Concept
    A hard item is a chain of atomic hops (``mmemb_lab.world.tasks``). A rationale only helps if each
    of its steps is reliable, and in a prototype the *first* step of a rationale was the weak link
    (docs/research-log.md, Prototypes). So stage 0 trains every hop on its own, as single-step
    QA whose answer has exactly the shape of one rationale clause ("other red: centre red square."),
    plus dense descriptions of scenes, frames and pages that teach the model to see. One skill is
    multi-step: ``reason_chain`` (the gold chain of thought of a fresh hard item), weight 0 in the default
    mix, used only by stage 0's last phase (``FoundationConfig.reason_batch`` / ``reason_form``; the
    committed checkpoint has it in the span form). Which chains pay off and when to write one are the later
    stages' job.

Used by: ``mmemb_lab.train.foundation`` (stage 0) and the tokenizer corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scenes import (
    COLOURS,
    DIRECTIONS,
    LETTERS,
    POSITIONS,
    SHAPES,
    Page,
    Scene,
    Video,
    colour_after,
    letter_after,
    random_page,
    random_scene,
    random_video,
    step,
)
from .tasks import DATASETS, obj_at, video_scene_chain


@dataclass(frozen=True)
class Skill:
    kind: str
    question: str
    visual: object  # Scene | Video | Page | None
    answer: str
    reads: tuple[int, ...] = field(default=(), repr=False)  # training fields: not in the repr (nor the fingerprint)
    """For a content search: the merged image tokens (indexed over the input's images in order, 9 per
    scene or frame, 8 per page) that hold what the answer states - where a reader must look."""
    reads_after: str = field(default="", repr=False)
    """The answer prefix after which the answer states what is read there ("triangle:" ...)."""
    instruction: str = field(default="", repr=False)
    """The task instruction the question is asked under (only ``reason_chain(..., form="span")`` sets one)."""


def describe_scene(rng) -> Skill:
    s = random_scene(rng, 2, 7)
    return Skill("describe_scene", "Describe the image.", s, s.describe())


def describe_page(rng) -> Skill:
    p = random_page(rng)
    return Skill("describe_page", "Read the document.", p, p.describe())


def describe_frame(rng) -> Skill:
    v = random_video(rng)
    t = int(rng.integers(len(v.frames)))
    return Skill("describe_frame", f"Describe frame {t + 1}.", v, v.frames[t].describe())


def video_event(rng) -> Skill:
    hard = bool(rng.random() < 0.5)
    v, path, _ = video_scene_chain(rng, hard)
    if rng.random() < 0.5:
        # the anchor appears in frame 2 and stays: its token in frames 2 and 3
        return Skill("video_first", "which object appears first?", v, f"appears: {obj_at(v.frames[-1], path[0])}.",
                     (9 + path[0], 18 + path[0]), "appears:")
    t = int(rng.integers(2))
    ev = v.events[t]
    reads = tuple(i for i in (None if ev.src is None else 9 * t + ev.src,
                              None if ev.dst is None else 9 * (t + 1) + ev.dst) if i is not None)
    return Skill("video_event", f"what happens between frame {t + 1} and frame {t + 2}?", v, ev.describe(), reads)


def cell_fact(scene: Scene, pos: int) -> str:
    """What is at a cell, in the world's step form: "top-left: top-left blue triangle." (or "... empty.")."""
    o = scene.cells[pos]
    return f"{POSITIONS[pos]}: {POSITIONS[pos]} {o.name if o else 'empty'}."


def read_cell(rng) -> Skill:
    s = random_scene(rng, 2, 7)
    pos = int(rng.integers(9))
    return Skill("read_cell", f"what is at {POSITIONS[pos]}?", s, cell_fact(s, pos))


def find_shape(rng) -> Skill:
    for _ in range(100):
        s = random_scene(rng, 2, 7)
        uniq = [sh for sh in SHAPES if len(s.where(shape=sh)) == 1]
        if uniq:
            sh = uniq[int(rng.integers(len(uniq)))]
            cell = s.where(shape=sh)[0]
            return Skill("find_shape", f"where is the {sh}?", s, f"{sh}: {obj_at(s, cell)}.", (cell,), f"{sh}:")
    raise RuntimeError("no unique shape")  # pragma: no cover


def find_other(rng) -> Skill:
    for _ in range(200):
        s = random_scene(rng, 3, 7)
        attr = "colour" if rng.random() < 0.5 else "shape"
        pairs = []
        for i, o in s.objects():
            v = getattr(o, attr)
            same = s.where(colour=v) if attr == "colour" else s.where(shape=v)
            if len(same) == 2:
                pairs.append((i, [j for j in same if j != i][0], v))
        if pairs:
            i, j, v = pairs[int(rng.integers(len(pairs)))]
            return Skill("find_other", f"which other object is {v}, besides {POSITIONS[i]}?", s,
                         f"other {v}: {obj_at(s, j)}.", (j,), f"other {v}:")
    raise RuntimeError("no pair")  # pragma: no cover


def read_page(rng) -> Skill:
    p = random_page(rng)
    r = int(rng.integers(len(p.rows)))
    k, d = p.rows[r]
    return Skill("read_page", f"what is {k}?", p, f"{k} is {d}.", (2 * r + 1,), f"{k} is")  # row r: key, digit


def text_op(rng) -> Skill:
    kind = int(rng.integers(5))
    if kind == 0:
        c = COLOURS[int(rng.integers(len(COLOURS)))]
        return Skill("colour_after", f"what colour is after {c}?", None, f"after {c} is {colour_after(c)}.")
    if kind == 1:
        k = LETTERS[int(rng.integers(len(LETTERS)))]
        return Skill("letter_after", f"what letter is after {k}?", None, f"after {k} is {letter_after(k)}.")
    if kind == 2:
        for _ in range(50):
            pos, d = int(rng.integers(9)), list(DIRECTIONS)[int(rng.integers(4))]
            if step(pos, d) is not None:
                return Skill("move", f"what is {d} of {POSITIONS[pos]}?", None,
                             f"{d} of {POSITIONS[pos]} is {POSITIONS[step(pos, d)]}.")
    a = int(rng.integers(10))
    if kind == 3:
        b = int(rng.integers(10 - a))
        return Skill("plus", f"what is {a} plus {b}?", None, f"{a} plus {b} is {a + b}.")
    b = int(rng.integers(a + 1))
    return Skill("minus", f"what is {a} minus {b}?", None, f"{a} minus {b} is {a - b}.")


REASON_PREFIX = "step by step: "


def reason_chain(rng, form: str = "plain") -> Skill:
    """A fresh hard item of a random dataset, answered with its gold steps.

    The one multi-step skill: a pretrained MLLM can already write a chain of thought for such a
    question; this lets the stand-in learn to, in stage 0's last phase (``FoundationConfig.reason_batch``,
    0 in the from-scratch schedule). Two forms (``FoundationConfig.reason_form``; the same item either way):
    - "plain": asked "step by step: <query>" without the task's instruction and outside a reasoning span,
      like an instruction-tuned model's CoT data; stage 1 still has to learn when and in which span to
      write it (not adopted, see ``FoundationConfig.reason_batch``);
    - "span": asked exactly as stage 1 asks (instruction + query), answered inside the reasoning span
      (kind "reason_span"; the span tags are added by the trainer). Why: a lookup the model answers as a
      question was not carried into the span (``FoundationConfig.reason_form``; docs/research-log.md,
      Foundation: reason_form).
    Items come from the builders' own random stream, never from the train / eval splits."""
    if form not in ("plain", "span"):
        raise ValueError(f"unknown chain form {form!r} (plain or span)")
    names = sorted(DATASETS)
    it = DATASETS[names[int(rng.integers(len(names)))]][0](rng, 0, True)
    if form == "span":
        return Skill("reason_span", it.query_text, it.query_visual, " ".join(it.gold_steps), instruction=it.query_inst)
    return Skill("reason_chain", REASON_PREFIX + it.query_text, it.query_visual, " ".join(it.gold_steps))


SKILLS = {
    "describe_scene": (describe_scene, 3.0), "describe_page": (describe_page, 2.0),
    "describe_frame": (describe_frame, 1.0), "video_event": (video_event, 1.0),
    "read_cell": (read_cell, 1.0), "find_shape": (find_shape, 1.0), "find_other": (find_other, 1.5),
    "read_page": (read_page, 1.0), "text_op": (text_op, 1.5),
    "reason_chain": (reason_chain, 0.0),  # last and weight 0 by default: the default draws stay as they were
}


def sample_skill(rng: np.random.Generator, weights: dict[str, float] | None = None) -> Skill:
    """One skill example; ``weights`` (name -> relative weight) overrides the default mix."""
    names = list(SKILLS)
    w = np.array([(weights or {}).get(n, SKILLS[n][1]) for n in names], dtype=float)
    return SKILLS[names[int(rng.choice(len(names), p=w / w.sum()))]][0](rng)


def video_visual(v: Video):
    return v.frames


__all__ = ["Skill", "SKILLS", "sample_skill", "Page", "Scene"]
