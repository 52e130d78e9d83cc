"""Attribution: which words of a rationale, and which patches of the query image, the match rests on.

Concept
    Stage 1 trains s(e(q + r), e(t+)), the cosine similarity between the embedding of a query written with
    a rationale r in its reasoning span and the embedding of its positive target, to be high. An embedder
    can get there in two ways (docs/method.md, problem 1): by reading what r *says* (the facts of its steps),
    or by the mere *format* of reasoning (the span markers, "so", "then"), the shortcut. Integrated
    gradients (IG) splits s into per-input shares along a straight path from a baseline x' to the input x:

        a_i = (x_i - x'_i) * integral_0^1 ds/dx_i (x' + a (x - x')) da,      sum_i a_i = s(x) - s(x')

    - **tokens** (:func:`attribute_tokens`): IG on the language model's input embeddings (captum's
      ``LayerIntegratedGradients`` on ``embed_tokens``), summed over the embedding dimension per token.
      Baseline: the pad-token embedding in place of every attributed token (by default the reasoning span,
      markers included), because pad is the model's "no content here" token, so the path adds the span's
      content to an otherwise unchanged query.
    - **image patches** (:func:`attribute_patches`): IG on ``pixel_values``, summed per patch (channels and
      the processor's temporal copies) and put back on the image's patch grid. Baseline: ``pixel_values``
      = 0, a flat image of the processor's mean colour (0 after normalisation), the same for every image,
      with no object and no layout.

    The toy world knows the truth: a gold rationale's *fact* words (:func:`fact_words`: the colours,
    shapes, cells, letters and numbers its steps state) should carry more attribution than its *format*
    tokens (span markers, punctuation, connectives), and the cells its steps name should carry more
    than the other cells of the scene (:func:`named_cells`, :func:`cell_attribution`).

Used by: ``figures.attribution_examples`` (``make figures``, notebook 07; its heat maps are
``figures.token_figure`` and ``figures.patch_figure``), tests/test_attribution.py.

Deviations: none from IG itself; the summed-per-token and summed-per-patch readouts, the pad and
mean-colour baselines and the word classes of :func:`word_kind` are our choices.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Collection, Sequence

import numpy as np
import torch
from PIL import Image

from ..model.backbone import THINK_CLOSE, THINK_OPEN, Backbone
from ..model.embed import Input, collate, embed, hidden_states, pool, prompt_text
from ..world.scenes import CELL, COLOURS, DIRECTIONS, LETTERS, POSITIONS, SHAPES

SCOPES = ("rationale", "all")
"""Which tokens :func:`attribute_tokens` moves from the pad baseline: the reasoning span (markers and
rationale), or every token that is not a special token of the chat frame (the query text too)."""

VALUES = frozenset(COLOURS + SHAPES + POSITIONS + LETTERS + ("empty",))
"""Words that name a value of the toy world (numbers too, see :func:`word_kind`)."""
RELATIONS = frozenset(tuple(DIRECTIONS) + ("plus", "minus"))
"""Words that say how values compose (a direction, an operation): neither fact nor filler."""
KINDS = ("fact", "relation", "format", "other")
TOKEN_BASELINES = ("blank", "pad")


@dataclass(frozen=True)
class TokenScore:
    """One token of the query's prompt and its share of s(e(q + r), e(t+))."""

    token: str
    """The token as text (e.g. " purple", "<think>")."""
    value: float
    """IG attribution, summed over the embedding dimension (signed)."""
    in_rationale: bool
    """Inside the rationale text (between the span markers)."""
    in_span: bool
    """Inside the reasoning span, the markers ``<think>`` / ``</think>`` included."""
    word: int | None
    """Index into ``TokenAttribution.words`` of the rationale word it belongs to (None outside the rationale)."""


@dataclass(frozen=True)
class TokenAttribution:
    """Per-token IG attribution of s(e(q + r), e(t+)) for one query and rationale."""

    tokens: tuple[TokenScore, ...]
    """Every token of the prompt, in order; tokens outside ``scope`` are 0 by construction."""
    rationale: str
    words: tuple[str, ...]
    """The rationale's whitespace-separated words, punctuation kept."""
    similarity: float
    """s(e(q + r), e(t+))."""
    baseline_similarity: float
    """s at the baseline (attributed tokens replaced by pad)."""
    delta: float
    """IG's convergence error: sum of values - (similarity - baseline_similarity)."""
    n_steps: int
    scope: str
    baseline: str

    def values(self) -> np.ndarray:
        """(n_tokens,) attribution per token."""
        return np.array([t.value for t in self.tokens])


@dataclass(frozen=True)
class PatchAttribution:
    """Per-patch IG attribution of s(e(q + r), e(t+)) for each image of one query."""

    grids: tuple[np.ndarray, ...]
    """Per image, (rows, cols) of patches: the signed attribution summed over each patch's pixels."""
    image_sizes: tuple[tuple[int, int], ...]
    """Per image, (width, height) in pixels as the model saw it (after the processor's resize)."""
    patch_size: int
    similarity: float
    baseline_similarity: float
    """s with every image replaced by the flat mean-colour image."""
    delta: float
    """IG's convergence error: sum of all patches - (similarity - baseline_similarity)."""
    n_steps: int
    images: tuple[Image.Image, ...] = field(default=(), compare=False, repr=False)
    """The images as the model saw them, for figures."""

    @property
    def grid(self) -> np.ndarray:
        """The first (for a single image, the only) image's grid."""
        return self.grids[0]


# ---------------------------------------------------------------------------------------------
# integrated gradients


def _repeat(batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The batch of one query repeated k times (IG evaluates k points of the path at once)."""
    out = {}
    for key, v in batch.items():
        out[key] = v.repeat(k, *([1] * (v.dim() - 1)))  # pixel_values/image_grid_thw: rows per image, stacked
    return out


def _target_embedding(backbone: Backbone, target: Input) -> torch.Tensor:
    return embed(backbone, [target])[0].to(backbone.device)  # (hidden,)


class _Eval:
    """The model in eval mode with gradients on, restored afterwards."""

    def __init__(self, backbone: Backbone):
        self.model = backbone.model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(True)

    def __exit__(self, *exc):
        torch.set_grad_enabled(self.grad)
        self.model.train(self.was)


def _prompt_tokens(backbone: Backbone, query: Input, batch: dict[str, torch.Tensor]):
    """(token strings, char offsets, prompt text, span range, rationale range) of ``query``'s one row."""
    n = []
    if "image_grid_thw" in batch:
        n = (batch["image_grid_thw"].prod(-1) // backbone.merge ** 2).tolist()
    text = prompt_text(query, n)
    enc = backbone.tokenizer(text, return_offsets_mapping=True)
    if enc["input_ids"] != batch["input_ids"][0].tolist():  # collate and this tokenisation must agree
        raise ValueError(f"{query.name or 'query'}: prompt tokenisation differs from the collated batch")
    head = len(prompt_text(query, n, assistant=""))
    if query.rationale is None:
        return enc, text, (head, head), (head, head)
    r0 = head + len(THINK_OPEN)
    r1 = r0 + len(query.rationale)
    return enc, text, (head, r1 + len(THINK_CLOSE)), (r0, r1)


def _words(rationale: str) -> list[tuple[str, int, int]]:
    return [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", rationale)]


def _image_features(backbone: Backbone, batch: dict[str, torch.Tensor]):
    """The vision tower's output for the batch's images, computed once (token IG leaves the pixels fixed)."""
    from ..model.embed import base_model

    if "pixel_values" not in batch:
        return None
    with torch.no_grad():
        return base_model(backbone.model).get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                                             return_dict=True)


def _repeat_features(mm, k: int):
    """Vision features of one query repeated for k rows (per-image tuples, and per-layer ones for deepstack)."""
    out = {**mm, "pooler_output": tuple(mm.pooler_output) * k}
    if getattr(mm, "deepstack_features", None) is not None:
        out["deepstack_features"] = [tuple(f) * k for f in mm.deepstack_features]
    return {"image": type(mm)(**out)}


def blank_id(backbone: Backbone) -> int:
    """The token of a lone space (byte-level BPE's "Ġ")."""
    ids = backbone.tokenizer(" ", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{backbone.source}: a space is {len(ids)} tokens, not one; use baseline='pad'")
    return ids[0]


def attribute_tokens(backbone: Backbone, query: Input, target: Input, n_steps: int = 32,
                     internal_batch_size: int | None = None, scope: str = "rationale",
                     baseline: str = "blank") -> TokenAttribution:
    """IG of s(e(query), e(target)) with respect to the query's token embeddings.

    ``query.rationale`` is written in the reasoning span; with ``scope="rationale"`` only the span's tokens
    (markers and rationale) leave the baseline, with ``"all"`` every non-special token does. ``baseline``:
    "blank" (each attributed token's embedding replaced by a lone space's) or "pad" (by the pad token's;
    on the tiny foundation s jumps within a hundredth of that path, so it needs hundreds of steps: check
    ``delta``).
    """
    from captum.attr import IntegratedGradients

    from ..model.embed import base_model

    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: expected one of {SCOPES}")
    if baseline not in TOKEN_BASELINES:
        raise ValueError(f"baseline {baseline!r}: expected one of {TOKEN_BASELINES}")
    fill = blank_id(backbone) if baseline == "blank" else backbone.tokenizer.pad_token_id
    embed_layer = base_model(backbone.model).language_model.embed_tokens
    with _Eval(backbone):
        t_emb = _target_embedding(backbone, target)
        batch = collate(backbone, [query])
        enc, text, span, rat = _prompt_tokens(backbone, query, batch)
        ids = batch["input_ids"]
        offsets = enc["offset_mapping"]
        markers = {backbone.token_id(THINK_OPEN), backbone.token_id(THINK_CLOSE)}
        special = set(backbone.tokenizer.all_special_ids)
        in_span = [span[0] <= a and b <= span[1] and b > a for a, b in offsets]
        if scope == "rationale":
            moved = torch.tensor(in_span, dtype=torch.bool)
        else:
            moved = torch.tensor([(i not in special) or (i in markers) for i in ids[0].tolist()], dtype=torch.bool)
        mm = _image_features(backbone, batch)
        rest = {k: v for k, v in batch.items() if k not in ("input_ids", "pixel_values")}
        with torch.no_grad():
            x = embed_layer(ids)  # (1, seq, hidden)
            base = x.clone()
            base[0, moved] = embed_layer.weight[fill]

        def forward(e: torch.Tensor) -> torch.Tensor:  # (k, seq, hidden) input embeddings -> (k,) similarities
            k = e.shape[0]
            hook = embed_layer.register_forward_hook(lambda m, i, o: e)  # the model's own forward, these embeddings
            try:
                b = {"input_ids": ids.repeat(k, 1), **_repeat(rest, k)}
                return pool(hidden_states(backbone, b, None if mm is None else _repeat_features(mm, k))) @ t_emb
            finally:
                hook.remove()

        attr, delta = IntegratedGradients(forward).attribute(x, baselines=base, n_steps=n_steps,
                                                             internal_batch_size=internal_batch_size,
                                                             return_convergence_delta=True)
        with torch.no_grad():
            s, s0 = forward(x)[0].item(), forward(base)[0].item()
    values = attr[0].sum(-1).detach().cpu().numpy()  # (seq,)
    words = _words(query.rationale or "")
    tokens = []
    for i, (tid, (a, b)) in enumerate(zip(ids[0].tolist(), offsets)):
        tok = backbone.tokenizer.decode([tid])
        in_rat = rat[0] <= a and b <= rat[1] and b > a
        word = None
        if in_rat:
            seg = text[a:b]
            lo = a + len(seg) - len(seg.lstrip()) - rat[0]  # a byte-level token's offsets include its leading space
            word = next((j for j, (_, w0, w1) in enumerate(words) if w0 <= lo < w1), None)
        tokens.append(TokenScore(tok, float(values[i]), in_rat, in_span[i], word))
    return TokenAttribution(tuple(tokens), query.rationale or "", tuple(w for w, _, _ in words), s, s0,
                            float(delta[0]), n_steps, scope, baseline)


def _patch_grid(values: torch.Tensor, thw: Sequence[int], merge: int) -> np.ndarray:
    """Per-patch values in the processor's order (t, block row, block col, row in block, col in block)
    -> (rows, cols), summed over t."""
    t, h, w = thw
    v = values.reshape(t, h // merge, w // merge, merge, merge)
    return v.permute(0, 1, 3, 2, 4).reshape(t, h, w).sum(0).cpu().numpy()


def attribute_patches(backbone: Backbone, query: Input, target: Input, n_steps: int = 32,
                      internal_batch_size: int | None = None) -> PatchAttribution:
    """IG of s(e(query), e(target)) with respect to the query's pixels (flat mean-colour baseline), summed
    per patch and mapped back to each image's patch grid."""
    from captum.attr import IntegratedGradients

    if not query.images():
        raise ValueError(f"{query.name or 'query'}: no image to attribute")
    with _Eval(backbone):
        t_emb = _target_embedding(backbone, target)
        batch = collate(backbone, [query])
        pv = batch["pixel_values"]  # (patches, features), the images' patches stacked
        rest = {k: v for k, v in batch.items() if k != "pixel_values"}

        def forward(pixels: torch.Tensor) -> torch.Tensor:  # (k, patches, features) -> (k,)
            b = _repeat(rest, pixels.shape[0])
            return pool(hidden_states(backbone, {"pixel_values": pixels.reshape(-1, pv.shape[-1]), **b})) @ t_emb

        x = pv.unsqueeze(0)
        base = torch.zeros_like(x)
        attr, delta = IntegratedGradients(forward).attribute(x, baselines=base, n_steps=n_steps,
                                                             internal_batch_size=internal_batch_size,
                                                             return_convergence_delta=True)
        with torch.no_grad():
            s, s0 = forward(x)[0].item(), forward(base)[0].item()
    per_patch = attr[0].sum(-1).detach()  # (patches,)
    patch = backbone.image_processor.patch_size
    grids, sizes, k = [], [], 0
    for thw in batch["image_grid_thw"].tolist():
        n = thw[0] * thw[1] * thw[2]
        grids.append(_patch_grid(per_patch[k:k + n], thw, backbone.merge))
        sizes.append((thw[2] * patch, thw[1] * patch))
        k += n
    images = tuple(im.convert("RGB").resize(sz) for im, sz in zip(_fed_images(backbone, query), sizes))
    return PatchAttribution(tuple(grids), tuple(sizes), patch, s, s0, float(delta[0]), n_steps, images)


def _fed_images(backbone: Backbone, query: Input) -> list[Image.Image]:
    from ..model.embed import storyboard

    ims = query.images()
    return [storyboard(ims)] if len(ims) > 1 and backbone.video_mode == "storyboard" else ims


# ---------------------------------------------------------------------------------------------
# the toy world's truth: which words state facts, which cells the steps name


def _core(word: str) -> str:
    return word.strip(string.punctuation)


def word_kind(word: str) -> str:
    """"fact" (names a world value: a colour, shape, cell, letter, number or "empty"), "relation" (a
    direction or an operation) or "format" (any other word: connectives, step labels, filler)."""
    core = _core(word)
    if core in VALUES or core.isdigit():
        return "fact"
    return "relation" if core in RELATIONS else "format"


def fact_words(gold_steps: Sequence[str]) -> frozenset[str]:
    """The values the gold steps state: the cores of their words of kind "fact"."""
    return frozenset(_core(w) for s in gold_steps for w in s.split() if word_kind(w) == "fact")


def token_kinds(attr: TokenAttribution, facts: Collection[str]) -> tuple[str | None, ...]:
    """Per token: None outside the reasoning span; "format" for the span markers, punctuation at a word's
    edge (":" and "." of "cross:") and tokens of format words; "fact" for tokens of a word whose value is in ``facts`` (e.g.
    :func:`fact_words` of the gold steps); "other" for a value word not in ``facts``; "relation"."""
    out = []
    toks = attr.tokens
    for i, t in enumerate(toks):
        inner = 0 < i < len(toks) - 1 and t.word is not None and toks[i - 1].word == t.word == toks[i + 1].word
        if not t.in_span:
            out.append(None)
        elif t.word is None or not (inner or any(ch.isalnum() for ch in t.token)):  # "top-left": "-" is the word's
            out.append("format")
        else:
            w = attr.words[t.word]
            kind = word_kind(w)
            out.append("other" if kind == "fact" and _core(w) not in facts else kind)
    return tuple(out)


def kind_means(attr: TokenAttribution, facts: Collection[str]) -> dict[str, float]:
    """Mean absolute attribution per token kind of :func:`token_kinds` (kinds present only)."""
    v = np.abs(attr.values())
    kinds = np.array(token_kinds(attr, facts), dtype=object)
    return {k: float(v[kinds == k].mean()) for k in KINDS if (kinds == k).any()}


def word_attributions(attr: TokenAttribution) -> tuple[tuple[str, float], ...]:
    """(word, summed attribution of its tokens) for each word of the rationale."""
    sums = np.zeros(len(attr.words))
    for t in attr.tokens:
        if t.word is not None:
            sums[t.word] += t.value
    return tuple(zip(attr.words, sums.tolist()))


def named_cells(gold_steps: Sequence[str]) -> frozenset[int]:
    """Grid cells (indices into ``POSITIONS``) that the steps name."""
    return frozenset(POSITIONS.index(_core(w)) for s in gold_steps for w in s.split() if _core(w) in POSITIONS)


def cell_attribution(patches: PatchAttribution, image: int = 0, cell_px: int = CELL) -> np.ndarray:
    """(rows, cols) of world cells: mean absolute patch attribution over each cell's patches."""
    g = np.abs(patches.grids[image])
    k = cell_px // patches.patch_size
    rows, cols = g.shape[0] // k, g.shape[1] // k
    return g[:rows * k, :cols * k].reshape(rows, k, cols, k).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------------
# one item, for notebooks


def gold_rationale(item) -> str:
    """The world's gold steps written as one rationale, as stage 1 trains on them."""
    return " ".join(item.gold_steps)


def explain_item(backbone: Backbone, item, rationale: str | None = None, n_steps: int = 32
                 ) -> tuple[TokenAttribution, PatchAttribution | None]:
    """Token and patch attributions of s(e(q + r), e(t+)) for one toy-world item (``rationale``: default the
    gold one); the patch attribution is None for a text query."""
    from ..data import item_candidate, item_query

    r = gold_rationale(item) if rationale is None else rationale
    q, t = item_query(item, r), item_candidate(item, item.labels[0])
    tokens = attribute_tokens(backbone, q, t, n_steps)
    patches = attribute_patches(backbone, q, t, n_steps) if q.images() else None
    return tokens, patches
