"""Speed benchmarks (``make bench`` -> runs/bench/bench.json). Ratios are measured within one run.

Machines here are noisy, so every comparison is a ratio of two measurements taken back to back in
the same process (batched vs one at a time), never a number compared against a constant.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from .data import item_query
from .embed import embed
from .train import atomic_write_text
from .world.tasks import DATASETS, make_item


def _timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def embedding_throughput(backbone, n: int = 64, batch_size: int = 32) -> dict:
    """Direct-mode embedding of n mixed queries: batched vs one item at a time (items/s, best of 3)."""
    names = sorted(DATASETS)
    inputs = [item_query(make_item(names[i % len(names)], 0, "eval", i, 0.65)) for i in range(n)]
    embed(backbone, inputs[:batch_size], batch_size=batch_size)  # warm-up
    t_batched = _timed(lambda: embed(backbone, inputs, batch_size=batch_size))
    t_single = _timed(lambda: [embed(backbone, [x]) for x in inputs])
    return {"items": n, "batch_size": batch_size, "batched_items_per_s": n / t_batched,
            "single_items_per_s": n / t_single, "batched_over_single": t_single / t_batched}


def run_bench(out: str | Path = "runs/bench") -> dict:
    from .foundation import load_foundation
    from .paths import foundation_dir

    backbone, _ = load_foundation(foundation_dir())
    res = {"machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                       "cuda": torch.cuda.is_available()},
           "backbone": {"arch": backbone.arch, "params": sum(p.numel() for p in backbone.model.parameters())},
           "embedding_direct": embedding_throughput(backbone)}
    out = Path(out)
    atomic_write_text(out / "bench.json", json.dumps(res, indent=1))
    return res
