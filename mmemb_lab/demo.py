"""The main job, end to end on one preset: world -> foundation -> selection -> stage 1 -> stage 2 -> evaluation.

What ``make demo`` runs (``python -m mmemb_lab demo --seed S --out DIR``). Every step writes its
outputs under ``DIR`` and resumes where a killed run stopped (the world and the foundation are reused
when present, fine-tuning continues from its last checkpoint). Writes ``DIR/config.json`` (the resolved
config), ``DIR/summary.json`` (the numbers) and figures under ``DIR/figures`` (never into the repository's
``figures/``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from dataclasses import replace
from pathlib import Path

from .eval.harness import evaluate
from .figures import description_accuracy as description_figure
from .figures import gain_by_worker, gain_scatter, run_figures, save_figures, selection_outcome
from .method.selection import gold_rationale_gain, run_selection, selection_summary
from .method.stage2 import retime_fixed_modes, run_stage2
from .model.inference import MAX_NEW_TOKENS
from .paths import foundation_dir, worlds_dir
from .pipeline import STAGES, apply_overrides, load_stage_figures, run_stage, save_stage_figures
from .presets import PRESETS, RunConfig
from .runs import Manifest, RunFolder, atomic_write_text, file_digest
from .summary import FoundationSummary, GateSummary, ModeScores, SelectionSummary, Stage1Summary, Stage2Summary, Summary
from .train.foundation import description_accuracy, load_foundation, skill_accuracy, train_foundation
from .world.build import build_world, toy_registry

log = logging.getLogger(__name__)


def world_summary(info: dict) -> dict:
    keep = ("modality", "meta_task", "n_eval", "n_val", "n_candidates", "hard_fraction", "eval_type", "metric")
    return {"datasets": {k: {f: d[f] for f in keep} for k, d in info["datasets"].items()},
            "config": info["config"]}


def run_demo(seed: int = 0, out: str | Path = "runs/demo", preset: str = "tiny", foundation: str | Path | None = None,
             world_dir: str | Path | None = None, progress: bool = True, overrides: dict | None = None,
             only: str | None = None) -> Summary:
    """Run (or resume) the demo into ``out``: the stages of ``pipeline.STAGES``, each in its own folder with
    its own manifest, then ``summary.json`` and the figures.

    ``out`` is a run folder (``runs.RunFolder``) for one preset, seed and foundation; a folder made from
    another is moved aside whole. Inside it a stage whose settings and inputs are unchanged is skipped, and
    a changed setting reruns that stage and the ones after it (``pipeline.run_stage``). ``overrides`` sets
    config fields by dotted path (``{"stage2.rl.steps": 40}``). ``only`` runs that one stage (the stages
    before it must be done: ``pipeline.StageNotDone``) and rebuilds the summary."""
    cfg: RunConfig = apply_overrides(PRESETS[preset](seed), overrides or {})
    if only is not None and only not in STAGES:
        raise ValueError(f"only={only!r}: not a stage ({', '.join(STAGES)})")
    fpath = Path(foundation) if foundation else foundation_dir()
    weights = fpath / "model.safetensors"
    manifest = Manifest.make("demo", {"preset": preset}, seed,
                             {"foundation": file_digest(weights) if weights.exists() else "to be trained"})
    with RunFolder(out, manifest, overwrite=True):
        return _run_demo(seed, Path(out), preset, cfg, fpath, world_dir, progress, only)


def _run_demo(seed: int, out: Path, preset: str, cfg: RunConfig, fpath: Path, world_dir: str | Path | None,
              progress: bool, only: str | None) -> Summary:
    t0 = time.time()
    atomic_write_text(out / "config.json", json.dumps({"seed": seed, **cfg.to_dict()}, indent=1, default=str))
    run_name = f"{out.name} ({preset}, seed {seed})"

    root = Path(world_dir) if world_dir else worlds_dir() / f"{preset}-seed{seed}"
    log.info("[1/7] toy world -> %s", root)
    info = build_world(root, cfg.world, progress=progress)
    if not (fpath / "foundation.json").exists():
        log.warning("no foundation model at %s: training stage 0 in this process (about 2.3 hours on 2 cores with "
                    "the 2 processes of `make foundation`)", fpath)
        train_foundation(fpath)
    registry = toy_registry(info)
    found = {"foundation": file_digest(fpath / "model.safetensors")}
    loaded: dict = {}

    def foundation_model():
        if "backbone" not in loaded:
            loaded["backbone"], loaded["meta"] = load_foundation(fpath)
        return loaded["backbone"]

    def may(stage: str) -> bool:
        return only is None or only == stage

    def stage0(folder: Path) -> dict:
        log.info("[2/7] stage-0 foundation from %s: measuring what it sees on held-out items", fpath)
        backbone = foundation_model()
        seen = description_accuracy(backbone, seed=10_000 + seed, n=cfg.description_items)
        skills = skill_accuracy(backbone, seed=20_000 + seed, n=max(4, cfg.description_items // 2))
        log.info("[3/7] stage-0 direct evaluation (the pretrained model, before any reasoning training)")
        direct = evaluate(backbone, root, registry, "stage0_direct", out_dir=folder,
                          latency_sample=cfg.latency_sample, progress=progress)
        return {"stage0_direct": direct.summary(), "description_accuracy": seen, "skill_accuracy": skills,
                "fingerprint": loaded["meta"]["fingerprint"],
                "backbone": {"arch": backbone.arch, "source": backbone.source, "video_mode": backbone.video_mode,
                             "params": sum(p.numel() for p in backbone.model.parameters())}}

    world_cfg = {"world": cfg.world}
    s0 = run_stage("stage0", out / "eval", {**world_cfg, "description_items": cfg.description_items,
                                            "latency_sample": cfg.latency_sample}, seed, found, stage0, may("stage0"))
    evals = {"stage0_direct": s0.result["stage0_direct"]}
    selection_block, stage1_block, gate_block, stage2_block, sel = None, None, None, None, None
    figs = {}  # the stages' own figures; the rest are drawn from the summary (``figures.run_figures``)
    if cfg.selection.n_per_dataset > 0:
        def select(folder: Path) -> dict:
            log.info("[4/7] candidate rationales from %d workers, counterfactual selection (stage-0 evaluator)",
                     5 if cfg.selection.own_worker else 4)
            backbone = foundation_model()
            table, sels, _ = run_selection(backbone, seed, cfg.world.hard_fraction, cfg.selection, folder,
                                           progress=progress)
            main = sels[cfg.selection.variant]
            block = selection_summary(main, {k: v for k, v in sels.items() if k != cfg.selection.variant})
            gold = gold_rationale_gain(backbone, root, registry)
            block["gold_rationale_gain_hard"] = gold["mean"]
            block["gold_rationale_hard_per_dataset"] = {"direct": gold["direct"], "gold": gold["gold"]}
            save_stage_figures(folder, {"selection_gain_scatter": gain_scatter(table, cfg.selection.tau),
                                        "selection_gain_by_worker": gain_by_worker(table, cfg.selection.variant),
                                        "selection_outcome": selection_outcome(main)})
            return block

        sel = run_stage("selection", out / "selection", {**world_cfg, "selection": cfg.selection}, seed, found,
                        select, may("selection"))
        selection_block = sel.result
        figs.update(load_stage_figures(sel.folder))
    if sel is not None and cfg.stage1.loop.steps > 0:
        def stage1(folder: Path) -> dict:
            log.info("[5/7] stage 1 (%d steps): selected rationales, and the random-worker ablation side by side",
                     cfg.stage1.loop.steps)
            return run_arms(str(fpath), str(root), info, str(sel.folder), folder, cfg, seed)

        s1 = run_stage("stage1", out / "stage1", {**world_cfg, "stage1": cfg.stage1, "baselines": cfg.baselines,
                                                  "latency_sample": cfg.latency_sample}, seed,
                       {**found, "selection": sel.digest}, stage1, may("stage1"))
        arms = s1.result
        ours, abl = arms["selected"], arms["random_worker"]
        evals.update({"direct": ours["direct"], "always": ours["always"], "oracle": ours["oracle"]})
        baselines = {}
        for name, mode in (("baseline_direct", "direct"), ("baseline_always", "always")):
            if name in arms:
                evals[name] = arms[name][mode] | {"trained_rationales": arms[name]["rationales"],
                                                  "train_wall_s": arms[name]["train_wall_s"]}
                baselines[name] = (str(s1.folder / name / "model"), mode)
        stage1_block = {
            "steps": ours["steps"], "train_wall_s": ours["train_wall_s"],
            "rationale_sensitivity": ours["rationale_sensitivity"],
            "rationale_step_accuracy": ours["rationale_step_accuracy"],
            "rationale_answer_accuracy": ours["rationale_answer_accuracy"],
            "rationale_examples": ours["rationale_examples"],
            "ablation_random_worker": {
                "steps": abl["steps"], "train_wall_s": abl["train_wall_s"],
                "rationale_sensitivity": abl["rationale_sensitivity"],
                "rationale_step_accuracy": abl["rationale_step_accuracy"],
                "always": {k: abl["always"][k] for k in ("overall", "easy", "hard")}},
        }
        if cfg.run_stage2:
            def stage2(folder: Path) -> dict:
                log.info("[6/7] stage 2: GRPO (%d steps) teaches the gate when to reason; adaptive evaluation "
                         "and sweep", cfg.stage2.rl.steps)
                return run_stage2(s1.folder / "selected" / "model", root, registry, folder, cfg.stage2, seed,
                                  cfg.world.hard_fraction, seed, cfg.latency_sample, progress, baselines)

            s2 = run_stage("stage2", out / "stage2", {**world_cfg, "stage2": cfg.stage2,
                                                      "latency_sample": cfg.latency_sample}, seed,
                           {"stage1": s1.digest}, stage2, may("stage2")).result
            evals = retime_fixed_modes(evals | s2["eval"], s2["gate"]["latency"])
            gate_block, stage2_block = s2["gate"], s2["stage2"]
            gate_block["oracle_gain_captured"] = oracle_gain_captured(evals)
    else:
        log.info("[5/7] (no stage 1 in this preset)")
    log.info("[7/7] writing summary and figures")
    if "direct" not in evals:
        evals["direct"] = evals["stage0_direct"]

    seen, skills = s0.result["description_accuracy"], s0.result["skill_accuracy"]
    typed = lambda block, kind: kind.from_json(block) if block else None  # noqa: E731
    summary = Summary(
        preset=preset, seed=seed, world=world_summary(info),
        foundation=FoundationSummary(path=str(fpath), fingerprint=s0.result["fingerprint"],
                                     description_accuracy=seen, skill_accuracy=skills),
        eval={mode: ModeScores.from_json(d) for mode, d in evals.items()},
        selection=typed(selection_block, SelectionSummary), stage1=typed(stage1_block, Stage1Summary),
        gate=typed(gate_block, GateSummary), stage2=typed(stage2_block, Stage2Summary),
        backbone=s0.result["backbone"], wall_s=time.time() - t0)
    summary.save(out / "summary.json")
    figs.update(run_figures(out, summary))
    figs.update({"foundation_description_accuracy": description_figure(seen),
                 "foundation_skill_accuracy": description_figure(
                     skills, title="Stage 0: single-step skills (the hops a rationale chains)")})
    save_figures(figs, out / "figures", run=run_name)  # the run's own folder only: one run never overwrites another's
    return summary


def _arm_entry(args: tuple) -> dict:
    from .method.stage1 import run_arm

    return run_arm(*args)


def _num(x, spec: str) -> str:
    """``x`` formatted, or "n/a" where the summary has none (a gate that never opened has no precision)."""
    return "n/a" if x is None else format(x, spec)


def oracle_gain_captured(evals: dict) -> float | None:
    """(adaptive - direct) / (oracle - direct), overall: the share of the per-query oracle's gain over the
    direct mode that the gate realises (both fixed modes and the oracle from the stage-1 model)."""
    d, o, a = (evals.get(k, {}).get("overall") for k in ("direct", "oracle", "adaptive"))
    if None in (d, o, a) or o - d <= 0:
        return None
    return (a - d) / (o - d)


def latency_check(adaptive: ModeScores, always: ModeScores, timed: dict) -> str:
    """The cost line, adaptive <= (invocation rate + 0.1) x always, and what it is made of.

    The bound takes the invocation rate over every evaluation query, but latency is timed on a sample
    (``latency_sample`` queries per dataset, ``gate["latency"]``). So the line also shows the sample's own
    share of opened queries, and what an opened query cost beside the always mode on the same queries."""
    bound = (adaptive.invocation_rate + 0.1) * always.latency_ms_per_query
    ok = adaptive.latency_ms_per_query <= bound
    text = (f"cost line: adaptive {adaptive.latency_ms_per_query:.1f} ms "
            f"{'<=' if ok else '>'} (invocation {adaptive.invocation_rate:.2f} + 0.1) x always "
            f"{always.latency_ms_per_query:.1f} = {bound:.1f} ms ({'met' if ok else 'NOT met'}); "
            f"on the {timed['n']} timed queries the gate opened on {timed['invoked_share']:.2f}")
    if timed.get("invoked_ms") is not None:
        text += (f", an opened one cost {timed['invoked_ms']:.1f} ms "
                 f"(always on the same queries {timed['always_ms_on_invoked']:.1f})")
    return text


def format_summary(summary: Summary) -> str:
    """A plain-text digest of a demo's summary: every mode's scores and latency, then what selection
    kept, where the gate opened and what it cost (printed at the end of ``make demo``)."""
    ev = summary.eval
    lines = [f"{'mode':14s} {'overall':>8s} {'easy':>6s} {'hard':>6s} {'ms/query':>9s}  reasoning invoked"]
    for mode in ("stage0_direct", "baseline_direct", "baseline_always", "direct", "always", "oracle",
                 "adaptive_stage1", "adaptive"):
        if mode not in ev:
            continue
        d = ev[mode]
        inv = {"stage0_direct": "never", "direct": "never", "always": "always",
               "baseline_direct": "never (trained without rationales)",
               "baseline_always": "always (trained to reason on every pair)",
               "oracle": "where it helps (needs the positive: an upper bound)"}.get(mode)
        if mode == "adaptive_stage1":
            inv = f"{d.invocation_rate:.2f} (the stage-1 model's own gate, before GRPO)"
        if mode == "adaptive":
            inv = (f"{d.invocation_rate:.2f} (easy {d['invocation_rate_easy']:.2f}, hard "
                   f"{d['invocation_rate_hard']:.2f}); p50 / p95 {d['latency_ms_p50']:.1f} / "
                   f"{d['latency_ms_p95']:.1f} ms")
        lines.append(f"{mode:14s} {d.overall:8.1f} {d.easy:6.1f} {d.hard:6.1f} "
                     f"{d.latency_ms_per_query:9.1f}  {inv}")
    sel = summary.selection
    if sel:
        lines.append(f"selection ({sel['variant']}, tau {sel.tau:.2f}): "
                     f"precision {_num(sel.precision, '.3f')}; "
                     f"no reasoning on {sel['no_reasoning_rate_easy']:.2f} of easy / "
                     f"{sel['no_reasoning_rate_hard']:.2f} of hard pairs; "
                     f"the gold rationale adds {sel['gold_rationale_gain_hard']:+.1f} on hard items")
        if sel.recall_on_opportunity is not None:
            share = sel.selected_share_by_worker
            lines.append(f"  recall on opportunity {_num(sel.recall_on_opportunity, '.2f')}; selections from "
                         f"format_only {share.get('format_only', 0):.3f}, hallucinating "
                         f"{share.get('hallucinating', 0):.3f}; worker step accuracy: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in sel.worker_step_accuracy.items()))
        per = sel.no_reasoning_rate_hard_per_dataset
        if per:
            lines.append("  no reasoning on hard pairs, per dataset: "
                         + ", ".join(f"{k.removeprefix('toy_')} {v:.2f}" for k, v in per.items()))
    gate = summary.gate
    if gate:
        choice = gate.threshold_choice
        how = {m: c["threshold"] for m, c in choice.items() if c.get("split") == "val"}
        if how:
            step = choice.get("stage2", {}).get("step")
            lines.append("thresholds chosen on the validation split (best overall there): after GRPO "
                         f"{how.get('stage2')}" + (f" (at GRPO step {step})" if step is not None else "")
                         + f", stage-1 gate {how.get('stage1')}")
        lines.append(f"gate (threshold {gate.threshold}): precision / recall vs needs_reasoning "
                     f"{_num(gate['precision_vs_needs_reasoning'], '.2f')} / "
                     f"{_num(gate['recall_vs_needs_reasoning'], '.2f')}; "
                     + ("the gate never closed" if gate["latency_ms_not_invoked"] is None
                        else f"a closed gate costs {gate['latency_ms_not_invoked']:.1f} ms"))
        if "adaptive" in ev and "always" in ev:
            lines.append(latency_check(ev["adaptive"], ev["always"], gate.latency))
            lat = gate.latency
            if "mixed_cost_ratio" in lat:
                lines.append(f"mixed cost: adaptive {lat['adaptive_ms']:.1f} ms / ((1 - s) direct + s always = "
                             f"{lat['mixed_cost_ms']:.1f} ms) = {lat['mixed_cost_ratio']:.2f} on {lat['n']} queries "
                             f"timed together (s = {lat['invoked_share']:.2f} there, {lat['invoked_share_eval']:.2f} "
                             "on the whole eval set)")
        if gate.oracle_gain_captured is not None:
            lines.append(f"oracle gain captured: (adaptive - direct) / (oracle - direct) = "
                         f"{gate.oracle_gain_captured:.2f}")
    lines.append("foundation sees: " + ", ".join(f"{k} {v:.3f}"
                                                 for k, v in summary.foundation.description_accuracy.items()))
    return "\n".join(lines)


def run_arms(foundation: str, world_root: str, info: dict, selection_dir: str, out: Path, cfg: RunConfig,
             seed: int) -> dict[str, dict]:
    """Stage 1 with selected rationales (ours), with random-worker rationales (ablation) and, with
    ``cfg.baselines``, the two baselines trained for their own mode on the same pairs and steps: no
    rationales (``baseline_direct``) and a rationale on every pair (``baseline_always``). In two processes of
    one thread each (two 1-thread processes use 2 cores better than one 2-thread): ours then the direct
    baseline here, the ablation then the always baseline in the other."""

    from .method.stage1 import run_arm

    common = (world_root, info, selection_dir)
    threads = 1 if cfg.parallel_arms else None

    def args(name: str, rationales: str, full_eval: bool, only: str | None = None) -> tuple:
        return (foundation, *common, str(out / name), replace(cfg.stage1, rationales=rationales), seed,
                cfg.world.hard_fraction, seed, threads, full_eval, cfg.latency_sample, MAX_NEW_TOKENS, only)

    here = [("selected", args("selected", "selected", True))]
    there = [("random_worker", args("random_worker", "random_worker", False))]
    if cfg.baselines:
        here.append(("baseline_direct", args("baseline_direct", "none", False, "direct")))
        there.append(("baseline_always", args("baseline_always", "always", False, "always")))
    arms = {}
    if cfg.parallel_arms:
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            pending = [(name, pool.apply_async(_arm_entry, (a,))) for name, a in there]
            for name, a in here:
                arms[name] = run_arm(*a)
            for name, p in pending:
                arms[name] = p.get()
            pool.close()  # let the worker exit on its own: terminating it leaks tqdm's lock (a semaphore warning)
            pool.join()
    else:
        for name, a in here + there:
            arms[name] = _arm_entry(a)
    return arms
