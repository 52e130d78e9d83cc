"""The main job end to end on the seconds-long preset: summary.json has the promised fields, figures exist."""

import json

import pytest

from mmemb_lab.paths import foundation_dir


@pytest.mark.skipif(not (foundation_dir() / "foundation.json").exists(), reason="no committed foundation model")
def test_demo_smoke(tmp_path, monkeypatch):
    from mmemb_lab.demo import run_demo

    monkeypatch.setenv("MMEMB_FIGURES", str(tmp_path / "figures"))
    s = run_demo(seed=3, out=tmp_path / "run", preset="smoke", world_dir=tmp_path / "world", progress=False)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["preset"] == "smoke" and on_disk["seed"] == 3
    for name, d in on_disk["world"]["datasets"].items():
        assert {"modality", "meta_task", "n_eval", "n_candidates", "hard_fraction"} <= set(d), name
    acc = on_disk["foundation"]["description_accuracy"]
    assert {"colour", "shape", "occupancy", "frame_colour", "page_digit"} <= set(acc)
    d = on_disk["eval"]["direct"]
    assert {"overall", "easy", "hard", "per_dataset", "latency_ms_per_query"} <= set(d)
    assert set(d["per_dataset"]) == set(on_disk["world"]["datasets"])
    assert (tmp_path / "run" / "figures" / "direct_easy_vs_hard.html").exists()
    assert (tmp_path / "figures" / "direct_easy_vs_hard.html").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["preset"] == "smoke"
    assert s["eval"]["direct"]["overall"] == d["overall"]
