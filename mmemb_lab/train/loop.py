"""The training loop shared by every stage: one process on a laptop, many under accelerate/torchrun.

Concept
    A stage supplies a ``step_fn(step, model) -> dict`` that builds its own batch *from the step number*
    (procedural data seeded by (seed, step, rank)) and returns the loss and scalars to log. The loop
    owns everything else: AdamW with warmup + cosine decay, gradient clipping, DDP wrapping when a
    process group exists, a tqdm bar, metrics as JSONL, atomic checkpoints and ``resume``.

    Because the batch is a pure function of the step and the RNG/optimiser state is checkpointed, a
    run that is killed and resumed ends with the same weights as one that was never interrupted
    (tests/test_train.py checks it bit for bit).

Entry points: ``python -m mmemb_lab foundation|train`` on CPU and ``accelerate launch -m mmemb_lab ...``
or ``torchrun -m mmemb_lab ...`` on GPUs run this same code (``distributed.init_from_env``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..runs import RunError, atomic_torch_save, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000
    """Optimiser steps in total (a resumed run continues up to this number)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup: int = 100
    """Linear warmup steps before cosine decay to 10% of the peak."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (0.98: steadier for tiny models from scratch; docs/research-log.md, Prototypes)."""
    clip: float = 1.0
    """Gradient-norm clipping."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    ckpt_every: int = 100
    """Write a resumable checkpoint every this many steps (and at the end)."""

    def __post_init__(self):
        if self.steps < 1 or self.warmup < 0 or self.lr <= 0:
            raise ValueError(f"invalid loop config: {self}")


def lr_lambda(cfg: LoopConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded as data only (``weights_only``: a planted pickle cannot run code), on
    the CPU (a GPU run resumes on a CPU too); a damaged file is a one-line error with the way out."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - pickle / zip errors of a truncated or foreign file, named
        raise CheckpointLoadError(f"{path}: cannot load this checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                                  "it is truncated or was not written by mmemb-lab - rerun with --no-resume to "
                                  "start over") from e


class CheckpointLoadError(RunError):
    """A resumable checkpoint that cannot be read safely."""


@dataclass(frozen=True)
class LoopResult:
    steps_done: int
    resumed_from: int
    wall_s: float
    last: dict


def run_loop(module: torch.nn.Module, step_fn: Callable[[int, torch.nn.Module], dict], cfg: LoopConfig, out_dir: str | Path,
             resume: bool = True, stop_after: int | None = None, desc: str = "train") -> LoopResult:
    """Train ``module``'s parameters with ``step_fn`` for ``cfg.steps`` steps, checkpointing in ``out_dir``.

    ``step_fn(step, model)`` (model: ``module`` or its DDP wrapper, to call forward on) returns a dict
    with a scalar tensor ``loss`` and any floats to log; a step that ran its own backward (GradCache
    chunking) also returns ``backward_done=True`` and must have zeroed gradients before accumulating.
    ``stop_after`` stops early (as if killed) after that many steps of this call: used by tests and notebooks.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start = 0
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt)
        if state.get("n_params") != sum(p.numel() for p in params):
            raise ValueError(f"{ckpt}: checkpoint does not match this model (another architecture or size)")
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
        log.info("resumed %s from step %d", ckpt, start)
    metrics_path = out / "metrics.jsonl"
    if distributed.is_main():
        _truncate_metrics(metrics_path, start)
    train_module = module
    if distributed.is_distributed():
        train_module = torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
    module.train()
    t0, last = time.time(), {}
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(range(start, end), desc=desc, initial=start, total=cfg.steps, disable=not distributed.is_main(),
               mininterval=2.0)
    for step in bar:
        out_step = step_fn(step, train_module)
        if not out_step.pop("backward_done", False):  # chunked (GradCache) steps backpropagate themselves
            opt.zero_grad(set_to_none=True)
            out_step["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        last = {k: (float(v.detach()) if torch.is_tensor(v) else v) for k, v in out_step.items()}
        last.update(step=step + 1, lr=sched.get_last_lr()[0], grad_norm=float(gnorm), wall_s=time.time() - t0)
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            # the global batch's numbers: each rank's, averaged (a no-op in one process)
            last = {k: distributed.reduce_mean(v) if type(v) in (int, float) and k != "step" else v
                    for k, v in last.items()}
        if distributed.is_main() and ((step + 1) % cfg.log_every == 0 or step + 1 == end):
            with metrics_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix({k: f"{v:.3g}" for k, v in last.items() if k in ("loss", "acc", "lm", "aux", "nce")})
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            _save(module, opt, sched, step + 1, params, ckpt, cfg)
    return LoopResult(end, start, time.time() - t0, last)


def _save(module, opt, sched, step, params, ckpt, cfg) -> None:
    if distributed.is_main():
        atomic_torch_save({"model": module.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "step": step, "config": asdict(cfg),
                           "n_params": sum(p.numel() for p in params)}, ckpt)
    distributed.barrier()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint we resume from, so a resumed log has each step once."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def read_metrics(out_dir: str | Path) -> list[dict]:
    p = Path(out_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
