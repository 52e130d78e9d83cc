"""The embedder: one API for text, images, image+text, frame sequences and pages, direct or with a rationale.

Concept (docs/method.md, step 3)
    e(x) = L2-normalised, *final-normed* hidden state at the embedding token ``<|emb|>``. An input is
    rendered into a chat turn; the assistant turn is either empty (direct mode, "no reasoning") or a
    reasoning span ``<think> r </think>`` (conditioned on a given or generated rationale r), and always
    ends with ``<|emb|>``:

        <|im_start|>user\\n[vision] instruction\\ntext<|im_end|>\\n<|im_start|>assistant\\n[<think>r</think>]<|emb|>

    Batches are left-padded so the embedding token is the last position of every row.

Pitfall guarded here (seen with transformers >= 4.56): ``hidden_states[-1]`` of the
ForConditionalGeneration forward may be the state *before* the final RMSNorm. We pool
``model.model(...).last_hidden_state`` of the base model, which is post-norm; tests check it.

Where used: every stage and notebook 00/01. Frame sequences (video) are fed as a sequence of images
or as one storyboard image (the torchvision-backed video processor is unavailable on CPU);
``Backbone.video_mode`` records the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image

from .backbone import EMB_TOKEN, Backbone, reasoning_span

Visual = Union[Image.Image, Sequence[Image.Image], None]


@dataclass(frozen=True)
class Input:
    """One thing to embed: an instruction, a text and optionally an image or a list of frames/pages."""

    text: str = ""
    visual: Visual = None
    instruction: str = ""
    rationale: str | None = None  # None: direct; a string: embed after this reasoning span
    name: str = ""  # record or file name, for error messages

    def images(self) -> list[Image.Image]:
        if self.visual is None:
            return []
        return [self.visual] if isinstance(self.visual, Image.Image) else list(self.visual)


class InputError(ValueError):
    """Bad input (empty, unreadable image...), with the record it came from."""


def prompt_text(inp: Input, n_tokens: Sequence[int], assistant: str | None = None) -> str:
    """The chat-formatted text of one input; ``n_tokens[i]`` image-pad tokens for its i-th image."""
    blocks = ["<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" for n in n_tokens]
    if len(blocks) > 1:  # a frame sequence: a text marker per frame, like Qwen3-VL's video timestamps
        blocks = [f"frame {k + 1}: {b}" for k, b in enumerate(blocks)]
    vision = "".join(blocks)
    body = "\n".join(x for x in (inp.instruction, inp.text) if x)
    head = f"<|im_start|>user\n{vision}{body}<|im_end|>\n<|im_start|>assistant\n"
    if assistant is not None:
        return head + assistant
    span = "" if inp.rationale is None else reasoning_span(inp.rationale)
    return head + span + EMB_TOKEN


def check_input(inp: Input) -> None:
    if not inp.text.strip() and not inp.images() and not inp.instruction.strip():
        raise InputError(f"{inp.name or 'input'}: empty input (no text and no image)")
    for im in inp.images():
        if not isinstance(im, Image.Image):
            raise InputError(f"{inp.name or 'input'}: visual is {type(im).__name__}, not a PIL image")


def storyboard(frames: Sequence[Image.Image]) -> Image.Image:
    """Frames stacked top to bottom into one image: every merged token then knows its frame by its place."""
    w = max(f.width for f in frames)
    board = Image.new("RGB", (w, sum(f.height for f in frames)))
    y = 0
    for f in frames:
        board.paste(f.convert("RGB"), (0, y))
        y += f.height
    return board


def collate(backbone: Backbone, inputs: Sequence[Input], assistants: Sequence[str] | None = None,
            device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Tokenise and left-pad a batch; images go through the backbone's image processor.

    The tensors are put on ``device`` (default: where the model is, so a GPU model gets GPU batches;
    pass "cpu" to build batches in a data-loading process).

    A frame sequence (a list of images) is fed according to ``backbone.video_mode``: "frames_as_images"
    (one vision block per frame, with a text marker each) or "storyboard" (frames tiled into one image).
    """
    images, counts = [], []
    for inp in inputs:
        check_input(inp)
        ims = [im.convert("RGB") for im in inp.images()]
        if len(ims) > 1 and backbone.video_mode == "storyboard":
            ims = [storyboard(ims)]
        images.extend(ims)
        counts.append(len(ims))
    batch: dict[str, torch.Tensor] = {}
    per_image_tokens: list[int] = []
    if images:
        vis = backbone.image_processor(images=images, return_tensors="pt")
        batch["pixel_values"] = vis["pixel_values"]
        batch["image_grid_thw"] = vis["image_grid_thw"]
        per_image_tokens = (vis["image_grid_thw"].prod(-1) // backbone.merge ** 2).tolist()
    texts, k = [], 0
    for i, inp in enumerate(inputs):
        n = per_image_tokens[k:k + counts[i]]
        k += counts[i]
        texts.append(prompt_text(inp, n, None if assistants is None else assistants[i]))
    enc = backbone.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    batch["input_ids"] = enc["input_ids"]
    batch["attention_mask"] = enc["attention_mask"]
    batch["mm_token_type_ids"] = (enc["input_ids"] == backbone.token_id("<|image_pad|>")).int()
    device = torch.device(device) if device is not None else backbone.device
    return batch if device.type == "cpu" else {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Qwen-VL base model (``.model`` of the ForConditionalGeneration), through peft/DDP wrappers."""
    m = model
    while not hasattr(m, "get_image_features") or not hasattr(m, "language_model"):
        m = m.module if hasattr(m, "module") else (m.base_model if hasattr(m, "base_model") and m.base_model is not m
                                                    else m.model)
    return m


def hidden_states(backbone: Backbone, batch: dict[str, torch.Tensor], mm_encoder_outputs=None) -> torch.Tensor:
    """Final-normed last hidden states, (batch, seq, hidden)."""
    kw = {k: v for k, v in batch.items() if k != "labels"}
    if mm_encoder_outputs is not None:
        kw.pop("pixel_values", None)
        kw["mm_encoder_outputs"] = mm_encoder_outputs
    out = base_model(backbone.model)(**kw, use_cache=False)
    return out.last_hidden_state


def pool(states: torch.Tensor) -> torch.Tensor:
    """Embedding = L2-normalised state at the last position (the ``<|emb|>`` token under left padding)."""
    return F.normalize(states[:, -1].float(), dim=-1)


def encode(backbone: Backbone, inputs: Sequence[Input]) -> torch.Tensor:
    """Embed a batch with gradients (training); (batch, hidden)."""
    batch = collate(backbone, inputs)
    return pool(hidden_states(backbone, batch))


@torch.no_grad()
def embed(backbone: Backbone, inputs: Sequence[Input], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Embed many inputs in batches, without gradients; (n, hidden), unit norm, in input order.

    Batches are formed from inputs of similar length (``length_key``), so little of a batch is padding;
    an input's embedding does not depend on its batch (tests/test_backbone.py)."""
    from tqdm.auto import tqdm

    was_training = backbone.model.training
    backbone.model.eval()
    order = sorted(range(len(inputs)), key=lambda i: length_key(inputs[i]))
    out = []
    starts = range(0, len(inputs), batch_size)
    for s in tqdm(starts, desc="embed", disable=not progress, leave=False):
        out.append(encode(backbone, [inputs[i] for i in order[s:s + batch_size]]).cpu())  # results live on the CPU
    backbone.model.train(was_training)
    if not out:
        return torch.zeros(0, backbone.model.config.text_config.hidden_size)
    return torch.cat(out)[torch.argsort(torch.tensor(order))]


def length_key(inp: Input) -> int:
    """A cheap proxy of an input's token count, for grouping inputs of similar length: words of its
    instruction, text and rationale, plus 10 per image."""
    return len(f"{inp.instruction} {inp.text} {inp.rationale or ''}".split()) + 10 * len(inp.images())


class Embedder(torch.nn.Module):
    """The embedding forward as one module call, so DDP can wrap it: ``Embedder(model)(*batches)``.

    Several batches (queries, positives, negatives) go through ONE call: DDP expects one forward per
    backward.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *batches: dict) -> list[torch.Tensor]:
        base = base_model(self.model)
        return [pool(base(**b, use_cache=False).last_hidden_state) for b in batches]
