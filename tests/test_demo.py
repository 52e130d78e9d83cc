"""The main job end to end on the seconds-long preset: summary.json has the promised fields, figures exist."""

import json



def test_demo_smoke(tmp_path, monkeypatch, tiny_foundation):
    from mmemb_lab.demo import run_demo

    monkeypatch.setenv("MMEMB_FIGURES", str(tmp_path / "figures"))
    s = run_demo(seed=3, out=tmp_path / "run", preset="smoke", world_dir=tmp_path / "world", progress=False,
                 foundation=tiny_foundation)
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
            "gold_rationale_gain_hard"} <= set(sel)
    assert {"random_worker", "removal_only"} <= set(sel["baselines"])
    st = on_disk["stage1"]
    assert {"rationale_sensitivity", "rationale_step_accuracy", "rationale_answer_accuracy"} <= set(st)
    assert {"rationale_sensitivity", "always"} <= set(st["ablation_random_worker"])
    assert (tmp_path / "run" / "figures" / "direct_easy_vs_hard.html").exists()
    assert (tmp_path / "figures" / "direct_easy_vs_hard.html").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["preset"] == "smoke"
    assert s["eval"]["direct"]["overall"] == on_disk["eval"]["direct"]["overall"]
