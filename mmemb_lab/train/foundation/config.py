"""The stage-0 configuration: what is trained, in which phases, with which weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ...model.backbone import TinySpec
from ...world.tasks import HARD_FRACTION
from ..contrastive import TEMPERATURE
from ..loop import LoopConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoundationConfig:
    spec: TinySpec = field(default_factory=TinySpec)
    """Sizes of the tiny backbone."""
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=8600, lr=1e-3, warmup=100, ckpt_every=100))
    """Optimiser and schedule."""
    gen_batch: int = 32
    """Descriptions / single-step QA per step."""
    nce_batch: int = 32
    """Query-positive pairs per step for the direct contrastive term."""
    see_steps: int = 800
    """Steps of descriptions only, before the contrastive term joins (grounding first)."""
    aux_weight: float = 1.0
    """Weight of the per-image-token attribute head."""
    nce_weight: float = 1.0
    """Weight of the direct contrastive term."""
    temperature: float = TEMPERATURE
    """InfoNCE temperature (``contrastive.TEMPERATURE``)."""
    hard_fraction: float = HARD_FRACTION
    """Share of hard items in the contrastive stream (the world's default mix)."""
    hard_negatives: int = 2
    """Mined negatives per query: other candidates of the item (local) or near-miss targets (global)."""
    bow_weight: float = 0.5
    """Weight of the answer bag-of-words term (ours): the LM head applied to the ``<|emb|>`` state of a
    query and of its positive must put its mass on the words of the target's description. A pretrained
    MLLM's state "knows" what it would answer; this gives the tiny model's embedding token that content
    directly, instead of waiting for InfoNCE alone to break the symmetry of near-identical states."""
    gen_batch_nce: int = 16
    """Descriptions / QA per step once the contrastive term has joined (replay keeps seeing sharp)."""
    span_fraction: float = 0.25
    """Share of easy items whose query carries its ONE gold step in a reasoning span (<think>...</think>):
    a pretrained MLLM reads its context; this teaches the embedder to read a span. Never multi-step."""
    tokenizer_corpus: int = 4000
    """Number of world samples the BPE tokenizer is trained on."""
    video_mode: str = "frames_as_images"
    """How the tiny model is fed frame sequences (see ``Backbone.video_mode``); recorded in the checkpoint."""
    position_head: bool = True
    """Also predict each image token's cell index from its features (puts "where" into the token's content,
    so the language model can find a cell by content rather than through rotary positions)."""
    see_weights: dict = field(default_factory=dict)
    """Skill mix (name -> weight) during the first ``see_steps``; empty = the default mix."""
    frame_phase: int = 3400
    """Step from which the frame-index head and the frame-heavy replay mix join (phase 2)."""
    frame_head_weight: float = 1.0
    """Weight of the frame-index head (ours): a linear head on the language model's state after layer
    ``frame_head_layer`` at every image token of a frame sequence predicts which frame the token belongs
    to, so the early layers copy the ``frame k:`` marker into every token of its block. Why: without it the
    model could not tell frames apart (docs/research-log.md, Foundation: frame_head_weight)."""
    frame_head_layer: int = 1
    """Decoder layer whose output the frame-index head reads (1 = after the first layer)."""
    frame_replay_weights: dict = field(default_factory=lambda: {"describe_frame": 4.0, "video_event": 2.0})
    """Skill-mix overrides for the replay batch from ``frame_phase`` on (other skills keep their weight)."""
    read_phase: int = 6000
    """Step from which reading spans join the contrastive stream (phase 3)."""
    read_fraction: float = 0.5
    """Share of hard items in the contrastive stream whose query carries a *reading span* from
    ``read_phase`` on (ours): up to ``read_observations`` true single-step observations about the input
    (what is at a cell, a colour / letter / cell successor, a sum) in random order, then the item's answer
    statement (its last step, e.g. "other square: middle-left orange square." or "so F is 3."); the
    observations are not a chain, so no reasoning is shown, only where a span states its conclusion.
    Why: a pretrained MLLM reads its context's conclusion, the tiny one had not learned to
    (docs/research-log.md, Foundation: read_fraction)."""
    read_observations: int = 3
    """Most true observations before the answer statement in a reading span."""
    skill_phase: int = 6600
    """Step from which the replay mix favours the search skills (phase 4)."""
    skill_replay_weights: dict = field(default_factory=lambda: {
        "find_shape": 4.0, "find_other": 6.0, "read_page": 3.0, "video_event": 3.0, "text_op": 2.0})
    """Skill-mix overrides from ``skill_phase`` on (on top of ``frame_replay_weights``). Why: the content
    searches that hard items chain lagged far behind the dense descriptions and position lookups
    (docs/research-log.md, Foundation: skill_replay_weights)."""
    search_phase: int = 7600
    """Step from which the search-attention term joins (phase 5)."""
    search_weight: float = 1.0
    """Weight of the search-attention term (ours): while a content-search answer (find_shape, find_other,
    read_page, video_first, video_event) states what it found, head ``search_head`` of decoder layer
    ``search_layer`` is asked to put its attention on the image token(s) that hold it
    (-log of the attention mass there, ``Skill.reads``). It names only *where* to look, never what is
    there, and acts on single-step skills only (no chain is shown). Why: without it the attention never
    found the sought token; the greedy answers still lag (docs/research-log.md, Foundation: search_weight)."""
    answer_phase: int = 8600
    """Step from which ``answer_weight`` applies (phase 6)."""
    answer_weight: float = 1.0
    """Weight, in the next-token loss, of the skill-answer tokens that the question does not contain (the
    looked-up cell, colour, digit, sum...; every atomic skill alike, descriptions excluded); other labelled
    tokens weigh 1 and the loss is the weighted mean (ours): in a QA answer most tokens echo the question.
    Off by default (1.0): it traded the position lookup for the content search, and from scratch the gain
    came from the schedule, not the weight (docs/research-log.md, Foundation: answer_weight)."""
    reason_phase: int = 8600
    """Step from which ``reason_batch`` chains of thought join the next-token batch (phase 7)."""
    reason_batch: int = 0
    """Chains of thought per step (global) from ``reason_phase`` on (``world.skills.reason_chain``): a fresh
    hard item answered with its gold steps, in the form ``reason_form`` says. Ours; 0 in the default
    schedule; the committed checkpoint was continued with 16, then 32 (data/README.md), and ``make
    foundation`` trains with 32 from step 8600. Why: a pretrained MLLM writes such chains before any
    embedding training, and stage 1 alone did not teach the tiny one to (docs/research-log.md, Foundation:
    reason_batch)."""
    reason_form: str = "span"
    """How ``reason_batch`` chains are asked and written (``world.skills.reason_chain``): "span" (ours, the
    committed checkpoint: the stage-1 prompt, instruction included, gold steps inside ``<think>...</think>``)
    or "plain" ("step by step: <query>", no span; not adopted). Why "span": a lookup the model answered as a
    question was not carried into the span until it was trained there (docs/research-log.md, Foundation:
    reason_form)."""
    search_layer: int = 1
    """Decoder layer whose attention the search term supervises (0-based; needs the eager attention)."""
    search_head: int = 0
    """Head of that layer the search term supervises (the others stay free)."""
