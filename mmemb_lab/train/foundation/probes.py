"""Does it see? Greedy descriptions of held-out scenes, frames and pages, scored cell by cell, and the
single-step skills.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from ...data import to_pil
from ...model.backbone import Backbone
from ...model.embed import Input, collate
from ...world.scenes import ORDINALS, POSITIONS, Page, Scene
from ...world.skills import SKILLS, describe_frame, describe_page, describe_scene

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(backbone: Backbone, inputs: list[Input], max_new_tokens: int = 80, batch_size: int = 32) -> list[str]:
    """Greedy answers (assistant turn) for a list of inputs."""
    model = backbone.model
    was = model.training
    model.eval()
    outs = []
    eos = backbone.token_id("<|im_end|>")
    for s in range(0, len(inputs), batch_size):
        batch = collate(backbone, inputs[s:s + batch_size], [""] * len(inputs[s:s + batch_size]))
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=backbone.tokenizer.pad_token_id)
        new = gen[:, batch["input_ids"].shape[1]:]
        outs += backbone.tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train(was)
    return outs


_CELL = re.compile(r"(" + "|".join(POSITIONS) + r") (empty|\w+ \w+)\.")
_ROW = re.compile(r"row (\w+) (\w) is (\w)\.")


def score_scene_text(text: str, scene: Scene) -> dict[str, list[float]]:
    said = {m.group(1): m.group(2) for m in _CELL.finditer(text)}
    r = {"occupancy": [], "colour": [], "shape": []}
    for i, o in enumerate(scene.cells):
        got = said.get(POSITIONS[i], "?")
        r["occupancy"].append(float((got == "empty") == (o is None) and got != "?"))
        if o is not None:
            parts = got.split()
            r["colour"].append(float(len(parts) == 2 and parts[0] == o.colour))
            r["shape"].append(float(len(parts) == 2 and parts[1] == o.shape))
    return r


def score_page_text(text: str, page: Page) -> dict[str, list[float]]:
    said = {m.group(1): (m.group(2), m.group(3)) for m in _ROW.finditer(text)}
    r = {"letter": [], "digit": []}
    for i, (k, d) in enumerate(page.rows):
        got = said.get(ORDINALS[i], ("?", "?"))
        r["letter"].append(float(got[0] == k))
        r["digit"].append(float(got[1] == d))
    return r


def description_accuracy(backbone: Backbone, seed: int = 1000, n: int = 100) -> dict[str, float]:
    """Per-attribute accuracy of greedy descriptions on held-out scenes, video frames and pages."""
    rng = np.random.default_rng([seed, 7])
    scenes = [describe_scene(rng) for _ in range(n)]
    frames = [describe_frame(rng) for _ in range(n)]
    pages = [describe_page(rng) for _ in range(n)]
    acc: dict[str, list[float]] = {}
    texts = generate(backbone, [Input(s.question, to_pil(s.visual)) for s in scenes + frames + pages])
    for s, t in zip(scenes, texts[:n]):
        for k, v in score_scene_text(t, s.visual).items():
            acc.setdefault(k, []).extend(v)
    for s, t in zip(frames, texts[n:2 * n]):
        idx = int(s.question.split()[2].rstrip(".")) - 1
        for k, v in score_scene_text(t, s.visual.frames[idx]).items():
            acc.setdefault("frame_" + k, []).extend(v)
    for s, t in zip(pages, texts[2 * n:]):
        for k, v in score_page_text(t, s.visual).items():
            acc.setdefault("page_" + k, []).extend(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


ATOMIC_SKILLS = ("read_cell", "find_shape", "find_other", "read_page", "text_op", "video_event")
"""The single-step QA skills whose answers are the hops of the world's rationales (descriptions excluded)."""


def skill_accuracy(backbone: Backbone, seed: int = 2000, n: int = 48) -> dict[str, float]:
    """Exact-answer accuracy of greedy single-step QA on ``n`` fresh questions per atomic skill, reported
    per skill kind (``text_op`` splits into colour_after / letter_after / move / plus / minus and
    ``video_event`` into video_first / video_event). A rationale's k-th step is only as good as these."""

    rng = np.random.default_rng([seed, 7])
    skills = [SKILLS[name][0](rng) for name in ATOMIC_SKILLS for _ in range(n)]
    answers = generate(backbone, [Input(s.question, to_pil(s.visual)) for s in skills], max_new_tokens=24)
    hits: dict[str, list[float]] = {}
    for s, a in zip(skills, answers):
        hits.setdefault(s.kind, []).append(float(a.strip() == s.answer.strip()))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}
