"""Query modes: how a query becomes an embedding - directly, always after a rationale, or where the gate opens.

Concept (docs/method.md, steps 3 and 5)
    A *mode* decides, per query, whether the model first writes a rationale r in a reasoning span and then
    embeds at ``<|emb|>`` after it, or embeds at once (r = none):

    - ``direct``: embed right after the prompt; nothing is generated.
    - ``always``: open ``<think>``, write a rationale greedily, re-embed after it
      (``inference.ReasoningEncoder``).
    - ``adaptive``: one prefill gives the direct embedding and the gate's p_open; only where
      ``p_open > threshold`` is a rationale written (from that same prefill) and the query re-embedded
      (``gating.AdaptiveEncoder``).
    - ``oracle``: per query, the better of direct and always. It needs the answers, so it is no encoder:
      it is combined from the two modes' scored runs (``harness.run_oracle``, ``scoring.oracle_picks``)
      and is an upper bound for any gate, not a method.

    Every encoding mode is a :data:`QueryEncoder`: a callable from a batch of inputs to (n, dim) unit-norm
    embeddings, or to :class:`Encoded` when it also reports, per input, what it generated (tokens, the
    rationale text, whether it reasoned). :func:`encoder_for` builds any of them from one
    :class:`InferenceConfig`, the settings every mode reads (each default is written there, once).

    Prompt conventions (a setting of the direct mode, since they move scores by points; docs/method.md,
    MMEB-V2): ``"user"`` - the workbench's own template, instruction in the user turn (what ``embed``
    trains with, and the only one the reasoning modes write their span in); ``"chat"`` -
    Qwen3-VL-Embedding style, instruction in the system turn; ``"raw"`` - VLM2Vec style, vision tokens
    then instruction and text with no chat roles. All end with ``<|emb|>``.

Used by: ``harness`` (``mmemb-lab benchmark --mode``, ``harness.evaluate``), ``embedder.Embedder``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..model.backbone import EMB_TOKEN, Backbone, reasoning_span
from ..model.embed import Input, collate, embed, hidden_states, pool, prompt_text
from ..model.gating import AdaptiveEncoder
from ..model.inference import LATENCY_SAMPLE, MAX_NEW_TOKENS, THRESHOLD, ReasoningEncoder

__all__ = ["MODES", "ENCODER_MODES", "PROMPTS", "InferenceConfig", "Encoded", "QueryEncoder", "as_encoded",
           "GeneratingEncoder", "direct_encoder", "encoder_for", "settings_for", "latency_ms", "render_prompt",
           "collate_prompted", "embed_prompted"]

ENCODER_MODES = ("direct", "always", "adaptive")
"""Modes that embed queries themselves (:func:`encoder_for`)."""
MODES = ENCODER_MODES + ("oracle",)
"""Every mode of ``mmemb-lab benchmark --mode``; ``oracle`` is combined from direct and always."""
PROMPTS = ("user", "chat", "raw")


@dataclass(frozen=True)
class InferenceConfig:
    """What the query modes read at inference; ``mmemb-lab benchmark`` and ``Embedder`` build theirs from it."""

    threshold: float = THRESHOLD
    """The adaptive gate reasons where p_open > threshold (``inference.THRESHOLD``)."""
    max_new_tokens: int = MAX_NEW_TOKENS
    """Budget of one rationale (``inference.MAX_NEW_TOKENS``)."""
    batch_size: int = 32
    """Inputs per forward pass; embeddings do not depend on it (tests/test_backbone.py), only speed and memory."""
    latency_sample: int = LATENCY_SAMPLE
    """Queries per dataset timed one at a time (``inference.LATENCY_SAMPLE``)."""

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.latency_sample < 0:
            raise ValueError(f"invalid inference config: {self}")


@dataclass(frozen=True)
class Encoded:
    """What a query encoder may return instead of a bare tensor: the embeddings and, per input, what was
    generated before them (every field but ``embeddings`` is None when the encoder does not say)."""

    embeddings: torch.Tensor
    """(n, dim) unit-norm embeddings."""
    generated_tokens: Sequence[int] | None = None
    """Tokens generated before embedding, per input (``</think>`` included where the span closed)."""
    rationales: Sequence[str] | None = None
    """The rationale embedded after, per input; ``""`` where none was written."""
    reasoned: Sequence[bool] | None = None
    """Whether the input went through reasoning (always: every one; adaptive: where the gate opened)."""


QueryEncoder = Callable[[Sequence[Input]], "torch.Tensor | Encoded"]


def as_encoded(out: "torch.Tensor | Encoded") -> Encoded:
    """Any query encoder's output as :class:`Encoded` (a bare tensor reports nothing else)."""
    return out if isinstance(out, Encoded) else Encoded(out)


# ---------------------------------------------------------------------------------------------
# prompt conventions (the direct mode)


def _vision(n_tokens: Sequence[int]) -> str:
    # The vision blocks exactly as embed.prompt_text writes them (one source of truth for their format).
    head = prompt_text(Input(), n_tokens, assistant="")
    return head[len("<|im_start|>user\n"):head.index("<|im_end|>")]


def render_prompt(prompt: str, inp: Input, n_tokens: Sequence[int]) -> str:
    """The text of one input under a prompt convention (``n_tokens[i]``: image-pad tokens of image i)."""
    if prompt == "user":
        return prompt_text(inp, n_tokens)
    span = "" if inp.rationale is None else reasoning_span(inp.rationale)
    if prompt == "chat":
        system = f"<|im_start|>system\n{inp.instruction}<|im_end|>\n" if inp.instruction else ""
        return (f"{system}<|im_start|>user\n{_vision(n_tokens)}{inp.text}<|im_end|>\n<|im_start|>assistant\n"
                f"{span}{EMB_TOKEN}")
    if prompt == "raw":
        body = "\n".join(x for x in (inp.instruction, inp.text) if x)
        return f"{_vision(n_tokens)}{body}{span}{EMB_TOKEN}"
    raise ValueError(f"unknown prompt convention {prompt!r}; known: {PROMPTS}")


def collate_prompted(backbone: Backbone, inputs: Sequence[Input], prompt: str = "user") -> dict:
    """``embed.collate`` (same pixels), with the text rebuilt under another prompt convention."""
    batch = collate(backbone, inputs)
    if prompt == "user":
        return batch
    per_image = ((batch["image_grid_thw"].prod(-1) // backbone.merge ** 2).tolist()
                 if "image_grid_thw" in batch else [])
    texts, k = [], 0
    for inp in inputs:
        n = len(inp.images())
        if n > 1 and backbone.video_mode == "storyboard":
            n = 1  # collate tiled the frames into one image
        texts.append(render_prompt(prompt, inp, per_image[k:k + n]))
        k += n
    enc = backbone.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    device = batch["input_ids"].device
    batch["input_ids"], batch["attention_mask"] = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    batch["mm_token_type_ids"] = (batch["input_ids"] == backbone.token_id("<|image_pad|>")).int()
    return batch


@torch.no_grad()
def embed_prompted(backbone: Backbone, inputs: Sequence[Input], prompt: str = "user",
                   batch_size: int = InferenceConfig.batch_size) -> torch.Tensor:
    """Direct embeddings under a prompt convention, batched in input order; (n, hidden), unit norm, on the CPU.

    ``"user"`` computes what ``embed.embed`` does; batches follow the model onto its device."""
    was = backbone.model.training
    backbone.model.eval()
    device = backbone.device
    out = []
    for s in range(0, len(inputs), batch_size):
        batch = {k: v.to(device) for k, v in collate_prompted(backbone, inputs[s:s + batch_size], prompt).items()}
        out.append(pool(hidden_states(backbone, batch)).cpu())
    backbone.model.train(was)
    return torch.cat(out) if out else torch.zeros(0, backbone.model.config.text_config.hidden_size)


# ---------------------------------------------------------------------------------------------
# the modes


def direct_encoder(backbone: Backbone, prompt: str = "user",
                   batch_size: int = InferenceConfig.batch_size) -> QueryEncoder:
    """The ``direct`` mode: embed without reasoning (candidates are always embedded this way).

    Under ``"user"`` it is ``embed.embed`` (inputs of similar length batched together, little padding);
    the other conventions go through :func:`embed_prompted`."""
    if prompt not in PROMPTS:
        raise ValueError(f"unknown prompt convention {prompt!r}; known: {PROMPTS}")
    if prompt == "user":
        return lambda inputs: embed(backbone, list(inputs), batch_size=batch_size)
    return lambda inputs: embed_prompted(backbone, list(inputs), prompt, batch_size)


@dataclass
class GeneratingEncoder:
    """``always`` or ``adaptive`` as a :data:`QueryEncoder` that returns :class:`Encoded`.

    Wraps ``inference.ReasoningEncoder`` or ``gating.AdaptiveEncoder`` (``inner``, which keeps its own
    running records: ``p_open``, ``unclosed``, per-query latency...) and hands back, per call and per
    input, the tokens generated, the rationale (``""`` where none) and whether the input reasoned."""

    inner: ReasoningEncoder | AdaptiveEncoder

    @property
    def mode(self) -> str:
        return "adaptive" if isinstance(self.inner, AdaptiveEncoder) else "always"

    def __call__(self, inputs: Sequence[Input]) -> Encoded:
        inputs = list(inputs)
        start = len(self.inner.generated_tokens)  # the inner records grow by one entry per input and call
        emb = self.inner(inputs)
        if isinstance(self.inner, AdaptiveEncoder):
            reasoned = [bool(x) for x in self.inner.invoked[start:]]
        else:
            reasoned = [True] * len(inputs)
        return Encoded(emb, list(self.inner.generated_tokens[start:]),
                       [r or "" for r in self.inner.last_rationales], reasoned)


def encoder_for(backbone: Backbone, mode: str, cfg: InferenceConfig = InferenceConfig(),
                prompt: str = "user") -> QueryEncoder:
    """The query encoder of ``mode`` (one of :data:`ENCODER_MODES`) under the settings of ``cfg``.

    ``direct`` returns tensors; ``always`` and ``adaptive`` return :class:`Encoded` (a
    :class:`GeneratingEncoder`). The reasoning modes write their span after the ``"user"`` prompt (the
    template the model was trained to reason in); other conventions are refused for them."""
    if mode == "direct":
        return direct_encoder(backbone, prompt, cfg.batch_size)
    if mode == "oracle":
        raise ValueError("the oracle mode is no encoder (it needs the answers): it is combined from the direct "
                         "and always runs (harness.run_oracle)")
    if mode not in ENCODER_MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
    if prompt != "user":
        raise ValueError(f"mode {mode!r} writes its rationale after the 'user' prompt only, not {prompt!r}")
    if mode == "always":
        return GeneratingEncoder(ReasoningEncoder(backbone, cfg.max_new_tokens, cfg.batch_size))
    return GeneratingEncoder(AdaptiveEncoder(backbone, cfg.threshold, cfg.max_new_tokens, cfg.batch_size))


_READS = {"direct": (), "always": ("max_new_tokens",), "adaptive": ("threshold", "max_new_tokens"),
          "oracle": ("max_new_tokens",)}


def settings_for(mode: str, cfg: InferenceConfig) -> dict:
    """The settings of ``cfg`` that change ``mode``'s embeddings: part of a run's identity (a rerun with
    another threshold refuses), while the batch size and the latency sample are not."""
    if mode not in _READS:
        raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
    return {k: getattr(cfg, k) for k in _READS[mode]}


def latency_ms(encode: QueryEncoder, inputs: Sequence[Input], n: int | None = None) -> float:
    """Mean wall time (ms) to encode one query alone (batch size 1), over the first ``n`` of ``inputs``
    (all when None), after one warm-up call: what a user waiting for one answer sees. NaN for no input."""
    sample = list(inputs if n is None else inputs[:n])
    if not sample:
        return float("nan")
    encode(sample[:1])  # warm-up
    t = time.perf_counter()
    for x in sample:
        encode([x])
    return 1000 * (time.perf_counter() - t) / len(sample)
