"""The typed summary: blocks read their fields, keep the rest, and write back the file they were read from."""

import json

import pytest

from mmemb_lab.summary import GateSummary, ModeScores, Summary


def _mode(**extra):
    return {"overall": 50.0, "easy": 60.0, "hard": None, "per_dataset": {"a": 50.0}, "per_dataset_easy": {"a": 60.0},
            "per_dataset_hard": {"a": None}, "latency_ms_per_query": 3.0, **extra}


def test_a_block_keeps_what_it_does_not_type_and_its_key_order():
    d = {"mode": "adaptive", **_mode(invocation_rate=0.4, latency_ms_p50=2.0)}
    m = ModeScores.from_json(d)
    assert m.invocation_rate == 0.4 and m.hard is None and m["latency_ms_p50"] == 2.0 and m.get("nope") is None
    assert m.to_json() == d and list(m.to_json()) == list(d)
    assert "invocation_rate" not in ModeScores.from_json(_mode()).to_json()  # an unset optional field stays absent


def test_a_block_missing_a_field_names_it():
    with pytest.raises(ValueError, match="latency_ms_per_query"):
        ModeScores.from_json({k: v for k, v in _mode().items() if k != "latency_ms_per_query"})


def test_a_summary_round_trips_through_its_file(tmp_path):
    d = {"preset": "smoke", "seed": 1, "world": {"config": {}}, "foundation": {
        "path": "f", "fingerprint": None, "description_accuracy": {"colour": 1.0}, "skill_accuracy": {}},
        "eval": {"direct": _mode(), "adaptive": _mode(invocation_rate=0.5, threshold=0.9)},
        "gate": {"threshold": 0.9, "curve": [], "threshold_choice": {}, "latency": {}, "invocation_per_dataset": {},
                 "oracle_gain_captured": None, "precision_vs_needs_reasoning": 0.5},
        "backbone": {}, "wall_s": 1.0}
    (tmp_path / "summary.json").write_text(json.dumps(d))
    s = Summary.load(tmp_path)
    assert isinstance(s.gate, GateSummary) and isinstance(s.eval["adaptive"], ModeScores)
    assert s.selection is None and s.eval["adaptive"].threshold == 0.9 and s.gate["precision_vs_needs_reasoning"] == 0.5
    s.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == d
    (tmp_path / "bad.json").write_text(json.dumps({"preset": "x"}))
    with pytest.raises(ValueError, match="bad.json: not a demo summary"):
        Summary.load(tmp_path / "bad.json")
