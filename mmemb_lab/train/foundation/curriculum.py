"""The stage-0 curriculum: which items, skills and reading spans each step trains on, and the step."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ... import distributed
from ...data import candidate_key, item_candidates, item_query, to_pil
from ...model.backbone import Backbone, reasoning_span
from ...model.embed import Input, collate
from ...world.scenes import Page, Scene, Video
from ...world.skills import cell_fact, reason_chain, sample_skill, text_op
from ...world.tasks import DATASETS, make_item, video_near_miss
from .config import FoundationConfig
from .objective import answer_labels, answer_weights, frame_labels, search_targets, token_labels, token_positions

log = logging.getLogger(__name__)


def contrastive_batch(cfg: FoundationConfig, seed: int, step: int, n: int):
    """Query / positive / hard-negative inputs for ``n`` fresh items of random datasets."""
    rng = np.random.default_rng([seed, step, distributed.rank(), 1])
    names = sorted(DATASETS)
    qs, ps, ns, ids, nids, answers = [], [], [], [], [], []
    for i in range(n):
        name = names[int(rng.integers(len(names)))]
        it = make_item(name, seed, "stream", (step * n + i) * max(1, distributed.world_size()) + distributed.rank(),
                       cfg.hard_fraction)
        answers.append(it.answer)
        span = (not it.needs_reasoning and len(it.gold_steps) == 1 and rng.random() < cfg.span_fraction)
        text = it.gold_steps[0] if span else None
        if step >= cfg.read_phase and it.needs_reasoning and rng.random() < cfg.read_fraction:
            text = reading_span(it, rng, int(rng.integers(cfg.read_observations + 1)))
        qs.append(item_query(it, text))
        p, pid, neg, nid = positive_and_negatives(it, rng, cfg.hard_negatives)
        ps.append(p)
        ids.append(pid)
        ns += neg
        nids += nid
    return qs, ps, ns, ids, nids, answers


def positive_and_negatives(it, rng, k: int) -> tuple[Input, str, list[Input], list[str]]:
    """An item's positive and ``k`` hard negatives, with their candidate keys (to mask false negatives): other
    candidates of its own list (local tasks), or near misses (global tasks: a page that satisfies one
    condition only, a video that differs in one event). Stage 0 and stage 1 mine them here."""
    cands = item_candidates(it)
    pos, pid = cands[it.labels[0]], candidate_key(*it.candidates[it.labels[0]])
    if len(cands) > 1:
        others = [j for j in range(len(cands)) if j not in it.labels]
        picked = [int(j) for j in rng.choice(others, k, replace=False)]
        return pos, pid, [cands[j] for j in picked], [candidate_key(*it.candidates[j]) for j in picked]
    negs, nids = [], []
    for _ in range(k):
        other = near_miss(it, rng)
        negs.append(Input("", to_pil(other), it.target_inst))
        nids.append(candidate_key("", other))
    return pos, pid, negs, nids


def observations(item, rng, k: int) -> list[str]:
    """``k`` true single-step statements about an item's input, in the world's step forms: what is at a
    cell of its scene (the last frame of a video) and input-free facts (successors, cell moves, sums)."""
    scene = item.query_visual.frames[-1] if isinstance(item.query_visual, Video) else item.query_visual
    out = []
    for _ in range(k):
        if isinstance(scene, Scene) and rng.random() < 0.6:
            out.append(cell_fact(scene, int(rng.integers(9))))
        else:
            out.append(text_op(rng).answer)
    return out


def reading_span(item, rng, k: int) -> str:
    """``k`` observations, then the item's answer statement (see ``FoundationConfig.read_fraction``)."""
    return " ".join(observations(item, rng, k) + [item.gold_steps[-1]])


def bag_of_words(tokenizer, texts: list[str]) -> torch.Tensor:
    """(n, vocab) uniform distribution over each text's tokens."""
    m = torch.zeros(len(texts), len(tokenizer))
    for i, t in enumerate(texts):
        m[i, tokenizer(t, add_special_tokens=False)["input_ids"]] = 1.0
    return m / m.sum(1, keepdim=True).clamp(min=1)


def near_miss(item, rng):
    """A global-task negative: for a page query, the target page with the second condition broken; for a
    video query, the target video with its first object recoloured or moved (``video_near_miss``)."""
    target = item.candidates[0][1]
    if isinstance(target, Page):
        (ka, _), (kb, vb) = item.meta["conditions"]
        rows = tuple((k, d if k != kb else str((int(d) + int(rng.integers(1, 10))) % 10)) for k, d in target.rows)
        return Page(rows)
    return video_near_miss(target, rng, "colour" if rng.random() < 0.5 else "cell")


def gen_skills(cfg: FoundationConfig, seed: int, step: int, world: int = 1) -> list:
    """This rank's next-token examples at ``step``: the phase's skill mix, then (from ``reason_phase``)
    chains of thought. A pure function of (seed, step, rank)."""
    rng = np.random.default_rng([seed, step, distributed.rank(), 0])
    phase2 = step >= cfg.frame_phase
    weights = cfg.see_weights if step < cfg.see_steps else (cfg.frame_replay_weights if phase2 else None)
    if step >= cfg.skill_phase:
        weights = {**(weights or {}), **cfg.skill_replay_weights}
    n_gen = cfg.gen_batch if step < cfg.see_steps else cfg.gen_batch_nce
    skills = [sample_skill(rng, weights) for _ in range(n_gen // world)]
    if step >= cfg.reason_phase and cfg.reason_batch > 0:
        skills += [reason_chain(rng, cfg.reason_form) for _ in range(cfg.reason_batch // world)]
    return skills


def assistant_text(skill) -> str:
    """What the model is taught to write for a skill: its answer and the end of the turn, or (a chain in the
    span form) ``<think>`` steps ``</think>``, where stage 1's writer goes on with ``<|emb|>``."""
    if skill.kind == "reason_span":
        return reasoning_span(skill.answer)
    return skill.answer + "<|im_end|>"


def make_step_fn(backbone: Backbone, cfg: FoundationConfig, seed: int):
    """Batches are a pure function of (seed, step, rank): resumable and identical across restarts."""
    world = max(1, distributed.world_size())

    def step_fn(step: int, module) -> dict:
        phase2 = step >= cfg.frame_phase
        skills = gen_skills(cfg, seed, step, world)
        answers = [assistant_text(s) for s in skills]
        batch = collate(backbone, [Input(s.question, to_pil(s.visual), s.instruction) for s in skills], answers)
        gen = {"batch": batch, "labels": answer_labels(backbone, batch, answers),
               "tok_labels": [lab for s in skills for lab in token_labels(s.visual)],
               "tok_positions": [p for s in skills for p in token_positions(s.visual, backbone.video_mode)]
               if cfg.position_head else None,
               "frame_labels": frame_labels(backbone, batch) if phase2 and cfg.frame_head_weight > 0 else None,
               "frame_layer": cfg.frame_head_layer}
        if step >= cfg.search_phase and cfg.search_weight > 0:
            if backbone.model.config._attn_implementation != "eager":  # the term reads attention probabilities
                backbone.model.set_attn_implementation("eager")
            gen.update(search=search_targets(backbone, batch, skills), search_layer=cfg.search_layer,
                       search_head=cfg.search_head)
        if step >= cfg.answer_phase and cfg.answer_weight != 1.0:
            gen["weights"] = answer_weights(backbone, gen["labels"], skills, cfg.answer_weight)
        nce = None
        if step >= cfg.see_steps and cfg.nce_weight > 0:
            qs, ps, ns, ids, nids, answers = contrastive_batch(cfg, seed, step, cfg.nce_batch // world)
            nce = {"q": collate(backbone, qs), "p": collate(backbone, ps), "n": collate(backbone, ns), "ids": ids,
                   "neg_ids": nids, "temperature": cfg.temperature,
                   "bow": bag_of_words(backbone.tokenizer, answers) if cfg.bow_weight > 0 else None}
        out = module(gen, nce)
        loss = out["lm"] + cfg.aux_weight * out["aux"] + (cfg.nce_weight * out["nce"] if nce else 0.0)
        if "bow" in out:
            loss = loss + cfg.bow_weight * out["bow"]
        if "frame" in out:
            loss = loss + cfg.frame_head_weight * out["frame"]
        if "search" in out:
            loss = loss + cfg.search_weight * out["search"]
        return {**{k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}, "loss": loss}
    return step_fn
