"""The main job, end to end on one preset: world -> foundation -> selection -> fine-tuning -> evaluation.

What ``make demo`` runs (``python -m mmemb_lab demo --seed S --out DIR``). Every step writes its
outputs under ``DIR`` and resumes where a killed run stopped (the world and the foundation are reused
when present, fine-tuning continues from its last checkpoint). Writes ``DIR/config.json`` (the resolved
config), ``DIR/summary.json`` (the numbers, see the issue tracker for its schema) and figures under
``DIR/figures`` and ``figures/``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .evaluate import evaluate
from .figures import description_accuracy as description_figure
from .figures import easy_hard_by_dataset, gain_by_worker, gain_scatter, save_figure, selection_outcome, training_curves
from .finetune import finetune
from .foundation import description_accuracy, load_foundation, train_foundation
from .paths import foundation_dir, worlds_dir
from .presets import PRESETS, RunConfig
from .selection import gold_rationale_gain, run_selection, selection_summary
from .train import atomic_write_text, read_metrics
from .world.build import build_world, toy_registry

log = logging.getLogger(__name__)


def world_summary(info: dict) -> dict:
    keep = ("modality", "meta_task", "n_eval", "n_candidates", "hard_fraction", "eval_type", "metric")
    return {"datasets": {k: {f: d[f] for f in keep} for k, d in info["datasets"].items()},
            "config": info["config"]}


def run_demo(seed: int = 0, out: str | Path = "runs/demo", preset: str = "tiny", foundation: str | Path | None = None,
             world_dir: str | Path | None = None, progress: bool = True) -> dict:
    t0 = time.time()
    cfg: RunConfig = PRESETS[preset](seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps({"seed": seed, **cfg.to_dict()}, indent=1, default=str))
    run_name = f"{out.name} ({preset}, seed {seed})"

    root = Path(world_dir) if world_dir else worlds_dir() / f"{preset}-seed{seed}"
    log.info("[1/5] toy world -> %s", root)
    info = build_world(root, cfg.world, progress=progress)

    fpath = Path(foundation) if foundation else foundation_dir()
    if not (fpath / "foundation.json").exists():
        log.warning("no foundation model at %s: training stage 0 (about 20 minutes on 2 cores)", fpath)
        train_foundation(fpath)
    log.info("[2/5] stage-0 foundation from %s: measuring what it sees on held-out items", fpath)
    backbone, meta = load_foundation(fpath)
    seen = description_accuracy(backbone, seed=10_000 + seed, n=cfg.description_items)

    registry = toy_registry(info)
    figs = {}
    selection_block = None
    if cfg.selection.n_per_dataset > 0:
        log.info("[3/5] candidate rationales from %d workers, counterfactual selection (stage-0 evaluator)",
                 5 if cfg.selection.own_worker else 4)
        table, sels, _ = run_selection(backbone, seed, cfg.world.hard_fraction, cfg.selection, out / "selection",
                                       progress=progress)
        main = sels[cfg.selection.variant]
        selection_block = selection_summary(main, {k: v for k, v in sels.items() if k != cfg.selection.variant})
        selection_block["gold_rationale_gain_hard"] = gold_rationale_gain(backbone, root, registry)["mean"]
        figs.update({"selection_gain_scatter": gain_scatter(table, cfg.selection.tau),
                     "selection_gain_by_worker": gain_by_worker(table, cfg.selection.variant),
                     "selection_outcome": selection_outcome(main)})
    if cfg.finetune.loop.steps > 0:
        log.info("[4/5] contrastive fine-tuning (%d steps)", cfg.finetune.loop.steps)
        finetune(backbone, root, list(registry), out / "finetune", cfg.finetune, seed=seed)
    log.info("[5/5] evaluating (direct embeddings)")
    direct = evaluate(backbone, root, registry, "direct", out_dir=out / "eval", latency_sample=cfg.latency_sample,
                      progress=progress)

    summary = {
        "preset": preset, "seed": seed, "world": world_summary(info),
        "foundation": {"path": str(fpath), "fingerprint": meta["fingerprint"], "description_accuracy": seen},
        "eval": {"direct": direct.summary()},
        **({"selection": selection_block} if selection_block else {}),
        "backbone": {"arch": backbone.arch, "source": backbone.source, "video_mode": backbone.video_mode,
                     "params": sum(p.numel() for p in backbone.model.parameters())},
        "wall_s": time.time() - t0,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    figs.update({"direct_easy_vs_hard": easy_hard_by_dataset(summary["eval"]["direct"]),
                 "foundation_description_accuracy": description_figure(seen)})
    ft_metrics = read_metrics(out / "finetune")
    if ft_metrics:
        figs["finetune_curve"] = training_curves(ft_metrics, keys=("loss",), title="Contrastive fine-tuning")
    for name, fig in figs.items():
        save_figure(fig, name, run=run_name, directory=out / "figures")
        save_figure(fig, name, run=run_name)
    return summary
