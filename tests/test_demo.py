"""The main job end to end on the seconds-long preset: summary.json has the promised fields, figures exist."""

import json
from dataclasses import replace

import torch


def test_demo_smoke(smoke_run, monkeypatch, tiny_foundation):
    from mmemb_lab.demo import run_demo

    tmp_path, s = smoke_run  # run_demo(seed=3, out=tmp_path / "run", preset="smoke", ...): tests/conftest.py
    monkeypatch.setenv("MMEMB_FIGURES", str(tmp_path / "figures"))
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["preset"] == "smoke" and on_disk["seed"] == 3
    for name, d in on_disk["world"]["datasets"].items():
        assert {"modality", "meta_task", "n_eval", "n_candidates", "hard_fraction"} <= set(d), name
    acc = on_disk["foundation"]["description_accuracy"]
    assert {"colour", "shape", "occupancy", "frame_colour", "page_digit"} <= set(acc)
    for mode in ("stage0_direct", "direct", "always", "oracle"):
        d = on_disk["eval"][mode]
        assert {"overall", "easy", "hard", "per_dataset", "latency_ms_per_query"} <= set(d), mode
        assert set(d["per_dataset"]) == set(on_disk["world"]["datasets"])
    assert on_disk["eval"]["always"]["generated_tokens_per_query"] > 0
    sel = on_disk["selection"]
    assert {"precision", "selected_share_by_worker", "no_reasoning_rate_easy", "no_reasoning_rate_hard",
            "gold_rationale_gain_hard", "recall_on_opportunity", "worker_step_accuracy"} <= set(sel)
    acc = sel["worker_step_accuracy"]
    assert acc["format_only"] == 0.0 and 0.0 < acc["hallucinating"] < 1.0 and 0.0 < acc["concise"] < 1.0
    assert {"random_worker", "removal_only"} <= set(sel["baselines"])
    gold, s0 = sel["gold_rationale_hard_per_dataset"], on_disk["eval"]["stage0_direct"]
    assert set(gold["direct"]) == set(gold["gold"]) == set(s0["per_dataset_hard"])
    for name, v in gold["direct"].items():  # the same model on the same hard queries as the stage-0 evaluation
        assert abs(v - s0["per_dataset_hard"][name]) < 1e-6, name
    assert abs(sel["gold_rationale_gain_hard"] - sum(gold["gold"][n] - gold["direct"][n] for n in gold["gold"])
               / len(gold["gold"])) < 1e-9
    assert set(sel["no_reasoning_rate_hard_per_dataset"]) <= set(gold["direct"])
    for name, solved in sel["solved_directly_rate_hard_per_dataset"].items():  # those can only go without
        assert solved <= sel["no_reasoning_rate_hard_per_dataset"][name] + 1e-9, name
    # gains.jsonl keeps every confidence the filter reads: the oracle ranking's precision follows from it alone
    import math
    from collections import defaultdict

    lines = defaultdict(list)
    for ln in (tmp_path / "run" / "selection" / "gains.jsonl").read_text().splitlines():
        r = json.loads(ln)
        lines[r["item_id"]].append(r)
    swap = lambda r: -math.inf if math.isnan(r["logp_swap"]) else r["logp_swap"]  # noqa: E731
    passing = {i: [r["correct"] for r in rs if r["status"] == "ok" and min(
        r["logp_with"] - r["logp_direct"], r["logp_with"] - max(map(swap, rs))) > sel["tau"]] for i, rs in lines.items()}
    some = [any(c) for c in passing.values() if c]
    assert len(lines) == sel["n_pairs"]
    assert (math.isnan(sel["precision_best_ranking"]) if not some
            else abs(sel["precision_best_ranking"] - sum(some) / len(some)) < 1e-9)
    st = on_disk["stage1"]
    assert {"rationale_sensitivity", "rationale_step_accuracy", "rationale_answer_accuracy"} <= set(st)
    assert {"rationale_sensitivity", "always"} <= set(st["ablation_random_worker"])
    ad = on_disk["eval"]["adaptive"]
    assert {"overall", "easy", "hard", "per_dataset", "latency_ms_per_query", "generated_tokens_per_query",
            "invocation_rate", "invocation_rate_easy", "invocation_rate_hard", "latency_ms_p50",
            "latency_ms_p95"} <= set(ad)
    assert 0 <= ad["invocation_rate"] <= 1 and ad["latency_ms_p50"] <= ad["latency_ms_p95"]
    ev = on_disk["eval"]  # baselines trained for their own mode, and the stage-1 model's own gate
    for mode in ("baseline_direct", "baseline_always", "adaptive_stage1"):
        assert {"overall", "easy", "hard", "per_dataset", "latency_ms_per_query"} <= set(ev[mode]), mode
    assert ev["baseline_direct"]["trained_rationales"] == "none"
    assert ev["baseline_always"]["trained_rationales"] == "always"
    assert ev["baseline_always"]["generated_tokens_per_query"] > 0
    assert 0 <= ev["adaptive_stage1"]["invocation_rate"] <= 1
    gate = on_disk["gate"]
    lat = gate["latency"]  # every latency of the cost lines timed in one interleaved loop
    assert {"baseline_direct_ms", "baseline_always_ms", "stage1_adaptive_ms", "mixed_cost_ms"} <= set(lat)
    assert abs(lat["mixed_cost_ratio"] - lat["adaptive_ms"] / lat["mixed_cost_ms"]) < 1e-9
    assert abs(lat["invoked_share_sample_target"] - lat["invoked_share_eval"]) <= 0.5 / lat["n"] + 1e-9  # stratified
    for mode in ("baseline_direct", "baseline_always"):  # retimed in that loop, like direct and always
        assert ev[mode]["latency_ms_per_query"] == lat[f"{mode}_ms"], mode
    og = gate["oracle_gain_captured"]
    d, o, a = (ev[k]["overall"] for k in ("direct", "oracle", "adaptive"))
    assert og is None if o <= d else abs(og - (a - d) / (o - d)) < 1e-9
    assert {"precision_vs_needs_reasoning", "recall_vs_needs_reasoning", "latency_ms_not_invoked", "curve"} <= set(gate)
    choice = gate["threshold_choice"]  # each gate's threshold is the best of the sweep on the validation split
    for model, mode in (("stage2", "adaptive"), ("stage1", "adaptive_stage1")):
        c = choice[model]
        assert c["split"] == "val" and c["n_queries"] == 6 * len(on_disk["world"]["datasets"])
        best = max(p["overall"] for p in c["curve"])
        assert c["threshold"] == max(p["threshold"] for p in c["curve"] if p["overall"] >= best - 1e-9)
        assert ev[mode]["threshold"] == c["threshold"], mode
    assert gate["threshold"] == choice["stage2"]["threshold"]
    steps = [r["step"] for r in choice["stage2"]["per_step"]]  # GRPO's step chosen on validation too
    assert steps == [r["step"] for r in on_disk["stage2"]["invocation_during_rl"]] and steps[0] == 0
    assert on_disk["stage2"]["chosen_step"] == choice["stage2"]["step"] in steps
    assert choice["stage2"]["step"] == min((r for r in choice["stage2"]["per_step"]),
                                           key=lambda r: (-r["overall"], r["invocation_rate"], -r["step"]))["step"]
    from mmemb_lab.method.rl import read_decision_rows
    from mmemb_lab.model.backbone import load_backbone

    rl_model = load_backbone(tmp_path / "run" / "stage2" / "model")  # the saved gate is the chosen step's
    row = rl_model.model.get_output_embeddings().weight[rl_model.token_id("<think>")].detach()
    assert torch.equal(row, read_decision_rows(tmp_path / "run" / "stage2" / "rl")[choice["stage2"]["step"]])
    rates = [p["invocation_rate"] for p in gate["curve"]]  # decreasing thresholds: non-decreasing invocation
    assert len(rates) == 3 and rates == sorted(rates)
    assert len(on_disk["stage2"]["reward_during_rl"]) == 2  # the smoke preset's GRPO steps
    for name in ("gate_curve", "gate_invocation", "rl_curves", "modes_easy_hard", "reasoning_headroom",
                 "stage2_step_choice"):
        assert (tmp_path / "run" / "figures" / f"{name}.html").exists(), name
    # a rerun reuses every finished step (world, stage 1, the RL model) and rewrites the same summary shape
    again = run_demo(seed=3, out=tmp_path / "run", preset="smoke", world_dir=tmp_path / "world", progress=False,
                     foundation=tiny_foundation)
    assert again["stage2"]["reward_during_rl"] == on_disk["stage2"]["reward_during_rl"]
    assert (tmp_path / "run" / "figures" / "direct_easy_vs_hard.html").exists()
    assert not (tmp_path / "figures").exists()  # a run never writes the repository's figures/
    # the paper figures are rebuilt from the run folder alone, numbers read from summary.json
    from mmemb_lab.cli import main
    from mmemb_lab.figures import paper_figures

    figs = paper_figures(tmp_path / "run")
    assert {"modes_easy_hard", "gate_curve", "gate_invocation", "rl_curves", "stage1_curves",
            "reasoning_headroom", "direct_easy_vs_hard"} <= set(figs)
    modes = {tr.name: dict(zip(tr.x, tr.y)) for tr in figs["modes_easy_hard"].data}
    for mode in ("baseline_direct", "baseline_always", "adaptive_stage1", "adaptive", "oracle"):
        assert modes["overall"][mode] == on_disk["eval"][mode]["overall"], mode
    by_step = {r["step"]: r["overall"] for r in choice["stage2"]["per_step"]}  # the step choice, from the summary
    assert dict(zip(figs["stage2_step_choice"].data[0].x, figs["stage2_step_choice"].data[0].y)) == by_step
    assert figs["modes_easy_hard"].layout.width == 700 and figs["gate_curve"].layout.width == 1000  # print style:
    assert figs["gate_curve"].layout.font.size == 15  # one panel 7 inches wide, two panels 10
    assert main(["figures", str(tmp_path / "run"), "--no-png"]) == 0  # default folder: figures/<run name>
    assert (tmp_path / "figures" / "run" / "gate_curve.html").exists()
    assert main(["figures", str(tmp_path / "nowhere")]) == 2  # not a run: a one-line error
    assert json.loads((tmp_path / "run" / "config.json").read_text())["preset"] == "smoke"
    # the digest `make demo` prints ends the run: one row per mode, read from the summary
    from mmemb_lab.demo import format_summary
    from mmemb_lab.summary import Summary

    typed = Summary.load(tmp_path / "run")
    now = json.loads((tmp_path / "run" / "summary.json").read_text())  # as the rerun above rewrote it
    assert typed.to_json() == now and list(typed.to_json()) == list(now)  # summary.json is its serialisation
    assert typed.eval["adaptive"].overall == on_disk["eval"]["adaptive"]["overall"]
    text = format_summary(typed)
    for mode in ("stage0_direct", "direct", "always", "oracle", "adaptive"):
        row = next(line for line in text.splitlines() if line.split()[0] == mode)
        assert float(row.split()[1]) == round(on_disk["eval"][mode]["overall"], 1), row
    assert f"{sel['no_reasoning_rate_hard']:.2f} of hard pairs" in text
    assert ("a closed gate costs" in text) == (gate["latency_ms_not_invoked"] is not None)
    # the fixed modes' latency was timed beside the adaptive mode, on the stage-1 model
    for mode in ("direct", "always"):
        assert on_disk["eval"][mode]["latency_ms_per_query"] == gate["latency"][f"stage1_{mode}_ms"]
        assert "latency_ms_per_query_stage1_pass" in on_disk["eval"][mode]
    # issue 5's cost line, checked from the summary's own numbers
    ad, al = on_disk["eval"]["adaptive"], on_disk["eval"]["always"]
    met = ad["latency_ms_per_query"] <= (ad["invocation_rate"] + 0.1) * al["latency_ms_per_query"]
    cost = next(line for line in text.splitlines() if line.startswith("cost line:"))
    assert ("(met)" in cost) == met and ("(NOT met)" in cost) == (not met), cost
    assert f"opened on {gate['latency']['invoked_share']:.2f}" in cost
    bare = replace(typed, eval={"direct": typed.eval["direct"]}, selection=None, stage1=None, gate=None, stage2=None)
    assert len(format_summary(bare).splitlines()) == 3  # no stages 1-2
    assert s.eval == typed.eval and s.eval["direct"].overall == on_disk["eval"]["direct"]["overall"]  # rerun: same scores
