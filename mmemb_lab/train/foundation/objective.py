"""The stage-0 objective: the backbone with its auxiliary heads, the labels and every loss term."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ...model.backbone import Backbone
from ...model.embed import Input, base_model, collate
from ...world.scenes import TOKEN_CLASSES, Page, Scene, Video
from ..contrastive import info_nce

log = logging.getLogger(__name__)


N_TOKEN_POSITIONS = 27 + 8  # scene cells 0-8 (storyboard frames: 9 * frame + cell), page tokens 27-34
MAX_FRAMES = 8  # classes of the frame-index head


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
