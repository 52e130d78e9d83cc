"""Stage-2 rewards: reason only where reasoning pays for itself (docs/method.md, step 4).

Concept
    In stage 2 the policy decides, per input, how to start its assistant turn: open a reasoning span
    (``<think> r </think><|emb|>``) or embed at once (``<|emb|>``). Each sampled completion earns

        R = utility + cost + format

    - **utility** (:func:`utility_reward`): the reasoning utility gap

          delta = s(q + r, t+) - s(q, t+),    s = p(t+ | q) under InfoNCE against the pair's negatives

      (the exponential of ``contrastive.log_prob_positive``, the pair-aware confidence of posterior
      selection; ``RewardConfig.confidence="log_prob"`` uses the log-probability itself). Both
      terms are computed with the *current* policy's embeddings (:class:`UtilityGapReward` holds the
      backbone that is being trained; embeddings are taken without gradients). A direct completion is
      the baseline of the gap: its utility is 0 by definition.
    - **cost** (:func:`cost_reward`, <= 0): a price per token generated beyond the direct path (the
      direct path writes one token, ``<|emb|>``) and optionally per invocation. Reasoning must beat
      its price: R > 0 only where delta > cost.
    - **format** (:func:`format_reward`, <= 0): a completion that opens ``<think>`` must close it with
      ``</think>`` (optionally followed by exactly ``<|emb|>``: rollouts stop at ``</think>``, as inference
      does); a direct completion is exactly ``<|emb|>``. Anything else (never-closed span, nested span,
      text before the decision, text after ``</think>``) pays a penalty.

    So: direct -> 0; reasoning that helps -> delta - cost (> 0 when it helps enough); reasoning that
    hurts -> delta - cost < 0; an empty span -> -cost (no content, no credit); a span that never
    closes -> -cost - penalty.

    Each term is a small pure function over a :class:`ParsedCompletion` (unit-tested case by case in
    tests/test_rewards.py); :class:`UtilityGapReward`, :class:`CostReward` and :class:`FormatReward`
    wrap them in trl's reward-function signature ``f(prompts, completions, completion_ids, **columns)``
    so that trl logs each term separately (``rewards/<name>/mean``).

Where our reward departs from the paper's outline (only the outline is public)
    - The exact reward is not public. Ours: utility + cost + format, summed with weight 1 each;
      ``RewardConfig`` holds the constants (our defaults, not the paper's numbers).
    - s is the InfoNCE probability of t+ against *the pair's own* negatives (``contrastive.TEMPERATURE``); the paper
      only says "pair-aware". Why the probability and not its log (which selection uses to rank the
      candidates of one pair): the reward compares reasoning with not reasoning *across* pairs, and the
      log-gap is unbounded below: a few confidently wrong rationales outweigh the many that help, and a
      log-scale reward taught the gate never to open (docs/research-log.md, Stage 2: probability-scale
      utility). The probability gap is bounded in [-1, 1] and prices a token on the same scale.
    - The baseline of the gap is the policy's own direct embedding of the same query (removal
      intervention, do(r = nothing)), recomputed at every reward call, so the reward is non-stationary:
      as training improves the direct path, reasoning has to earn more.
    - An empty span earns no utility even if ``<think></think>`` happens to move the embedding the
      right way: that would pay for the *format* of reasoning, the shortcut this method exists to remove.
    - A never-closed span earns no utility (there is no embedding after it); at inference the span is
      closed for the model, but in training it is a format failure.
    - The rationale is decoded to text and re-embedded through the same prompt builder as inference
      (``inference.generate_rationales`` / ``embed.prompt_text``), so s(q + r) is exactly what the
      adaptive encoder will compute, not a continuation of the sampled token ids.

Where it departs from textbook GRPO (DeepSeekMath)
    - Textbook GRPO uses a verifiable, fixed reward; ours is computed by the policy network itself
      (an embedding-based, moving reward), as in embedding RL methods like UME-R1.
    - Several reward terms are summed before the group normalisation (trl's "sum_then_normalize").
      The rest of the loss (group-normalised advantages, clipping, KL) is trl's: see ``mmemb_lab.method.rl``.

Used by: ``mmemb_lab.method.rl`` (stage 2), notebook 05.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..model.backbone import EMB_TOKEN, THINK_CLOSE, THINK_OPEN, Backbone
from ..model.embed import Input, embed
from ..train.contrastive import TEMPERATURE, log_prob_positive

DIRECT, REASON, EMPTY, UNCLOSED, MALFORMED = "direct", "reason", "empty", "unclosed", "malformed"
CONFIDENCES = ("prob", "log_prob")


@dataclass(frozen=True)
class RewardConfig:
    """Constants of the stage-2 reward (all ours: the paper's values are not public)."""

    temperature: float = TEMPERATURE
    """InfoNCE temperature of the pair-aware confidence s (same as selection and stage 1)."""
    confidence: str = "prob"
    """The scale of s: "prob" (p(t+ | q) against the pair's negatives, in [0, 1]) or "log_prob" (its log)."""
    cost_per_token: float = 0.002
    """Price, in units of s, of each token generated beyond the direct path (on the "prob" scale a 32-token
    span must raise p(t+) by 0.066 to pay for itself). On the validation split 0.002 beat 0.001 and 0.004
    (docs/research-log.md, Settings checked on validation)."""
    cost_per_invocation: float = 0.0
    """Fixed price of opening a span at all (added to the per-token price)."""
    format_penalty: float = 1.0
    """Penalty for a malformed completion (never-closed or nested span, stray text)."""

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"unknown confidence {self.confidence!r}: one of {CONFIDENCES}")
        if min(self.cost_per_token, self.cost_per_invocation, self.format_penalty) < 0:
            raise ValueError("costs and the format penalty are magnitudes: they must be >= 0")


@dataclass(frozen=True)
class SpanTokens:
    """Ids of the three tokens that structure a completion."""

    think: int
    close: int
    emb: int

    @classmethod
    def of(cls, tokenizer) -> "SpanTokens":
        ids = [tokenizer.convert_tokens_to_ids(t) for t in (THINK_OPEN, THINK_CLOSE, EMB_TOKEN)]
        return cls(*ids)


@dataclass(frozen=True)
class ParsedCompletion:
    """What a sampled completion did, from its token ids alone."""

    kind: str
    """"direct" (exactly <|emb|>), "reason" (<think> r </think><|emb|> with r non-empty), "empty"
    (<think></think><|emb|>), "unclosed" (<think> ... never followed by </think>) or "malformed"."""
    rationale_ids: tuple[int, ...]
    """Tokens strictly inside the span (for "unclosed": everything after <think>, minus a final <|emb|>)."""
    extra_tokens: int
    """Tokens generated beyond the direct path's single <|emb|> (0 for a direct completion)."""
    invoked: bool
    """Whether the first token opened a reasoning span (the gate's decision)."""

    @property
    def well_formed(self) -> bool:
        return self.kind in (DIRECT, REASON, EMPTY)


def parse_completion(ids: Sequence[int], tokens: SpanTokens) -> ParsedCompletion:
    """Classify a completion (the sampled ids after the prompt, up to and including <|emb|> if any).

    A span may end at ``</think>`` itself: stage-2 rollouts stop there, as inference does
    (``inference.generate_rationales``), and ``<|emb|>`` is appended when the rationale is embedded."""
    ids = [int(i) for i in ids]
    invoked = bool(ids) and ids[0] == tokens.think
    ends_emb = bool(ids) and ids[-1] == tokens.emb
    extra = len(ids) - int(ends_emb)
    if ids == [tokens.emb]:
        return ParsedCompletion(DIRECT, (), 0, False)
    if not invoked:
        return ParsedCompletion(MALFORMED, (), extra, False)
    body = ids[1:]
    if tokens.close not in body:
        inner = body[:-1] if ends_emb else body
        return ParsedCompletion(UNCLOSED, tuple(inner), extra, True)
    c = body.index(tokens.close)
    inner, tail = body[:c], body[c + 1:]
    if tokens.think in inner or tokens.emb in inner or tail not in ([], [tokens.emb]):
        return ParsedCompletion(MALFORMED, tuple(inner), extra, True)
    return ParsedCompletion(REASON if inner else EMPTY, tuple(inner), extra, True)


def utility_gap(s_reasoned: float, s_direct: float) -> float:
    """delta = s(q + r, t+) - s(q, t+): how much the rationale raised the pair's match confidence."""
    return float(s_reasoned - s_direct)


def utility_reward(parsed: ParsedCompletion, s_direct: float, s_reasoned: float | None) -> float:
    """The gap for a completed, non-empty span; 0 otherwise (direct is the baseline; empty, unclosed and
    malformed spans have no rationale to credit)."""
    if parsed.kind != REASON or s_reasoned is None:
        return 0.0
    return utility_gap(s_reasoned, s_direct)


def cost_reward(parsed: ParsedCompletion, cost_per_token: float, cost_per_invocation: float = 0.0) -> float:
    """-(cost_per_token * extra tokens + cost_per_invocation * [span opened]); 0 for a direct completion."""
    return -(cost_per_token * parsed.extra_tokens + cost_per_invocation * float(parsed.invoked))


def format_reward(parsed: ParsedCompletion, penalty: float) -> float:
    """0 for a well-formed completion (direct, reasoning, empty span), -penalty otherwise."""
    return 0.0 if parsed.well_formed else -float(penalty)


def total_reward(parsed: ParsedCompletion, s_direct: float, s_reasoned: float | None, cfg: RewardConfig) -> float:
    """utility + cost + format: the scalar GRPO normalises within each group."""
    return (utility_reward(parsed, s_direct, s_reasoned)
            + cost_reward(parsed, cfg.cost_per_token, cfg.cost_per_invocation)
            + format_reward(parsed, cfg.format_penalty))


def rationale_text(tokenizer, ids: Sequence[int]) -> str:
    """The span's text as inference would re-embed it (``inference.generate_rationales`` decodes alike)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


@dataclass(frozen=True)
class PairTargets:
    """What the utility reward needs for one training query: the query, its positive and its negatives."""

    key: str
    """Identifier carried by the RL dataset's ``item_id`` column."""
    query: Input
    positive: Input
    negatives: tuple[Input, ...]
    needs_reasoning: bool | None = None
    """The toy world's label (None for real data); for analysis only."""
    dataset: str = ""


Encoder = Callable[[list[Input]], torch.Tensor]


class UtilityGapReward:
    """trl reward function: the utility gap delta of each completion, under the current policy.

    Holds the backbone being trained (the same module object trl optimises, so its embeddings are
    always the current policy's). Per call: the direct query, its positive and negatives are embedded
    once per distinct ``item_id`` and each well-formed rationale once; then
    s = ``log_prob_positive`` (or its exponential, ``confidence="prob"``) for the direct and the reasoned
    query. ``encoder`` (default: the
    backbone's direct embedder under ``no_grad``) can be replaced, e.g. by a stub in tests.
    Also keeps ``last_s_direct`` / ``last_s_reasoned`` (per completion, nan where not computed).
    """

    __name__ = "utility_gap"

    def __init__(self, backbone: Backbone, pairs: Mapping[str, PairTargets] | Sequence[PairTargets],
                 temperature: float = TEMPERATURE, batch_size: int = 32, encoder: Encoder | None = None,
                 confidence: str = "prob", frozen_embedder: bool = False):
        if confidence not in CONFIDENCES:
            raise ValueError(f"unknown confidence {confidence!r}: one of {CONFIDENCES}")
        self.backbone = backbone
        self.pairs = dict(pairs) if isinstance(pairs, Mapping) else {p.key: p for p in pairs}
        self.temperature = temperature
        self.confidence = confidence
        self.frozen_embedder = frozen_embedder
        self._direct: dict[str, float] = {}
        self._reasoned: dict[tuple[str, str], float | None] = {}
        self.tokens = SpanTokens.of(backbone.tokenizer)
        self.encoder = encoder or (lambda xs: embed(backbone, xs, batch_size=batch_size))
        self.last_s_direct: list[float] = []
        self.last_s_reasoned: list[float] = []

    @torch.no_grad()
    def scores(self, keys: Sequence[str], rationales: Sequence[str | None]) -> tuple[list[float], list[float | None]]:
        """(s(q, t+), s(q + r, t+)) per row; s(q + r) is None where the rationale is None.

        With ``frozen_embedder`` each query's s(q, t+) and each (query, rationale)'s s(q + r, t+) is computed
        once and remembered (exact only while the embedding weights do not change: ``rl`` sets it for
        decision-only training, where they cannot)."""
        if not self.frozen_embedder:
            return self._scores(keys, rationales)
        rows = [(k, None) for k in dict.fromkeys(keys) if k not in self._direct]
        rows += [kr for kr in dict.fromkeys(zip(keys, rationales)) if kr[1] is not None and kr not in self._reasoned]
        if rows:
            d, r = self._scores([k for k, _ in rows], [x for _, x in rows])
            for (k, x), dv, rv in zip(rows, d, r):
                self._direct[k] = dv
                if x is not None:
                    self._reasoned[(k, x)] = rv
        return [self._direct[k] for k in keys], [None if x is None else self._reasoned[(k, x)]
                                                  for k, x in zip(keys, rationales)]

    def _scores(self, keys: Sequence[str], rationales: Sequence[str | None]) -> tuple[list[float], list[float | None]]:
        uniq = list(dict.fromkeys(keys))
        pairs = [self.pairs[k] for k in uniq]
        targets: list[Input] = []
        for p in pairs:
            targets += [p.positive, *p.negatives]
        queries = [p.query for p in pairs]
        # each distinct (query, rationale) once: a group often repeats a rationale (always, with greedy ones)
        reasoned = list(dict.fromkeys((k, r) for k, r in zip(keys, rationales) if r is not None))
        queries += [_with_rationale(self.pairs[k].query, r) for k, r in reasoned]
        e_t = self.encoder(targets)
        e_q = self.encoder(queries)
        pos, negs, off = {}, {}, 0
        for k, p in zip(uniq, pairs):
            pos[k] = e_t[off]
            negs[k] = e_t[off + 1:off + 1 + len(p.negatives)]
            off += 1 + len(p.negatives)

        def s(q: torch.Tensor, k: str) -> float:
            lp = log_prob_positive(q[None], pos[k][None], negs[k][None], self.temperature)[0]
            return float(lp.exp() if self.confidence == "prob" else lp)

        direct = {k: s(e_q[j], k) for j, k in enumerate(uniq)}
        with_r = {kr: s(e_q[len(uniq) + j], kr[0]) for j, kr in enumerate(reasoned)}
        return [direct[k] for k in keys], [None if r is None else with_r[(k, r)] for k, r in zip(keys, rationales)]

    def __call__(self, prompts=None, completions=None, completion_ids=None, item_id=None, **kw) -> list[float]:
        parsed = [parse_completion(ids, self.tokens) for ids in completion_ids]
        texts = [rationale_text(self.backbone.tokenizer, p.rationale_ids) if p.kind == REASON else None
                 for p in parsed]
        texts = [t if t else None for t in texts]  # a span that decodes to whitespace has no content either
        s_direct, s_reasoned = self.scores(list(item_id), texts)
        out = [utility_reward(p, d, r) for p, d, r in zip(parsed, s_direct, s_reasoned)]
        self.last_s_direct = s_direct
        self.last_s_reasoned = [float("nan") if r is None else r for r in s_reasoned]
        log_metric = kw.get("log_metric")
        if log_metric is not None:
            log_metric("sampled_invocation_rate", sum(p.invoked for p in parsed) / max(1, len(parsed)))
            gaps = [o for o, p, t in zip(out, parsed, texts) if p.kind == REASON and t is not None]
            if gaps:
                log_metric("utility_gap_of_spans", sum(gaps) / len(gaps))
        return out


def _with_rationale(q: Input, rationale: str) -> Input:
    return Input(q.text, q.visual, q.instruction, rationale, q.name)


class CostReward:
    """trl reward function: :func:`cost_reward` of each completion."""

    __name__ = "reasoning_cost"

    def __init__(self, tokens: SpanTokens, cost_per_token: float, cost_per_invocation: float = 0.0):
        self.tokens, self.per_token, self.per_invocation = tokens, cost_per_token, cost_per_invocation

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kw) -> list[float]:
        return [cost_reward(parse_completion(ids, self.tokens), self.per_token, self.per_invocation)
                for ids in completion_ids]


class FormatReward:
    """trl reward function: :func:`format_reward` of each completion."""

    __name__ = "format"

    def __init__(self, tokens: SpanTokens, penalty: float):
        self.tokens, self.penalty = tokens, penalty

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kw) -> list[float]:
        return [format_reward(parse_completion(ids, self.tokens), self.penalty) for ids in completion_ids]


def reward_functions(backbone: Backbone, pairs: Mapping[str, PairTargets] | Sequence[PairTargets],
                     cfg: RewardConfig = RewardConfig(), batch_size: int = 32, frozen_embedder: bool = False) -> list:
    """The three stage-2 reward functions in trl's signature: utility gap, cost, format (summed by trl).
    ``frozen_embedder``: the embeddings cannot change during training, so the utility's scores are cached."""
    tokens = SpanTokens.of(backbone.tokenizer)
    return [UtilityGapReward(backbone, pairs, cfg.temperature, batch_size, confidence=cfg.confidence,
                             frozen_embedder=frozen_embedder),
            CostReward(tokens, cfg.cost_per_token, cfg.cost_per_invocation),
            FormatReward(tokens, cfg.format_penalty)]
