"""Stage 0: a foundation model for the toy world - the stand-in for a pretrained MLLM.

Concept
    MMEmb-R1 starts from a pretrained Qwen3-VL that can already see, describe and embed. Our tiny
    model starts from random weights, so stage 0 must give it those abilities before any reasoning is
    trained. What prototypes measured (docs/research-log.md, Prototypes): contrastive or short-answer
    losses from random init never teach a tiny model to use the image; next-token loss on a *dense
    description of every cell*, plus an auxiliary head that classifies every merged image token,
    does - in minutes. So the objective is

        L0 = NextToken(descriptions + atomic single-step QA) + w_aux * CE(attribute head on image tokens)
             + w_nce * InfoNCE(direct query embedding, positive; in-batch + mined hard negatives)
             + w_bow * BagOfWords(LM head at <|emb|> of query and positive -> words of the target)
             + w_search * -log(attention of one head on the image tokens a search answer reads)

    with the contrastive term joining after ``see_steps`` (grounding first), frame replay and a
    frame-index head from ``frame_phase``, reading spans (true observations, then the answer
    statement) from ``read_phase``, search-skill replay from ``skill_phase`` and the search-attention
    term from ``search_phase``. The skills are single hops (``mmemb_lab.world.skills``). A last phase
    (``reason_batch`` chains from ``reason_phase``, in the stage-1 span form: ``reason_form="span"``)
    teaches the model to write a gold chain of thought inside ``<think>...</think>``, as a pretrained
    reasoning MLLM can before any embedding training; which chains pay off, and when to write one, stay
    the later stages' job. The committed checkpoint had this phase (data/README.md); it is off in the
    default schedule (``reason_batch=0``) and ``make foundation`` turns it on from step 8600.

Deviations: a pretrained MLLM has no attribute head; ours is dropped after stage 0 (it is saved
separately and not part of the backbone checkpoint). Nor is its attention supervised: the search term
(``FoundationConfig.search_weight``) is ours, a stand-in for the pretraining scale a tiny model lacks.

Used by: ``make foundation`` (trains data/foundation from scratch; how the committed checkpoint was made is in
data/README.md), the demo when no foundation exists, notebook 01.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .backbone import Backbone, TinySpec, build_tiny, load_backbone, reasoning_span, train_tokenizer
from .contrastive import TEMPERATURE, info_nce
from .data import candidate_key, item_candidates, item_query, to_pil
from .embed import Input, base_model, collate
from .train import LoopConfig, atomic_write_text, run_loop
from .world.build import WORLD_VERSION
from .world.scenes import ORDINALS, POSITIONS, TOKEN_CLASSES, Page, Scene, Video
from .world.skills import cell_fact, describe_frame, describe_page, describe_scene, reason_chain, sample_skill, text_op
from .world.tasks import DATASETS, HARD_FRACTION, make_item, video_near_miss

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


class Stage0(torch.nn.Module):
    """The backbone plus the auxiliary heads; ``forward`` computes every stage-0 loss in ONE call (DDP-safe)."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.model = backbone.model
        hidden = backbone.model.config.text_config.hidden_size
        self.head = torch.nn.Linear(hidden, len(TOKEN_CLASSES))
        self.pos_head = torch.nn.Linear(hidden, N_TOKEN_POSITIONS)
        self.frame_head = torch.nn.Linear(hidden, MAX_FRAMES)
        self.to(backbone.device)

    def forward(self, gen: dict, nce: dict | None = None) -> dict:
        """``gen``: batch, labels, tok_labels, tok_positions, frame_labels (or None), frame_layer;
        ``nce``: query/positive/negative batches, ids, tau."""
        lm, aux, frame, found = lm_loss(None, self.model, gen["batch"], gen["labels"], self.head, gen["tok_labels"],
                                        self.pos_head, gen["tok_positions"], self.frame_head, gen.get("frame_labels"),
                                        gen.get("frame_layer", 1), gen.get("search"), gen.get("search_layer", 1),
                                        gen.get("search_head", 0), gen.get("weights"))
        out = {"lm": lm, "aux": aux}
        if frame is not None:
            out["frame"] = frame
        if found is not None:
            out["search"] = found
        if nce is not None:
            base = base_model(self.model)
            hq, hp, hn = (base(**b, use_cache=False).last_hidden_state[:, -1] for b in (nce["q"], nce["p"], nce["n"]))
            res = info_nce(F.normalize(hq, dim=-1), F.normalize(hp, dim=-1), nce["temperature"],
                           hard_negatives=F.normalize(hn, dim=-1), target_ids=nce["ids"], negative_ids=nce["neg_ids"])
            out.update(nce=res.loss, acc=res.accuracy)
            if nce.get("bow") is not None:  # answer bag of words through the (tied) LM head
                bow = nce["bow"].to(hq.device)
                lq = -(F.log_softmax(self.model.lm_head(hq), -1) * bow).sum(-1).mean()
                lp = -(F.log_softmax(self.model.lm_head(hp), -1) * bow).sum(-1).mean()
                out["bow"] = (lq + lp) / 2
        return out


def world_corpus(seed: int, n: int) -> list[str]:
    """Text the tokenizer is trained on: every kind of question, answer, instruction and candidate."""
    rng = np.random.default_rng([seed, 99])
    texts = []
    for _ in range(n):
        s = sample_skill(rng)
        texts += [s.question, s.answer]
    from .workers import DEFAULT_PROMPT, toy_rationales

    for name in DATASETS:
        for i in range(n // 8):
            it = make_item(name, seed, "stream", 10_000_000 + i, HARD_FRACTION)
            texts += [it.query_inst, it.query_text, it.answer, it.target_inst, *it.gold_steps,
                      *[t for t, _ in it.candidates if t]]
            if i % 4 == 0:  # the workers' wording (filler, format-only text) is part of the world's language
                texts += [r.text for r in toy_rationales(it, seed)]
    return texts + [DEFAULT_PROMPT]


def world_fingerprint(tokenizer) -> str:
    """Hash of the world generator's output and the tokenizer: a committed foundation must match both."""
    h = hashlib.sha256(WORLD_VERSION.encode())
    for name in sorted(DATASETS):
        it = make_item(name, 0, "eval", 0, HARD_FRACTION)
        h.update(repr((it.query_inst, it.query_text, it.answer, it.gold_steps, it.candidates)).encode())
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = sample_skill(rng)
        h.update(repr(s).encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return h.hexdigest()[:16]


N_TOKEN_POSITIONS = 27 + 8  # scene cells 0-8 (storyboard frames: 9 * frame + cell), page tokens 27-34
MAX_FRAMES = 8  # classes of the frame-index head


def frame_labels(backbone: Backbone, batch: dict) -> torch.Tensor:
    """(b, seq) index of the vision block each image token belongs to, in inputs with several blocks
    (frame sequences fed as images); -100 elsewhere. Read from the token ids, so it follows the prompt."""
    ids = batch["input_ids"]
    block = torch.cumsum((ids == backbone.token_id("<|vision_start|>")).long(), dim=1) - 1
    pad = ids == backbone.token_id("<|image_pad|>")
    multi = block.max(dim=1, keepdim=True).values >= 1
    return torch.where(pad & multi & (block < MAX_FRAMES), block, torch.full_like(block, -100))


def token_labels(visual) -> list[int]:
    if isinstance(visual, (Scene, Page)):
        return visual.token_labels()
    if isinstance(visual, Video):
        return [lab for f in visual.frames for lab in f.token_labels()]
    return []


def token_positions(visual, video_mode: str = "frames_as_images") -> list[int]:
    """Where each merged image token sits (a frame's own index only when frames share one storyboard)."""
    if isinstance(visual, Scene):
        return list(range(9))
    if isinstance(visual, Page):
        return list(range(27, 35))
    if isinstance(visual, Video):
        if video_mode == "storyboard":
            return list(range(9 * len(visual.frames)))
        return list(range(9)) * len(visual.frames)
    return []


def answer_labels(backbone: Backbone, batch: dict, answers: list[str]) -> torch.Tensor:
    """Labels for next-token loss on the answers only (-100 elsewhere, padding included)."""
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    for i, a in enumerate(answers):
        n = len(backbone.tokenizer(a, add_special_tokens=False)["input_ids"])
        labels[i, -n:] = ids[i, -n:]
    return labels


def answer_weights(backbone: Backbone, labels: torch.Tensor, skills: list, weight: float) -> torch.Tensor:
    """Per-position loss weights: ``weight`` on labelled answer tokens of atomic skills whose id is not in
    the question, 1 elsewhere (descriptions keep 1 throughout)."""
    w = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    for i, sk in enumerate(skills):
        if sk.kind.startswith("describe"):
            continue
        asked = torch.tensor(backbone.tokenizer(sk.question, add_special_tokens=False)["input_ids"],
                             device=labels.device)
        new = (labels[i] != -100) & ~torch.isin(labels[i], asked)
        w[i, new] = weight
    return w


def search_targets(backbone: Backbone, batch: dict, skills: list) -> list[tuple[int, int, int, list[int]]]:
    """For every skill with ``reads``: (row, first query position, end query position, key positions).

    The query positions are those whose NEXT token belongs to the answer after ``reads_after`` (the
    answer is the end of its left-padded row); the keys are the sequence positions of the image tokens
    it reads (``Skill.reads`` index the row's image-pad tokens in order)."""
    pad = backbone.token_id("<|image_pad|>")
    length = batch["input_ids"].shape[1]
    out = []
    for i, sk in enumerate(skills):
        if not sk.reads:
            continue
        said = sk.answer[len(sk.reads_after):] + "<|im_end|>"
        n = len(backbone.tokenizer(said, add_special_tokens=False)["input_ids"])
        img = (batch["input_ids"][i] == pad).nonzero().flatten().tolist()
        out.append((i, length - n - 1, length - 1, [img[r] for r in sk.reads]))
    return out


def read_mass(attn: torch.Tensor, targets: list[tuple[int, int, int, list[int]]], head: int) -> list[torch.Tensor]:
    """Per target, the attention mass ``head`` puts on the read tokens at each of the answer's query
    positions; ``attn``: (batch, heads, query, key) probabilities of one layer."""
    return [attn[i, head, q0:q1][:, keys].sum(-1) for i, q0, q1, keys in targets]


def search_loss(attn: torch.Tensor, targets: list[tuple[int, int, int, list[int]]], head: int) -> torch.Tensor:
    """Mean over targets of -log(``read_mass``), averaged over the answer's query positions."""
    return torch.stack([-torch.log(m.clamp(min=1e-6)).mean() for m in read_mass(attn, targets, head)]).mean()


def search_attention(backbone: Backbone, inputs: list[Input], skills: list, answers: list[str], layer: int,
                     head: int) -> float:
    """Mean attention mass that ``head`` of ``layer`` puts on the read tokens while the answer is written
    (teacher-forced): 1/9 is an even spread over a scene. A diagnostic of the search circuit."""
    model = backbone.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        batch = collate(backbone, inputs, answers)
        with torch.no_grad():
            attn = base_model(model)(**batch, use_cache=False, output_attentions=True).attentions[layer]
        targets = search_targets(backbone, batch, skills)
        return float(np.mean([float(m.mean()) for m in read_mass(attn, targets, head)]))
    finally:
        model.set_attn_implementation(previous)


def lm_loss(backbone: Backbone | None, model: torch.nn.Module, batch: dict, labels: torch.Tensor, head=None,
            tok_labels: list[int] | None = None, pos_head=None, tok_positions: list[int] | None = None,
            frame_head=None, frame_targets: torch.Tensor | None = None, frame_layer: int = 1,
            search: list | None = None, search_layer: int = 1, search_head: int = 0,
            weights: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Next-token loss on labelled positions (a ``weights``-weighted mean when given), the attribute-head
    loss on image tokens, (when
    ``frame_targets`` has labels) the frame-index loss on the decoder state after ``frame_layer``, and
    (when ``search`` has targets, eager attention only) the search-attention loss."""
    base = base_model(model)
    mm = None
    aux = torch.zeros((), device=batch["input_ids"].device)
    if "pixel_values" in batch:
        mm = base.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        if head is not None and tok_labels:
            feats = torch.cat(mm.pooler_output)  # (n_image_tokens, hidden)
            aux = F.cross_entropy(head(feats), torch.tensor(tok_labels, device=feats.device))
            if pos_head is not None and tok_positions:
                aux = aux + F.cross_entropy(pos_head(feats), torch.tensor(tok_positions, device=feats.device))
    kw = {k: v for k, v in batch.items() if k != "pixel_values"}
    if mm is not None:
        kw["mm_encoder_outputs"] = {"image": mm}
    want_frames = frame_head is not None and frame_targets is not None and bool((frame_targets >= 0).any())
    res = base(**kw, use_cache=False, output_hidden_states=want_frames, output_attentions=bool(search))
    states = res.last_hidden_state
    logits = model.lm_head(states[:, :-1]) if hasattr(model, "lm_head") else model.get_output_embeddings()(states[:, :-1])
    if weights is None:
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    else:
        lab = labels[:, 1:].reshape(-1)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab, ignore_index=-100, reduction="none")
        w = weights[:, 1:].reshape(-1) * (lab != -100)
        lm = (ce * w).sum() / w.sum().clamp(min=1e-6)
    frame = None
    if want_frames:
        h = res.hidden_states[frame_layer]
        frame = F.cross_entropy(frame_head(h).reshape(-1, MAX_FRAMES), frame_targets.reshape(-1), ignore_index=-100)
    found = search_loss(res.attentions[search_layer], search, search_head) if search else None
    return lm, aux, frame, found


def contrastive_batch(cfg: FoundationConfig, seed: int, step: int, n: int):
    """Query / positive / hard-negative inputs for ``n`` fresh items of random datasets."""
    rng = np.random.default_rng([seed, step, distributed.rank(), 1])
    names = sorted(DATASETS)
    qs, ps, ns, ids, nids, answers = [], [], [], [], [], []
    for i in range(n):
        name = names[int(rng.integers(len(names)))]
        it = make_item(name, seed, "stream", (step * n + i) * max(1, distributed.world_size()) + distributed.rank(),
                       cfg.hard_fraction)
        cands = item_candidates(it)
        answers.append(it.answer)
        span = (not it.needs_reasoning and len(it.gold_steps) == 1 and rng.random() < cfg.span_fraction)
        text = it.gold_steps[0] if span else None
        if step >= cfg.read_phase and it.needs_reasoning and rng.random() < cfg.read_fraction:
            text = reading_span(it, rng, int(rng.integers(cfg.read_observations + 1)))
        qs.append(item_query(it, text))
        ps.append(cands[it.labels[0]])
        ids.append(candidate_key(*it.candidates[it.labels[0]]))
        if len(cands) > 1:
            others = [j for j in range(len(cands)) if j not in it.labels]
            picked = [int(j) for j in rng.choice(others, cfg.hard_negatives, replace=False)]
            ns += [cands[j] for j in picked]
            nids += [candidate_key(*it.candidates[j]) for j in picked]
        else:  # global tasks: near misses (a page that satisfies one condition only) or fresh videos
            for _ in range(cfg.hard_negatives):
                other = near_miss(it, rng)
                ns.append(Input("", to_pil(other), it.target_inst))
                nids.append(candidate_key("", other))
    return qs, ps, ns, ids, nids, answers


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


def train_foundation(out: str | Path, cfg: FoundationConfig = FoundationConfig(), seed: int = 0,
                     resume: bool = True, stop_after: int | None = None, overwrite: bool = False) -> Backbone:
    """Train stage 0 from scratch (tokenizer included) and save the backbone to ``out``.

    The resumable state lives in ``<out>.work``, a run folder with a manifest (config, seed, code): a
    rerun with other settings refuses unless ``overwrite`` (which moves the old state aside)."""
    from .runs import Manifest, RunFolder

    out = Path(out)
    work = out.with_name(out.name + ".work")
    with RunFolder(work, Manifest.make("foundation", cfg, seed), overwrite=overwrite, resume=resume):
        return _train_foundation(out, work, cfg, seed, resume, stop_after)


def _train_foundation(out: Path, work: Path, cfg: FoundationConfig, seed: int, resume: bool,
                      stop_after: int | None) -> Backbone:
    distributed.seed_everything(seed)
    tok_dir = work / "tokenizer"
    if distributed.is_main() and not tok_dir.exists():
        train_tokenizer(world_corpus(seed, cfg.tokenizer_corpus), cfg.spec.vocab_size).save_pretrained(tok_dir)
    distributed.barrier()
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir, padding_side="left")
    backbone = build_tiny(cfg.spec, tokenizer, seed, cfg.video_mode)
    stage = Stage0(backbone)
    adopt_checkpoint(work / "checkpoint.pt", stage)
    res = run_loop(stage, make_step_fn(backbone, cfg, seed), cfg.loop, work, resume=resume,
                   stop_after=stop_after, desc="stage 0")
    backbone.model.set_attn_implementation("sdpa")  # the search phase trains with eager attention
    if res.steps_done < cfg.loop.steps or not distributed.is_main():
        return backbone
    # read before saving: ``backbone.save`` replaces the folder, and with it the record of earlier segments
    previous = json.loads((out / "foundation.json").read_text()) if (out / "foundation.json").exists() else {}
    backbone.save(out)
    (out / "training_log.jsonl").write_text((work / "metrics.jsonl").read_text())
    acc = description_accuracy(backbone, seed=seed + 1000, n=100)
    history = previous.get("history", []) if res.resumed_from else []
    history.append(f"steps {res.resumed_from}-{res.steps_done} under the {cfg.loop.steps}-step schedule "
                   f"({res.wall_s:.0f} s wall, {max(1, distributed.world_size())} process(es))")
    meta = {"world_version": WORLD_VERSION, "fingerprint": world_fingerprint(tokenizer), "seed": seed,
            "config": asdict(cfg), "description_accuracy": acc, "wall_s": res.wall_s, "history": history}
    atomic_write_text(out / "foundation.json", json.dumps(meta, indent=1))
    return backbone


def _optimizer_order(module: torch.nn.Module) -> list[str]:
    """Parameter names in the order ``run_loop`` hands them to AdamW (decayed group, then the rest)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]


def adopt_checkpoint(ckpt: Path, stage: Stage0) -> bool:
    """Carry a stage-0 checkpoint written before a head was added over to the current ``Stage0``.

    Weights and AdamW moments of every existing parameter are kept (remapped by name), the new head
    starts from its initialisation with fresh moments; step and schedule continue. Returns whether the
    checkpoint was rewritten (atomically). Anything but missing *heads* is an error."""
    from .train import atomic_torch_save, load_checkpoint

    if not distributed.is_main() or not ckpt.exists():
        distributed.barrier()
        return False
    state = load_checkpoint(ckpt)
    own = stage.state_dict()
    missing = [k for k in own if k not in state["model"]]
    if not missing:
        distributed.barrier()
        return False
    if not all(k.split(".")[0] in ("head", "pos_head", "frame_head") for k in missing) or \
            any(k not in own for k in state["model"]):
        raise ValueError(f"{ckpt}: not a stage-0 checkpoint of this model (missing {missing[:3]}...)")
    new_order = _optimizer_order(stage)
    old_order = [n for n in new_order if n in state["model"]]
    index = {n: i for i, n in enumerate(new_order)}
    opt = state["optimizer"]
    opt["state"] = {index[old_order[int(i)]]: v for i, v in opt["state"].items()}
    named = dict(stage.named_parameters())
    decay = [n for n in new_order if named[n].ndim >= 2]
    opt["param_groups"][0]["params"] = [index[n] for n in decay]
    opt["param_groups"][1]["params"] = [index[n] for n in new_order if n not in decay]
    merged = {**own, **state["model"]}
    state.update(model=merged, optimizer=opt, n_params=sum(named[n].numel() for n in new_order))
    state.setdefault("adopted", []).append({"step": state["step"], "new": missing})
    atomic_torch_save(state, ckpt)
    log.info("%s: carried over to the current stage-0 heads at step %d (new: %s)", ckpt, state["step"], missing)
    distributed.barrier()
    return True


def load_foundation(path: str | Path, **kw) -> tuple[Backbone, dict]:
    """Load a foundation checkpoint and check it matches the current world and tokenizer (``kw``: dtype,
    device... as in ``load_backbone``)."""
    backbone = load_backbone(path, expect_arch=None, **kw)
    meta = json.loads((Path(path) / "foundation.json").read_text())
    if meta["fingerprint"] != world_fingerprint(backbone.tokenizer):
        log.warning("%s was trained on another version of the toy world: rerun `make foundation`", path)
    return backbone, meta


# ---------------------------------------------------------------------------------------------
# does it see? greedy descriptions of held-out scenes, frames and pages, scored cell by cell


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
    from .world.skills import SKILLS

    rng = np.random.default_rng([seed, 7])
    skills = [SKILLS[name][0](rng) for name in ATOMIC_SKILLS for _ in range(n)]
    answers = generate(backbone, [Input(s.question, to_pil(s.visual)) for s in skills], max_new_tokens=24)
    hits: dict[str, list[float]] = {}
    for s, a in zip(skills, answers):
        hits.setdefault(s.kind, []).append(float(a.strip() == s.answer.strip()))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}
