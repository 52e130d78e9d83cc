"""Speed benchmarks (``make bench`` -> runs/bench/bench.json). Ratios are measured within one run.

Machines here are noisy, so every comparison is a ratio of two measurements taken back to back in
the same process (batched vs one at a time), never a number compared against a constant.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from .data import item_query
from .eval.harness import HarnessConfig, ToySource, direct_encoder, run_benchmark
from .method import stage1
from .method.selection import pair_partners, score_candidate, score_pairs, toy_pairs
from .method.workers import toy_rationales
from .model.backbone import Backbone, build_tiny
from .model.embed import embed
from .model.gating import gate_and_spans, gate_forward
from .model.inference import generate_rationales
from .paths import foundation_dir
from .runs import atomic_write_text
from .scale import memory_estimate
from .train import foundation
from .train.loop import LoopConfig, read_metrics, run_loop
from .world.build import WorldConfig, build_world, toy_registry
from .world.tasks import DATASETS, HARD_FRACTION, make_item


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _timed(fn, repeats: int = 3) -> float:
    return _best_of(fn, repeats)


def harness_bench(backbone: Backbone, n_eval: int = 16, seed: int = 0, repeats: int = 3) -> dict:
    """Evaluation throughput on a small toy world, and the saving from embedding a global pool once.

    Every number is measured in this call: a fresh harness run (queries/s over all datasets), the same
    run resumed (nothing recomputed), and on the global ``toy_doc`` pool the time to embed the pool
    once plus every query, against re-embedding the pool for each query (best of ``repeats`` each).
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "world"
        info = build_world(root, WorldConfig(seed=seed, n_train=0, n_eval=n_eval), progress=False)
        registry, source = toy_registry(info), ToySource(root)
        cfg = HarnessConfig(latency_sample=0)
        t = time.perf_counter()
        res = run_benchmark(backbone, source, registry, Path(tmp) / "run", cfg, benchmark="toy", progress=False)
        wall = time.perf_counter() - t
        t = time.perf_counter()
        again = run_benchmark(backbone, source, registry, Path(tmp) / "run", cfg, benchmark="toy", progress=False)
        resumed = time.perf_counter() - t
        es = source.load(registry["toy_doc"])
        pool_inputs, queries = list(es.candidates.values()), [x.query for x in es.queries]
        enc = direct_encoder(backbone)
        enc(queries[:2])  # warm-up
        once = _best_of(lambda: (enc(pool_inputs), enc(queries)), repeats)
        per_query = _best_of(lambda: [(enc(pool_inputs), enc([x])) for x in queries], repeats)
    n_q = sum(r.n_queries for r in res.per_dataset.values())
    return {"world": {"seed": seed, "n_eval": n_eval, "datasets": len(registry)},
            "queries": n_q, "wall_s": wall, "queries_per_s": n_q / wall, "resumed_wall_s": resumed,
            "resumed_embedded": again.embedded,
            "global_pool": {"dataset": "toy_doc", "pool": len(pool_inputs), "queries": len(queries),
                            "once_s": once, "per_query_s": per_query, "saving_ratio": per_query / once}}


def embedding_throughput(backbone, n: int = 64, batch_size: int = 32) -> dict:
    """Direct-mode embedding of n mixed queries: batched vs one item at a time (items/s, best of 3)."""
    names = sorted(DATASETS)
    inputs = [item_query(make_item(names[i % len(names)], 0, "eval", i, HARD_FRACTION)) for i in range(n)]
    embed(backbone, inputs[:batch_size], batch_size=batch_size)  # warm-up
    t_batched = _timed(lambda: embed(backbone, inputs, batch_size=batch_size))
    t_single = _timed(lambda: [embed(backbone, [x]) for x in inputs])
    return {"items": n, "batch_size": batch_size, "batched_items_per_s": n / t_batched,
            "single_items_per_s": n / t_single, "batched_over_single": t_single / t_batched}


def counterfactual_throughput(backbone, n_items: int = 32) -> dict:
    """Counterfactual scoring of (pair, candidate) combinations: ``score_pairs`` (every target embedded once,
    query variants in length-sorted batches) vs each candidate scored on its own (``score_candidate``). The
    batched design run at batch size 1 is reported too (what batching alone buys, without the sharing).

    Workload: ``n_items`` training pairs spread over the 8 datasets (the demo scores 192 per dataset); at 32
    pairs, targets shared by pairs of a global-pool dataset are embedded once, as in the demo (past results:
    docs/research-log.md, Selection: batched counterfactual scoring)."""
    names = sorted(DATASETS)
    items = [make_item(names[i % len(names)], 0, "train", i, HARD_FRACTION) for i in range(n_items)]
    pairs = toy_pairs(items, [toy_rationales(it, 0) for it in items])
    n_cands = sum(len(p.rationales) for p in pairs)
    partner = pair_partners(pairs)

    def one_at_a_time():
        for i, p in enumerate(pairs):
            for j, r in enumerate(p.rationales):
                if r.status == "ok":
                    s = pairs[partner[i]].rationales[j] if partner[i] >= 0 else None
                    score_candidate(backbone, p, r.text, s.text if s is not None and s.status == "ok" else None)

    t_batched = _timed(lambda: score_pairs(backbone, pairs, batch_size=64), repeats=2)
    t_single = _timed(one_at_a_time, repeats=1)
    t_batch1 = _timed(lambda: score_pairs(backbone, pairs, batch_size=1), repeats=1)
    return {"pairs": len(pairs), "candidate_pairs": n_cands, "batched_candidate_pairs_per_s": n_cands / t_batched,
            "single_candidate_pairs_per_s": n_cands / t_single, "batched_over_single": t_single / t_batched,
            "batched_design_at_batch_size_1_over_batched": t_batch1 / t_batched,
            "single": "each candidate scored on its own (selection.score_candidate): its query variants and its "
                      "pair's targets embedded in one call, nothing shared with other candidates"}


def stage1_steps(chunk: int, batch: int, buckets: int, steps: int = 5) -> dict:
    """Stage-1 samples/s through the training loop itself (``train.run_loop`` with ``stage1.make_step_fn``, as
    ``stage1.train_stage1`` runs it; best step after the first) and this process's peak RSS / CUDA memory."""
    bb, _ = foundation.load_foundation(foundation_dir())
    names = sorted(DATASETS)
    items = [make_item(names[i % len(names)], 0, "train", i, HARD_FRACTION) for i in range(64)]
    data = [(it, " ".join(it.gold_steps) if it.needs_reasoning else None) for it in items]
    cfg = stage1.Stage1Config(batch_size=batch, chunk_size=chunk, length_buckets=buckets,
                              loop=LoopConfig(steps=steps, lr=1e-5, warmup=0, log_every=1, ckpt_every=10 ** 6))
    with tempfile.TemporaryDirectory() as tmp:
        run_loop(stage1.Stage1Model(bb.model), stage1.make_step_fn(bb, data, cfg, seed=0), cfg.loop, tmp,
                 resume=False, desc="bench stage 1")
        wall = [m["wall_s"] for m in read_metrics(tmp)]
    step_s = min(b - a for a, b in zip(wall, wall[1:]))
    return {"samples_per_s": batch / step_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **({"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2 ** 20} if torch.cuda.is_available() else {})}


def gate_span_reuse(backbone, n: int = 16, max_new_tokens: int = 32, repeats: int = 3) -> dict:
    """An opened query, alone (batch size 1): the gate's prefill, then a fresh generation that prefills the
    prompt again (the earlier adaptive path), vs the span continued from the gate's own KV cache
    (``gating.gate_and_spans``). The two are timed back to back on each query, ``repeats`` times over ``n``
    mixed queries; medians (ms) and the median of the per-query ratios. ``same_spans`` checks both wrote
    the same tokens. Paired medians, because best-of-3 totals swung between runs (docs/research-log.md,
    Evaluation: paired medians)."""
    names = sorted(DATASETS)
    inputs = [item_query(make_item(names[i % len(names)], 0, "eval", i, HARD_FRACTION)) for i in range(n)]
    fresh, cont, same = [], [], True
    for r in range(repeats + 1):  # the first pass warms up
        for x in inputs:
            t0 = time.perf_counter()
            gate_forward(backbone, [x])
            a = generate_rationales(backbone, [x], max_new_tokens).ids[0]
            t1 = time.perf_counter()
            b = gate_and_spans(backbone, [x], -1.0, max_new_tokens).spans.ids[0]
            t2 = time.perf_counter()
            same &= a == b
            if r:
                fresh.append(t1 - t0)
                cont.append(t2 - t1)
    fresh, cont = 1000 * np.array(fresh), 1000 * np.array(cont)
    return {"queries": n, "max_new_tokens": max_new_tokens, "repeats": repeats, "same_spans": bool(same),
            "gate_then_fresh_generation_ms": float(np.median(fresh)), "gate_continued_ms": float(np.median(cont)),
            "fresh_over_continued": float(np.median(fresh / cont))}


def training_throughput(batch: int = 32, chunk: int = 8) -> dict:
    """Stage-1 training samples/s and peak memory (:func:`stage1_steps`, each in a fresh process so that its
    max RSS is its own): unchunked (forwards in
    length buckets, the default), unchunked as one padded batch, and GradCache chunks."""
    res = {}
    nb = stage1.Stage1Config.length_buckets
    for name, c, b in (("unchunked", 0, nb), ("unchunked_one_padded_batch", 0, 1), (f"chunked_{chunk}", chunk, nb)):
        call = f"import json; from mmemb_lab.bench import stage1_steps; print(json.dumps(stage1_steps({c}, {batch}, {b})))"
        r = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, check=True)
        res[name] = json.loads(r.stdout.strip().splitlines()[-1])
    res["batch"] = batch
    res["length_buckets"] = nb
    res["note"] = ("peak RSS includes the Python/torch baseline of ~0.5 GB; on CPU activation memory is a small "
                   "share for this 2.5M model, so the chunking saving is visible mostly at scale")
    return res


def foundation_throughput(steps: int = 4) -> dict:
    """Stage-0 optimiser steps/s of the tiny spec at the default batch sizes, every term on (descriptions
    and skills with the search-attention term, contrastive with bag of words), on this process's device."""
    cfg = foundation.FoundationConfig()
    tok = PreTrainedTokenizerFast.from_pretrained(foundation_dir(), padding_side="left")
    backbone = build_tiny(cfg.spec, tok)
    stage = foundation.Stage0(backbone)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    fn = foundation.make_step_fn(backbone, cfg, seed=0)
    times = []
    for k in range(steps + 1):  # the first step warms up (and switches to the eager attention)
        t = time.perf_counter()
        out = fn(cfg.search_phase + k, stage)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    best = min(times[1:])
    return {"device": str(backbone.device), "steps_per_s": 1 / best, "s_per_step": best,
            "batch": {"gen": cfg.gen_batch_nce, "nce_pairs": cfg.nce_batch, "hard_negatives": cfg.hard_negatives}}


def run_bench(out: str | Path = "runs/bench") -> dict:
    backbone, _ = foundation.load_foundation(foundation_dir())
    res = {"machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                       "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else False,
                       "torch": torch.__version__},
           "backbone": {"arch": backbone.arch, "params": sum(p.numel() for p in backbone.model.parameters())},
           "embedding_direct": embedding_throughput(backbone),
           "counterfactual_scoring": counterfactual_throughput(backbone),
           "gate_span_reuse": gate_span_reuse(backbone),
           "stage1_training": training_throughput(),
           "stage0_training": foundation_throughput(),
           "paper_memory_estimate_gb": {k: v for k, v in memory_estimate().items() if k != "preset"}}
    try:
        res["evaluation"] = harness_bench(backbone)
    except ImportError:  # the harness arrives with the MMEB-V2 evaluation work
        pass
    out = Path(out)
    atomic_write_text(out / "bench.json", json.dumps(res, indent=1))
    return res
