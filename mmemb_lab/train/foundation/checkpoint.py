"""Training stage 0 to completion, resumably, and loading its checkpoint (with the world it was made for)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ... import distributed
from ...method.workers import DEFAULT_PROMPT, toy_rationales
from ...model.backbone import Backbone, build_tiny, load_backbone, train_tokenizer
from ...runs import Manifest, RunFolder, atomic_torch_save, atomic_write_text
from ...world.build import WORLD_VERSION
from ...world.skills import sample_skill
from ...world.tasks import DATASETS, HARD_FRACTION, make_item
from ..loop import load_checkpoint, run_loop
from .config import FoundationConfig
from .curriculum import make_step_fn
from .objective import Stage0
from .probes import description_accuracy

log = logging.getLogger(__name__)


def world_corpus(seed: int, n: int) -> list[str]:
    """Text the tokenizer is trained on: every kind of question, answer, instruction and candidate."""
    rng = np.random.default_rng([seed, 99])
    texts = []
    for _ in range(n):
        s = sample_skill(rng)
        texts += [s.question, s.answer]

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



def train_foundation(out: str | Path, cfg: FoundationConfig = FoundationConfig(), seed: int = 0,
                     resume: bool = True, stop_after: int | None = None, overwrite: bool = False) -> Backbone:
    """Train stage 0 from scratch (tokenizer included) and save the backbone to ``out``.

    The resumable state lives in ``<out>.work``, a run folder with a manifest (config, seed, code): a
    rerun with other settings refuses unless ``overwrite`` (which moves the old state aside)."""

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
