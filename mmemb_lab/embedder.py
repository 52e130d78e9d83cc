"""The embedder as a user holds it: load a checkpoint, embed inputs, reason only where the gate says it pays.

Concept (docs/method.md, step 5)
    ``Embedder.from_pretrained(path or Hub id).encode(inputs, reasoning=...)`` is MMEmb-R1 at inference:
    every input gets one unit-norm embedding, read at ``<|emb|>``, and per input the answer to "did the
    model reason first, and what did it write?". ``reasoning`` picks the query mode (``mmemb_lab.eval.modes``):

    - ``"never"``: the direct mode (no rationale);
    - ``"always"``: write a rationale in the reasoning span, then embed after it;
    - ``"auto"``: the adaptive mode - one prefill gives the direct embedding and the gate's p_open, and
      only inputs with p_open > ``threshold`` write a rationale and are re-embedded.

    Inputs are dicts as Qwen3-VL-Embedding's ``process`` takes them: ``text``, ``image`` (a path or a PIL
    image), ``video`` (a list of frame paths or PIL images) and ``instruction``; a candidate (the document
    side) is an input like any other, usually embedded with ``reasoning="never"``.

Deviations from Qwen3-VL-Embedding's ``process``:

- A video is a list of frames, fed as the backbone's ``video_mode`` says; a video file or URL is refused
  (no video decoding: torchvision is unavailable on CPU). Image URLs are not fetched (offline).
- The prompt is the workbench's ``"user"`` convention (instruction in the user turn), the one its models
  are trained and reason in, not Qwen3-VL-Embedding's system-turn instruction; and there is no default
  instruction ("Represent the user's input." there): an input without one gets ``encode``'s
  ``instruction``, or none.
- The output also says, per input, whether it reasoned and the rationale it embedded after.

Used by: users of a trained checkpoint; tests/test_embedder.py holds it equal to the harness's modes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from PIL import Image

from .data import DataError, open_image
from .eval.modes import InferenceConfig, as_encoded, encoder_for
from .model.backbone import Backbone, load_backbone
from .model.embed import Input, InputError

__all__ = ["REASONING", "KEYS", "Embeddings", "Embedder"]

REASONING = {"never": "direct", "always": "always", "auto": "adaptive"}
"""``encode``'s ``reasoning`` choices and the query mode each runs."""
KEYS = ("text", "image", "video", "instruction")
"""The keys an input dict may have."""


@dataclass(frozen=True)
class Embeddings:
    """What ``Embedder.encode`` returns for n inputs, in input order."""

    embeddings: torch.Tensor
    """(n, dim) unit-norm embeddings, on the CPU."""
    reasoned: tuple[bool, ...]
    """Per input: whether it wrote a rationale before being embedded."""
    rationales: tuple[str, ...]
    """Per input: the rationale it was embedded after (``""`` where it did not reason)."""
    generated_tokens: tuple[int, ...]
    """Per input: tokens generated (0 where it did not reason; ``</think>`` counts where the span closed)."""

    def __len__(self) -> int:
        return len(self.reasoned)


def _visual(value, i: int, what: str) -> Image.Image:
    """One image of input ``i``: a PIL image as it is, a path opened; anything else refused, naming the input."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        if str(value).startswith(("http://", "https://")):
            raise InputError(f"input {i}: {what} {value} is a URL; images are not fetched, pass a path or an image")
        try:
            return open_image(Path(value), f"input {i}")
        except DataError as e:
            raise InputError(str(e)) from e
    raise InputError(f"input {i}: {what} is {type(value).__name__}; expected a path or a PIL image")


def to_input(item: Mapping, i: int, instruction: str | None = None) -> Input:
    """Input ``i`` of ``encode`` as an ``embed.Input``; bad ones raise ``InputError`` naming the index."""
    if not isinstance(item, Mapping):
        raise InputError(f"input {i}: expected a dict with keys {', '.join(KEYS)}, got {type(item).__name__}")
    unknown = sorted(set(item) - set(KEYS))
    if unknown:
        raise InputError(f"input {i}: unknown key(s) {unknown}; known: {', '.join(KEYS)}")
    text = item.get("text") or ""
    inst = item.get("instruction") or instruction or ""
    for key, v in (("text", text), ("instruction", inst)):
        if not isinstance(v, str):
            raise InputError(f"input {i}: {key} is {type(v).__name__}, not a string")
    image, video = item.get("image"), item.get("video")
    if image is not None and video is not None:
        raise InputError(f"input {i}: has both an image and a video; one visual per input")
    visual = None
    if image is not None:
        visual = _visual(image, i, "image")
    elif video is not None:
        if isinstance(video, (str, Path)):
            raise InputError(f"input {i}: video {video} is a file; pass its frames as a list of paths or images")
        frames = list(video)
        if not frames:
            raise InputError(f"input {i}: video has no frames")
        visual = [_visual(f, i, f"video frame {k}") for k, f in enumerate(frames)]
    if not text.strip() and visual is None:
        raise InputError(f"input {i}: empty input (no text, image or video)")
    return Input(text, visual, inst, None, f"input {i}")


class Embedder:
    """A backbone with the query modes: ``encode`` embeds inputs directly, after a rationale, or as the gate
    decides. ``inference`` holds the defaults (threshold, rationale budget, batch size)."""

    def __init__(self, backbone: Backbone, inference: InferenceConfig = InferenceConfig()):
        self.backbone = backbone
        self.inference = inference

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, **load_kw) -> "Embedder":
        """Load a checkpoint folder or Hub id (``backbone.load_backbone``; ``load_kw``: ``dtype``, ``device``,
        ``expect_arch``...)."""
        return cls(load_backbone(path_or_hub_id, **load_kw))

    def encode(self, inputs: Sequence[Mapping] | Mapping, reasoning: str = "auto", threshold: float | None = None,
               batch_size: int | None = None, instruction: str | None = None) -> Embeddings:
        """Embed ``inputs`` (dicts with ``text`` / ``image`` / ``video`` / ``instruction``; one dict is one input).

        ``reasoning``: ``"auto"`` (the gate decides, at ``threshold``), ``"never"`` or ``"always"``.
        ``threshold`` and ``batch_size`` default to this embedder's ``inference``; ``instruction`` is used
        for inputs that have none. Every input is checked before the model runs; a bad one (empty, an
        unreadable image path...) raises ``embed.InputError`` naming its index."""
        if reasoning not in REASONING:
            raise ValueError(f"reasoning must be one of {', '.join(REASONING)}, got {reasoning!r}")
        cfg = self.inference
        if threshold is not None:
            cfg = replace(cfg, threshold=threshold)
        if batch_size is not None:
            cfg = replace(cfg, batch_size=batch_size)
        items = [inputs] if isinstance(inputs, Mapping) else list(inputs)
        xs = [to_input(item, i, instruction) for i, item in enumerate(items)]
        out = as_encoded(encoder_for(self.backbone, REASONING[reasoning], cfg)(xs))
        n = len(xs)
        return Embeddings(out.embeddings.detach().float().cpu(),
                          tuple(out.reasoned) if out.reasoned is not None else (False,) * n,
                          tuple(out.rationales) if out.rationales is not None else ("",) * n,
                          tuple(int(t) for t in out.generated_tokens) if out.generated_tokens is not None
                          else (0,) * n)
