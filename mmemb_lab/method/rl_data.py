"""What GRPO reads: the processor trl needs for our VLM (chat template, no video processor), the prompt
messages of a query, and the RL pairs of the toy world.

Used by: ``rl``.
"""

from __future__ import annotations

import logging
from typing import Sequence

from ..model.backbone import Backbone
from ..model.embed import Input, storyboard
from .rewards import PairTargets

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Renders a user turn exactly as ``embed.prompt_text`` does (vision blocks, then instruction and text)."""


# ---------------------------------------------------------------------------------------------
# processor and dataset


class _NoVideoProcessor:
    """Mixin for the Qwen-VL processors: no video processor (the stock one needs torchvision), and image
    lists flattened with prompts without images dropped (trl passes ``None`` for a text-only prompt)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, **kwargs):
        if isinstance(images, (list, tuple)):
            flat = []
            for x in images:
                if isinstance(x, (list, tuple)):
                    flat.extend(y for y in x if y is not None)
                elif x is not None:
                    flat.append(x)
            images = flat or None
        return super().__call__(images=images, text=text, **kwargs)


_PROCESSOR_CLASSES: dict[str, type] = {}


def _processor_class(arch: str) -> type:
    if arch not in _PROCESSOR_CLASSES:
        import transformers

        base = {"qwen3_vl": "Qwen3VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                "qwen2_vl": "Qwen2VLProcessor"}[arch]
        _PROCESSOR_CLASSES[arch] = type(f"Emb{base}", (_NoVideoProcessor, getattr(transformers, base)), {})
    return _PROCESSOR_CLASSES[arch]


def make_processor(backbone: Backbone):
    """The processing class trl needs for a VLM: tokenizer + PIL image processor + our chat template."""
    return _processor_class(backbone.arch)(backbone.image_processor, backbone.tokenizer, chat_template=CHAT_TEMPLATE)


def prompt_messages(inp: Input, video_mode: str = "frames_as_images") -> tuple[list[dict], list]:
    """(conversational prompt with image placeholders, its images) rendering like ``embed.prompt_text``."""
    ims = [im.convert("RGB") for im in inp.images()]
    if len(ims) > 1 and video_mode == "storyboard":
        ims = [storyboard(ims)]
    content = []
    for k in range(len(ims)):
        if len(ims) > 1:
            content.append({"type": "text", "text": f"frame {k + 1}: "})
        content.append({"type": "image", "text": None})
    content.append({"type": "text", "text": "\n".join(x for x in (inp.instruction, inp.text) if x)})
    return [{"role": "user", "content": content}], ims


def rl_dataset(pairs: Sequence[PairTargets], video_mode: str = "frames_as_images"):
    """A ``datasets.Dataset`` of prompts for trl: ``prompt``, ``images``, and the columns the rewards and
    analysis read (``item_id``, ``needs_reasoning``, ``dataset``)."""
    from datasets import Dataset, Features, Image, List, Value

    rows = []
    for p in pairs:
        msgs, ims = prompt_messages(p.query, video_mode)
        rows.append({"prompt": msgs, "images": ims, "item_id": p.key, "needs_reasoning": p.needs_reasoning,
                     "dataset": p.dataset})
    feats = Features({"prompt": List({"role": Value("string"),
                                      "content": List({"type": Value("string"), "text": Value("string")})}),
                      "images": List(Image()), "item_id": Value("string"), "needs_reasoning": Value("bool"),
                      "dataset": Value("string")})
    return Dataset.from_list(rows, features=feats)


def toy_rl_pairs(world_seed: int, hard_fraction: float, n_per_dataset: int, start: int = 0,
                 datasets: Sequence[str] | None = None, seed: int = 0) -> list[PairTargets]:
    """Training queries of the toy world (``train`` split, indices ``start..start+n-1`` per dataset) with
    the same positives and negatives as posterior selection (``selection.toy_pairs``)."""
    from ..data import item_query
    from ..world.tasks import DATASETS, make_item
    from .selection import toy_pairs

    items = [make_item(d, world_seed, "train", start + i, hard_fraction)
             for d in (datasets or sorted(DATASETS)) for i in range(n_per_dataset)]
    return [PairTargets(p.item.item_id, item_query(p.item), p.positive, tuple(p.negatives),
                        bool(p.item.needs_reasoning), p.item.dataset)
            for p in toy_pairs(items, [[] for _ in items], seed=seed)]


# ---------------------------------------------------------------------------------------------
# advantages
