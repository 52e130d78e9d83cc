"""Contrastive fine-tuning on MMEB-train-schema data: the embedder's direct InfoNCE term on its own.

Concept (docs/method.md, step 3, last term; the VLM2Vec recipe in its MMEB-V2 section)
    InfoNCE(e(q), t+) with in-batch negatives, the row's hard negative when it has one, and - under
    ``accelerate launch`` / ``torchrun`` - the embeddings of every process gathered with gradients, so
    N processes of B/N rows see the same negatives as one process of B rows. Batches are drawn from
    the training rows as a pure function of (seed, step), which makes killed-and-resumed runs exact.

    Deviation from the reference recipe: the batch mixes datasets (the reference uses per-dataset
    homogeneous sub-batches); duplicates of a positive within the batch are masked, not counted as
    negatives. Stage 1 (later) adds the reasoning and generation terms on top of this loop.

Used by: the demo (short run after stage 0), ``mmemb-lab train``, notebook 01.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import distributed
from ..data import load_train
from ..model.backbone import Backbone
from ..model.embed import Embedder, Input, collate
from .contrastive import TEMPERATURE, info_nce
from .loop import LoopConfig, LoopResult, run_loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=100, lr=2e-4, warmup=10, ckpt_every=25))
    """Optimiser and schedule (short and gentle: the foundation already embeds)."""
    batch_size: int = 32
    """Global batch (split over processes)."""
    temperature: float = TEMPERATURE
    """InfoNCE temperature (``contrastive.TEMPERATURE``)."""
    hard_negatives: bool = True
    """Use each row's ``neg_text`` / ``neg_image_path`` as an extra negative."""

    def __post_init__(self):
        if self.batch_size % max(1, distributed.world_size()) != 0:
            raise ValueError(f"batch_size {self.batch_size} must divide over {distributed.world_size()} processes")


def load_train_rows(world_root: str | Path, datasets: list[str]) -> list[tuple]:
    """(query, positive, negative or None, positive id, negative id) per training row."""
    rows = []
    for name in datasets:
        for q, p, n in load_train(Path(world_root) / name / "train", world_root, name):
            rows.append((q, p, n, _row_key(name, p), _row_key(name, n) if n is not None else None))
    return rows


def _row_key(name: str, x: Input) -> str:
    """Identity of a target (text, or image content) for masking duplicates and false negatives."""
    if x.visual is None:
        return f"{name}|{x.text}"
    import hashlib

    h = hashlib.sha1()
    for im in (x.visual if isinstance(x.visual, list) else [x.visual]):
        h.update(im.tobytes())
    return f"{name}|{x.text}|{h.hexdigest()}"


def make_step_fn(backbone: Backbone, rows, cfg: FinetuneConfig, seed: int):
    per_rank = cfg.batch_size // max(1, distributed.world_size())

    def step_fn(step: int, model) -> dict:
        rng = np.random.default_rng([seed, step])
        idx = rng.choice(len(rows), cfg.batch_size, replace=False)  # same global batch on every rank
        mine = idx[distributed.rank() * per_rank:(distributed.rank() + 1) * per_rank]
        batch = [rows[int(i)] for i in mine]
        parts = [[b[0] for b in batch], [b[1] for b in batch]]
        if cfg.hard_negatives and all(b[2] is not None for b in batch):
            parts.append([b[2] for b in batch])
        embs = model(*[collate(backbone, xs) for xs in parts])  # one forward: DDP-safe
        q, p = embs[0], embs[1]
        negs = embs[2] if len(embs) > 2 else None
        res = info_nce(q, p, cfg.temperature, hard_negatives=negs, target_ids=[b[3] for b in batch],
                       negative_ids=[b[4] for b in batch] if negs is not None else None)
        return {"loss": res.loss, "acc": res.accuracy}

    return step_fn


def finetune(backbone: Backbone, world_root: str | Path, datasets: list[str], out_dir: str | Path,
             cfg: FinetuneConfig = FinetuneConfig(), seed: int = 0, resume: bool = True,
             stop_after: int | None = None) -> LoopResult:
    """Run (or resume) contrastive fine-tuning; the backbone's weights are updated in place."""
    rows = load_train_rows(world_root, datasets)
    log.info("contrastive fine-tuning on %d rows from %d datasets in %d process(es)", len(rows), len(datasets),
             max(1, distributed.world_size()))
    return run_loop(Embedder(backbone.model), make_step_fn(backbone, rows, cfg, seed), cfg.loop, out_dir, resume=resume,
                    stop_after=stop_after, desc="contrastive")
