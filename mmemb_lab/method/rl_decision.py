"""Training the decision alone: the greedy rationale credited to an opening, the untied ``<think>`` output row
that is the only trained weight, and the exploration on the first token.

Used by: ``rl`` (``RLConfig.train = "decision"``, ``rationale = "greedy"``, ``decision_exploration``).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..model.backbone import THINK_CLOSE, THINK_OPEN, Backbone
from .rewards import PairTargets

log = logging.getLogger(__name__)


class GreedyRationales:
    """The rationale the model writes greedily after ``<think>`` for each training query, generated once, at
    construction, in batches, by ``inference.generate_rationales`` (its own greedy loop: the exploration that
    ``train_rl`` adds to the model's ``generate`` for rollouts never reaches it). With ``train="decision"``
    the writer does not change during RL (``inference.generate_rationales`` cannot draw the one row that
    trains, ``<think>``, inside a span), so the cache stays exact.

    :meth:`expand` turns a decision-only completion into the full one inference would produce:
    ``[<think>]`` -> ``[<think>, r..., </think>]`` (no ``</think>`` if the budget ran out), ``[<|emb|>]``
    unchanged; so the stage-2 reward functions score it exactly as a sampled completion."""

    def __init__(self, backbone: Backbone, pairs: Sequence[PairTargets], max_new_tokens: int, batch_size: int = 32):
        from ..model.inference import generate_rationales

        self.think, close = backbone.token_id(THINK_OPEN), backbone.token_id(THINK_CLOSE)
        keys = list(dict.fromkeys(p.key for p in pairs))
        query = {p.key: p.query for p in pairs}
        g = generate_rationales(backbone, [query[k] for k in keys], max_new_tokens, batch_size)
        self.span = {k: list(ids) + ([close] if c else []) for k, ids, c in zip(keys, g.ids, g.closed)}

    def expand(self, keys: Sequence[str], completion_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        out = []
        for k, ids in zip(keys, completion_ids):
            ids = [int(i) for i in ids]
            out.append([self.think, *self.span[k]] if ids[:1] == [self.think] else ids)
        return out


class WithGreedyRationale:
    """A trl reward function applied to :meth:`GreedyRationales.expand`-ed completions (same name for trl's log)."""

    def __init__(self, reward_func, writer: GreedyRationales):
        from trl.trainer.utils import get_callable_name

        self.reward_func, self.writer = reward_func, writer
        self.__name__ = get_callable_name(reward_func)

    def __call__(self, prompts=None, completions=None, completion_ids=None, item_id=None, **kw) -> list[float]:
        full = self.writer.expand(list(item_id), completion_ids)
        return self.reward_func(prompts=prompts, completions=completions, completion_ids=full, item_id=item_id, **kw)


def untie_output_embedding(model: torch.nn.Module) -> bool:
    """Give the output layer its own copy of a tied input embedding (and record it in the config, so the
    checkpoint saves and reloads both). Returns whether it was tied."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out.weight is not inp.weight:
        return False
    out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    for c in (model.config, model.config.get_text_config()):  # the same object for a text-only model
        c.tie_word_embeddings = False
    return True


def _decision_only(model: torch.nn.Module, think: int):
    """Freeze every weight but the ``<think>`` row of the output embedding; returns a function that undoes it.

    The tiny models tie input and output embeddings: training the tied row would also move the INPUT
    embedding of ``<think>``, which every rationale is written after (it wrecked the always mode:
    docs/research-log.md, Stage 2: untie the output row). So the output layer is untied
    first and only its row trains: the gate moves, the rationale writer and the embedder do not."""
    untie_output_embedding(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    w = model.get_output_embeddings().weight
    w.requires_grad_(True)
    mask = torch.zeros_like(w)
    mask[think] = 1.0
    handle = w.register_hook(lambda g: g * mask.to(g.device, g.dtype))  # trl may move the model to a GPU

    def restore() -> None:
        handle.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])

    return restore


class DecisionExploration:
    """Logits processor: at the first generated position, mix the two decisions' probabilities with a
    uniform choice (``eps``); every other token is untouched. Deviation: the policy-gradient loss still uses
    the policy's own log-probability of the sampled decision, so the decision's gradient is slightly
    off-policy (towards exploring the rarer choice), the usual price of epsilon-greedy exploration."""

    def __init__(self, think: int, emb: int, eps: float):
        if not 0 < eps <= 1:
            raise ValueError("decision_exploration must be in (0, 1]")
        self.think, self.emb, self.eps, self.start = think, emb, eps, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        if input_ids.shape[1] != self.start:
            return scores
        two = torch.log_softmax(scores[:, [self.think, self.emb]].float(), dim=-1).exp()
        mixed = (1 - self.eps) * two + self.eps / 2
        out = torch.full_like(scores, float("-inf"))
        out[:, self.think], out[:, self.emb] = mixed[:, 0].log().to(scores.dtype), mixed[:, 1].log().to(scores.dtype)
        return out


def _with_processor(generate, processor: DecisionExploration):
    """``generate`` with ``processor`` added (reset per call: its first position is the call's)."""
    from transformers import LogitsProcessorList

    def wrapped(*args, **kwargs):
        processor.start = None
        extra = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        extra.append(processor)
        return generate(*args, logits_processor=extra, **kwargs)

    return wrapped
