"""Stage 2 in the main job: GRPO on the stage-1 model, then the adaptive gate measured against direct and always.

Concept (docs/method.md, steps 4-5)
    ``mmemb_lab.method.rl`` teaches the first assistant token to choose between ``<think>`` and ``<|emb|>``;
    ``mmemb_lab.method.gate`` reads that choice from the same prefill that gives the direct embedding. This
    module runs the two on a trained stage-1 model and measures what a user of the gate cares about:

    - ``eval.adaptive``: the usual scores, plus how often the gate opens (overall, easy, hard, per
      meta-task), tokens generated and latency per query (mean, p50, p95);
    - ``gate``: precision / recall of the openings against the world's ``needs_reasoning`` and against
      the oracle's choice (reason exactly where the model's own rationale beats its direct embedding),
      the cost of a query on which the gate stays shut, and the threshold sweep (``gate.sweep``).

    Latency is measured on one machine state for every mode: the same sampled queries are timed one at a
    time, interleaved, as direct, always and adaptive on the model after RL, and as direct and always on the
    stage-1 model. The demo reports the stage-1 timings as ``eval.direct`` / ``eval.always`` latency
    (:func:`retime_fixed_modes`). So the ratios ("does a shut gate cost what the direct path costs?", "does
    cost follow invocation?") do not mix processes, thread counts or loads.

Used by: the demo (step 6), notebook 05.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data import eval_split_dir
from ..eval.scoring import BenchmarkResult, aggregate_results, mixed_cost, prediction_ids, write_dataset
from ..model.backbone import THINK_OPEN, Backbone, load_backbone
from ..model.embed import embed
from ..model.gating import AdaptiveEncoder
from ..model.inference import LATENCY_SAMPLE, MAX_NEW_TOKENS, THRESHOLD, ReasoningEncoder
from ..runs import atomic_write_text
from .gate import GatePass, choose_step_and_threshold, choose_threshold, gate_pass, gate_precision_recall, sweep_points
from .rl import RLConfig, read_decision_rows, read_rl_run, toy_rl_pairs, train_rl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage2Config:
    rl: RLConfig = field(default_factory=RLConfig)
    """GRPO settings (``mmemb_lab.method.rl.RLConfig``, whose defaults are ours). The decision alone trains (the direct path and the
    rationale writer cannot change), each opening is scored with the greedy rationale inference writes,
    and advantages are not divided by the group's std (Dr. GRPO). Why: with group-std scaling, or
    log-probability rewards, the gate shut everywhere (docs/research-log.md, Stage 2: the GRPO settings)."""
    n_per_dataset: int = 24
    """RL training queries per toy dataset (``train`` split, after the rows stage 1 used)."""
    probe_per_dataset: int = 8
    """Held-out training-split queries per dataset on which the invocation rate is tracked during RL."""
    threshold: float = THRESHOLD
    """The gate's threshold on p_open where the world has no validation split; with one, each gate's
    threshold is the best of ``thresholds`` on it (:func:`gate.choose_threshold`)."""
    thresholds: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
    """The sweep's thresholds (``gate.curve``), also the candidates of the validation choice. Up to 0.995
    because GRPO pushes p_open towards 1 (docs/research-log.md, Stage 2: the threshold chosen on validation)."""
    max_new_tokens: int = MAX_NEW_TOKENS
    """Generation budget of a rationale at inference."""
    train_offset: int = 5000
    """First ``train``-split index of the RL queries (stage 1 trained on indices below ``n_train``)."""
    step_choice: str = "val"
    """Which GRPO step's gate runs: "val" (ours: among the ``<think>`` rows kept at every probe step, step 0 being
    the stage-1 gate, the step and threshold with the best overall score on the validation split,
    :func:`gate.choose_step_and_threshold`) or "last" (the final step, the threshold alone chosen on
    validation). Why: on some seeds GRPO drove p_open to 1 on most queries and the last step's best validation
    score fell below the stage-1 gate's (docs/research-log.md, Stage 2: GRPO saturates p_open at 1)."""

    def __post_init__(self):
        if self.step_choice not in ("val", "last"):
            raise ValueError(f"unknown step_choice={self.step_choice!r}: 'val' or 'last'")


def reference_latency(backbone: Backbone, inputs: list, adaptive: AdaptiveEncoder,
                      max_new_tokens: int = MAX_NEW_TOKENS, stage1: Backbone | None = None,
                      extra: dict[str, Callable] | None = None) -> dict:
    """Time each input alone as direct, always and adaptive, interleaved (after one warm-up of each); with
    ``stage1``, that model's direct and always modes too (``stage1_direct_ms`` / ``stage1_always_ms``), in the
    same loop, so that every mode's latency is measured under the same load (:func:`retime_fixed_modes`);
    ``extra`` adds more named one-input encoders to the loop (the stage-1 gate, the baselines: ``<name>_ms``)."""
    always = ReasoningEncoder(backbone, max_new_tokens)
    modes = {"direct": lambda x: embed(backbone, [x]), "always": lambda x: always([x]),
             "adaptive": lambda x: adaptive([x])}
    if stage1 is not None:
        always1 = ReasoningEncoder(stage1, max_new_tokens)
        modes.update(stage1_direct=lambda x: embed(stage1, [x]), stage1_always=lambda x: always1([x]))
    modes.update(extra or {})
    for f in modes.values():
        f(inputs[0])
    times: dict[str, list[float]] = {k: [] for k in modes}
    invoked = []
    for x in inputs:
        for k, f in modes.items():
            t = time.perf_counter()
            f(x)
            times[k].append(1000 * (time.perf_counter() - t))
        invoked.append(adaptive.invoked[-1])
    a = np.array(times["adaptive"])
    inv = np.array(invoked)
    return {"n": len(inputs), "direct_ms": float(np.mean(times["direct"])), "always_ms": float(np.mean(times["always"])),
            "adaptive_ms": float(a.mean()), "adaptive_p50_ms": float(np.percentile(a, 50)),
            "adaptive_p95_ms": float(np.percentile(a, 95)), "invoked_share": float(inv.mean()),
            "not_invoked_ms": float(a[~inv].mean()) if (~inv).any() else None,
            "direct_ms_on_not_invoked": float(np.mean(np.array(times["direct"])[~inv])) if (~inv).any() else None,
            "invoked_ms": float(a[inv].mean()) if inv.any() else None,
            "always_ms_on_invoked": float(np.mean(np.array(times["always"])[inv])) if inv.any() else None,
            "mixed_cost_ms": mixed_cost(float(np.mean(times["direct"])), float(np.mean(times["always"])),
                                        float(inv.mean())),
            **{f"{k}_ms": float(np.mean(v)) for k, v in times.items() if k not in ("direct", "always", "adaptive")}}


def stratified_sample(gp: GatePass, threshold: float, n: int, seed: int = 0) -> tuple[list, float]:
    """``n`` evaluation queries to time, drawn so that the share on which the gate opens matches the whole
    evaluation set's (to within 1/(2n)): a sample that opens more or less often than the set would bias
    the adaptive mode's latency against the fixed modes'. Returns the sample and its share of opened
    queries by the gate pass (at batch size 1 a query near the threshold may fall the other way)."""
    opened, closed = [], []
    for dg in gp.per.values():
        for q, p in zip(dg.es.queries, dg.p):
            (opened if p > threshold else closed).append(q.query)
    n = min(n, len(opened) + len(closed))
    share = len(opened) / max(1, len(opened) + len(closed))
    k = min(len(opened), int(round(share * n)))
    rng = np.random.default_rng([seed, 31])
    pick = [opened[i] for i in sorted(rng.choice(len(opened), k, replace=False))] + \
           [closed[i] for i in sorted(rng.choice(len(closed), n - k, replace=False))]
    return [pick[i] for i in rng.permutation(len(pick))], k / max(1, n)  # a mixed order of datasets


def retime_fixed_modes(evals: dict, lat: dict) -> dict:
    """``eval.direct`` / ``always`` / ``oracle`` (the stage-1 model's modes) with the latency of
    :func:`reference_latency`'s stage-1 timings, which ran interleaved with the adaptive mode.

    Why: the demo evaluates the stage-1 model while the random-worker ablation arm trains and evaluates on the
    other core, so its own timings ran under another load than the adaptive mode's (docs/research-log.md,
    Evaluation: the fixed modes are re-timed), and the cost line compares the two. The earlier
    timing is kept as ``latency_ms_per_query_stage1_pass``. The oracle's latency is recomputed from the new
    direct and always timings with its reasoning share (``scoring.mixed_cost``)."""
    if "stage1_always_ms" not in lat:
        return evals
    out = dict(evals)
    for mode, key in (("direct", "stage1_direct_ms"), ("always", "stage1_always_ms"),
                      ("baseline_direct", "baseline_direct_ms"), ("baseline_always", "baseline_always_ms")):
        if mode in out and key in lat:
            out[mode] = out[mode] | {"latency_ms_per_query": lat[key],
                                     "latency_ms_per_query_stage1_pass": out[mode]["latency_ms_per_query"]}
    if "oracle" in out and out["oracle"].get("reasoned_share") is not None:
        ms = mixed_cost(lat["stage1_direct_ms"], lat["stage1_always_ms"], out["oracle"]["reasoned_share"])
        out["oracle"] = out["oracle"] | {"latency_ms_per_query": ms,
                                         "latency_ms_per_query_stage1_pass": out["oracle"]["latency_ms_per_query"]}
    return out


def gate_block(gp: GatePass, registry: dict, threshold: float) -> tuple[dict, dict]:
    """Per-query openings on every evaluation set; precision / recall against ``needs_reasoning`` and the
    oracle's choice (reasoning strictly better than the direct embedding for that query); invocation
    rates per dataset, meta-task, easy and hard."""
    inv_all, need_all, oracle_all = [], [], []
    per_dataset, per_meta = {}, {}
    for name, dg in gp.per.items():
        info = registry[name]
        inv, need = dg.p > threshold, dg.hard
        oracle = dg.score(np.ones(len(dg.p), bool)).per_query > dg.score(np.zeros(len(dg.p), bool)).per_query
        inv_all.append(inv), need_all.append(need), oracle_all.append(oracle)
        per_dataset[name] = {"invocation_rate": float(inv.mean()),
                             "easy": float(inv[~need].mean()) if (~need).any() else None,
                             "hard": float(inv[need].mean()) if need.any() else None,
                             "mean_p_open": float(dg.p.mean())}
        per_meta.setdefault(f"{info.modality}/{info.meta_task}", []).append(inv)
    inv, need, oracle = map(np.concatenate, (inv_all, need_all, oracle_all))
    pn, rn = gate_precision_recall(inv, need)
    po, ro = gate_precision_recall(inv, oracle)
    rates = {"invocation_rate": float(inv.mean()),
             "invocation_rate_easy": float(inv[~need].mean()) if (~need).any() else None,
             "invocation_rate_hard": float(inv[need].mean()) if need.any() else None,
             "invocation_rate_per_meta_task": {k: float(np.concatenate(v).mean()) for k, v in per_meta.items()}}
    gate = {"threshold": threshold, "precision_vs_needs_reasoning": pn, "recall_vs_needs_reasoning": rn,
            "precision_vs_oracle": po, "recall_vs_oracle": ro, "oracle_reason_rate": float(oracle.mean()),
            "invocation_per_dataset": per_dataset}
    return rates, gate


def mode_results(gp: GatePass, registry: dict, threshold: float, lat: dict) -> dict[str, BenchmarkResult]:
    """direct / always / adaptive scores from one gate pass (the pass reasoned for every query)."""
    out = {}
    for mode, pick, ms in (("direct", lambda dg: np.zeros(len(dg.p), bool), lat["direct_ms"]),
                           ("always", lambda dg: np.ones(len(dg.p), bool), lat["always_ms"]),
                           ("adaptive", lambda dg: dg.p > threshold, lat["adaptive_ms"])):
        per = {name: dg.score(pick(dg)) for name, dg in gp.per.items()}
        n = sum(len(dg.p) for dg in gp.per.values())
        tokens = sum(float(dg.tokens[pick(dg)].sum()) for dg in gp.per.values()) / n
        share = sum(int(pick(dg).sum()) for dg in gp.per.values()) / n
        batched = gp.batched_ms["gate"] + share * gp.batched_ms["reason"]
        out[mode] = _gate_mode_result(mode, per, registry, ms, batched, tokens, share)
    return out


def run_stage2(stage1_model: str | Path, world_root, registry: dict, out_dir: str | Path, cfg: Stage2Config,
               world_seed: int, hard_fraction: float, seed: int = 0, latency_sample: int = LATENCY_SAMPLE,
               progress: bool = True, baselines: dict[str, tuple[str | Path, str]] | None = None) -> dict:
    """GRPO from the stage-1 model (skipped when ``out_dir/model`` exists: a killed run resumes after it),
    then every measurement of ``eval.adaptive`` and ``gate``. Returns {"eval": {...}, "gate": {...},
    "stage2": {...}}; writes ``stage2.json`` under ``out_dir``.

    One gate pass reasons for every evaluation query, so direct, always, adaptive and every threshold of
    the sweep are scored from the same embeddings; latency is timed separately at batch size 1, the
    stage-1 model's direct and always modes interleaved with the adaptive one (``gate.latency``), on a
    sample whose gate-opening share matches the evaluation set's (:func:`stratified_sample`).

    Also measured: ``eval.adaptive_stage1``, the stage-1 model's own gate at the same threshold (what stage 1
    alone learned about when to reason), and with ``baselines`` ({name: (model folder, mode)}) each
    baseline's latency in its own mode, timed in the same loop (``gate.latency.<name>_ms``)."""
    out = Path(out_dir)
    model_dir = out / "model"
    source = _source_digest(Path(stage1_model), cfg, world_seed, hard_fraction, seed)
    done = json.loads((out / "rl_done.json").read_text()) if (out / "rl_done.json").exists() else {}
    if (model_dir / "mmemb_backbone.json").exists() and done.get("source") == source:
        log.info("stage 2: reusing the RL model in %s", model_dir)
        backbone = load_backbone(model_dir)
        rl_wall = done["wall_s"]
    else:
        if done:
            log.warning("stage 2: %s was trained from another stage-1 model or config; training again", model_dir)
        backbone = load_backbone(stage1_model)
        pairs = toy_rl_pairs(world_seed, hard_fraction, cfg.n_per_dataset, start=cfg.train_offset, seed=seed)
        probe = toy_rl_pairs(world_seed, hard_fraction, cfg.probe_per_dataset,
                             start=cfg.train_offset + cfg.n_per_dataset, seed=seed)
        res = train_rl(backbone, pairs, replace(cfg.rl, seed=seed), out / "rl", probe=probe, progress=progress)
        backbone.save(model_dir)
        rl_wall = res.wall_s
        atomic_write_text(out / "rl_done.json", json.dumps({"wall_s": rl_wall, "steps": res.steps_done,
                                                             "source": source}))
    history, invocation = read_rl_run(out / "rl")

    stage1 = load_backbone(stage1_model)
    choice = {"stage2": step_on_val(backbone, read_decision_rows(out / "rl"), world_root, registry, cfg, progress),
              "stage1": threshold_on_val(stage1, world_root, registry, cfg, progress)}
    if choice["stage2"].get("moved_row"):
        backbone.save(model_dir)  # the gate that runs is the chosen step's (atomic: a kill keeps the old folder)
        choice["stage2"].pop("moved_row")
    thr, thr1 = choice["stage2"]["threshold"], choice["stage1"]["threshold"]
    gp = gate_pass(backbone, world_root, registry, -1.0, cfg.max_new_tokens, latency_sample=latency_sample,
                   progress=progress)
    gp1 = gate_pass(stage1, world_root, registry, thr1, cfg.max_new_tokens, latency_sample=0,
                    progress=progress)
    sample, target_share = stratified_sample(gp, thr, latency_sample * len(registry), seed)
    adaptive1 = AdaptiveEncoder(stage1, thr1, cfg.max_new_tokens)
    extra = {"stage1_adaptive": lambda x: adaptive1([x])}
    for name, (path, mode) in (baselines or {}).items():
        extra[name] = _one_input_encoder(load_backbone(path), mode, cfg.max_new_tokens)
    lat = reference_latency(backbone, sample, AdaptiveEncoder(backbone, thr, cfg.max_new_tokens),
                            cfg.max_new_tokens, stage1=stage1, extra=extra)
    lat["invoked_share_eval"] = float(np.mean(np.concatenate([dg.p > thr for dg in gp.per.values()])))
    lat["invoked_share_sample_target"] = target_share
    lat["mixed_cost_ratio"] = lat["adaptive_ms"] / lat["mixed_cost_ms"]
    modes = mode_results(gp, registry, thr, lat)
    stage1_adaptive = _adaptive_only(gp1, registry, thr1, lat["stage1_adaptive_ms"])
    for name, ds in modes["adaptive"].per_dataset.items():
        dg = gp.per[name]
        opened = dg.p > thr
        write_dataset(out / "eval" / "adaptive", ds, prediction_ids([q.item_id for q in dg.es.queries]),
                      np.where(opened, dg.tokens, 0).astype(int).tolist(), opened.tolist())
    rates, gate = gate_block(gp, registry, thr)
    points = sweep_points(gp, registry, cfg.thresholds)
    adaptive_summary = modes["adaptive"].summary() | rates | {
        "latency_ms_p50": lat["adaptive_p50_ms"], "latency_ms_p95": lat["adaptive_p95_ms"], "threshold": thr}
    gate.update({"latency_ms_not_invoked": lat["not_invoked_ms"], "latency": lat,
                 "curve": [{k: v for k, v in p.summary().items() if k != "per_meta_task"} for p in points],
                 "threshold_choice": choice})
    rates1, _ = gate_block(gp1, registry, thr1)
    result = {
        "eval": {"adaptive": adaptive_summary,
                 "adaptive_stage1": stage1_adaptive.summary() | rates1 | {"threshold": thr1}},
        "gate": gate,
        "stage2": {"rl": asdict(cfg.rl) | {"n_queries": cfg.n_per_dataset * len(registry)}, "rl_wall_s": rl_wall,
                   "chosen_step": choice["stage2"].get("step"),
                   "after_rl": {"direct": _short(modes["direct"]), "always": _short(modes["always"])},
                   "invocation_during_rl": invocation,
                   "reward_during_rl": [{k: h.get(k) for k in ("step", "reward", "reward_std")} | _reward_terms(h)
                                        for h in history]},
    }
    atomic_write_text(out / "stage2.json", json.dumps(result, indent=1))
    return result


def step_on_val(backbone: Backbone, rows: dict[int, torch.Tensor], world_root, registry: dict, cfg: Stage2Config,
                progress: bool) -> dict:
    """With ``cfg.step_choice == "val"``, kept rows and a validation split: the GRPO step and threshold chosen
    together on validation (:func:`gate.choose_step_and_threshold`, from one pass that reasons for every
    validation query), and that step's row put into ``backbone`` (``moved_row`` says whether it changed).
    Otherwise :func:`threshold_on_val` on the model as it is."""
    has_val = all(eval_split_dir(world_root, name, info.eval_type, "val").exists() for name, info in registry.items())
    if cfg.step_choice != "val" or not rows or not has_val:
        return threshold_on_val(backbone, world_root, registry, cfg, progress) | {"step": max(rows, default=None)}
    gp = gate_pass(backbone, world_root, registry, -1.0, cfg.max_new_tokens, latency_sample=0, progress=progress,
                   split="val")
    c = choose_step_and_threshold(gp, backbone, rows, registry, cfg.thresholds)
    head, think = backbone.model.get_output_embeddings(), backbone.token_id(THINK_OPEN)
    if head.weight is backbone.model.get_input_embeddings().weight:
        raise ValueError(f"{backbone.source}: the output embedding is tied to the input one; a decision-only "
                         "stage 2 unties it, so this is not the model it trained")
    row = rows[c["step"]].to(head.weight.device, head.weight.dtype)
    moved = not torch.equal(head.weight[think].detach(), row)
    with torch.no_grad():
        head.weight[think] = row
    log.info("stage 2: GRPO step %d of %d chosen on validation (overall %.2f at threshold %s)", c["step"],
             max(rows), next(r["overall"] for r in c["per_step"] if r["step"] == c["step"]), c["threshold"])
    return {"threshold": c["threshold"], "step": c["step"], "split": "val",
            "rule": "best overall on val over (GRPO step, threshold); ties: fewest openings, then later step; "
                    "within a step, ties: highest threshold",
            "n_queries": sum(len(dg.p) for dg in gp.per.values()), "curve": c["curve"], "per_step": c["per_step"],
            "moved_row": moved}


def threshold_on_val(backbone: Backbone, world_root, registry: dict, cfg: Stage2Config, progress: bool) -> dict:
    """The gate's threshold for one model, chosen on the world's validation split: the best overall score
    among ``cfg.thresholds`` (:func:`gate.choose_threshold`), with the validation sweep that chose it. A world
    without a validation split keeps ``cfg.threshold`` (and says so in the log and the result)."""
    if not all(eval_split_dir(world_root, name, info.eval_type, "val").exists() for name, info in registry.items()):
        log.warning("stage 2: %s has no validation split; the gate's threshold stays %.2f", world_root, cfg.threshold)
        return {"threshold": cfg.threshold, "split": None, "rule": "configured (no validation split)"}
    gp = gate_pass(backbone, world_root, registry, min(cfg.thresholds), cfg.max_new_tokens, latency_sample=0,
                   progress=progress, split="val")
    points = sweep_points(gp, registry, cfg.thresholds)
    best = choose_threshold(points)
    return {"threshold": best.threshold, "split": "val", "rule": "best overall on val; ties: highest threshold",
            "n_queries": sum(len(dg.p) for dg in gp.per.values()),
            "curve": [{k: v for k, v in p.summary().items() if k not in ("per_meta_task", "latency_ms_per_query")}
                      for p in points]}


def _adaptive_only(gp: GatePass, registry: dict, threshold: float, latency_ms: float) -> BenchmarkResult:
    """The adaptive mode alone from a pass that reasoned only where the gate opens."""
    per = {name: dg.score(dg.p > threshold) for name, dg in gp.per.items()}
    n = sum(len(dg.p) for dg in gp.per.values())
    tokens = sum(float(dg.tokens[dg.p > threshold].sum()) for dg in gp.per.values()) / n
    share = sum(int((dg.p > threshold).sum()) for dg in gp.per.values()) / n
    batched = gp.batched_ms["gate"] + share * gp.batched_ms["reason"]
    return _gate_mode_result("adaptive", per, registry, latency_ms, batched, tokens, share)


def _gate_mode_result(mode: str, per: dict, registry: dict, latency_ms: float, batched_ms: float, tokens: float,
                      share: float) -> BenchmarkResult:
    """A mode scored from a gate pass: its latency was timed on a sample drawn across datasets, its tokens and
    reasoning share counted over every query, so these replace the per-dataset means."""
    per = {k: replace(v, modality=registry[k].modality, meta_task=registry[k].meta_task, mode=mode)
           for k, v in per.items()}
    return aggregate_results(per, registry, mode, extra={"latency_ms_per_query": latency_ms,
                                                         "batched_ms_per_query": batched_ms,
                                                         "generated_tokens_per_query": tokens,
                                                         "reasoned_share": share})


def _one_input_encoder(backbone: Backbone, mode: str, max_new_tokens: int) -> Callable:
    if mode == "direct":
        return lambda x: embed(backbone, [x])
    enc = ReasoningEncoder(backbone, max_new_tokens)
    return lambda x: enc([x])


def _source_digest(stage1_model: Path, cfg: Stage2Config, world_seed: int, hard_fraction: float, seed: int) -> str:
    """What an RL model was trained from: the stage-1 weights, the stage-2 config and the data seeds."""

    h = hashlib.sha256()
    for f in sorted(stage1_model.glob("*.safetensors")):
        h.update(f.read_bytes())
    h.update(json.dumps([asdict(cfg), world_seed, hard_fraction, seed], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _short(e: BenchmarkResult) -> dict:
    s = e.summary()
    return {k: s[k] for k in ("overall", "easy", "hard", "per_dataset", "latency_ms_per_query",
                              "generated_tokens_per_query")}


def _reward_terms(h: dict) -> dict:
    return {k: v for k, v in h.items() if k.startswith("rewards/") or k in ("completions/mean_length",
                                                                             "sampled_invocation_rate")}
