"""The results report: tables and targets printed from a run's summary.json, never typed."""

import json

from mmemb_lab.results import TARGETS, report, target_lines


def test_report_prints_every_mode_and_target_of_a_run(smoke_run):
    tmp_path, _ = smoke_run
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    text = report([run])
    for mode in ("baseline_direct", "baseline_always", "adaptive_stage1", "adaptive", "oracle"):
        assert f"| {mode} (" in text, mode
        assert f"{s['eval'][mode]['overall']:.1f}" in text, mode
    for t in TARGETS:
        assert t.name in text
    assert f"GRPO step chosen on val: {s['stage2']['chosen_step']} of" in text


def test_a_target_is_met_only_on_its_side_of_the_bound():
    s = {"eval": {m: {"overall": v, "latency_ms_per_query": ms} for m, v, ms in
                  (("adaptive", 70.0, 30.0), ("baseline_direct", 60.0, 10.0), ("baseline_always", 65.5, 100.0),
                   ("adaptive_stage1", 70.6, 40.0))},
         "gate": {"oracle_gain_captured": 0.6, "latency": {"mixed_cost_ratio": 1.06}},
         "selection": {"precision": 0.95, "recall_on_opportunity": None,
                       "selected_share_by_worker": {"hallucinating": 0.03}}}
    lines = dict(line.split(" = ", 1) for line in target_lines(s))
    assert lines["adaptive - max(baselines)"] == "+4.5 (>= 5): NOT met"
    assert lines["adaptive / baseline_always latency"] == "0.300 (<= 0.6): met"
    assert lines["oracle gain captured"].endswith(": met")                 # the bound itself meets it
    assert lines["mixed cost ratio"].endswith("NOT met")
    assert lines["recall on opportunity"] == "n/a (>= 0.8): NOT met"       # not measured is not met
    assert lines["format_only share of selections"].endswith(": met")
    assert lines["hallucinating share of selections"].endswith("NOT met")
    assert lines["adaptive - adaptive_stage1"] == "-0.6 (>= -0.5): NOT met"
