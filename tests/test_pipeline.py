"""Stages with manifests and recipes: a done stage is skipped, a changed setting reruns its stage and the
ones after it, a stage run alone refuses a missing or stale upstream, and the chain run from a recipe through
the CLI gives the demo's numbers."""

import json
import re
from pathlib import Path

import pytest

from mmemb_lab import chain
from mmemb_lab.cli import main
from mmemb_lab.method.stage1 import Stage1Config
from mmemb_lab.method.stage2 import Stage2Config
from mmemb_lab.pipeline import Recipe, StageNotDone, apply_overrides, run_stage, stage_state
from mmemb_lab.presets import smoke, tiny
from mmemb_lab.runs import Manifest, RunError

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_set_nested_fields_and_name_what_is_wrong():
    cfg = apply_overrides(tiny(0), {"stage2.rl.steps": 7, "stage2.thresholds": [0.2, 0.8], "stage1.loop.lr": 1})
    assert cfg.stage2.rl.steps == 7 and cfg.stage2.thresholds == (0.2, 0.8) and cfg.stage1.loop.lr == 1.0
    assert tiny(0).stage2.rl.steps != 7  # the preset itself is untouched
    with pytest.raises(RunError, match="no field 'stepz'"):
        apply_overrides(tiny(0), {"stage2.rl.stepz": 3})
    with pytest.raises(RunError, match="stage2.rl.steps: expected int"):
        apply_overrides(tiny(0), {"stage2.rl.steps": "many"})
    r = Recipe().with_overrides(["stage2.rl.steps=40", "stage2.thresholds=[0.1, 0.9]"])
    assert r.overrides == {"stage2.rl.steps": 40, "stage2.thresholds": [0.1, 0.9]}
    with pytest.raises(RunError, match="FIELD=VALUE"):
        Recipe().with_overrides(["stage2.rl.steps"])


def test_every_recipe_loads_and_names_a_preset(tmp_path):
    recipes = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
    assert {p.stem for p in recipes} == {"tiny", "smoke", "paper"}
    for p in recipes:
        if chain.is_real(p):  # the real-data recipe: every stage's settings resolve to its config
            r = chain.load(p)
            apply_overrides(Stage1Config(), chain.dotted(r.stage1))
            apply_overrides(Stage2Config().rl, chain.dotted(r.stage2))
            continue
        r = Recipe.load(p)
        apply_overrides({"tiny": tiny, "smoke": smoke}[r.preset](r.seed), r.overrides)
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\nseeds: 3\n")
    with pytest.raises(RunError, match="unknown recipe keys \\['seeds'\\]"):
        Recipe.load(bad)


def test_a_stage_is_skipped_resumed_or_rerun_by_its_manifest(tmp_path):
    calls = []

    def body(folder):
        calls.append(folder)
        (folder / "work.txt").write_text("x")
        return {"n": len(calls)}

    folder = tmp_path / "s"
    with pytest.raises(StageNotDone, match="has not run"):
        run_stage("stage1", folder, {"lr": 1}, 0, {}, body, may_run=False)
    first = run_stage("stage1", folder, {"lr": 1}, 0, {"up": "a"}, body)
    again = run_stage("stage1", folder, {"lr": 1}, 0, {"up": "a"}, body, may_run=False)
    assert first.ran and not again.ran and again.result == {"n": 1} and len(calls) == 1
    assert first.digest == again.digest
    # another upstream: the old folder is moved aside whole (never deleted) and the stage runs anew
    other = run_stage("stage1", folder, {"lr": 1}, 0, {"up": "b"}, body)
    assert other.ran and other.result == {"n": 2} and other.digest != first.digest
    (aside,) = tmp_path.glob("s.stale-*")
    assert json.loads((aside / "result.json").read_text()) == {"n": 1}
    with pytest.raises(StageNotDone, match="other settings"):
        run_stage("stage1", folder, {"lr": 2}, 0, {"up": "b"}, body, may_run=False)
    # an interrupted stage (manifest written, no result) resumes in place
    def crash(folder):
        (folder / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage("stage2", tmp_path / "t", {}, 0, {}, crash)
    assert stage_state(tmp_path / "t", Manifest.make("stage2", {}, 0, {})) == "partial"
    resumed = run_stage("stage2", tmp_path / "t", {}, 0, {}, lambda f: {"kept": (f / "partial.txt").read_text()})
    assert resumed.result == {"kept": "half"} and not list(tmp_path.glob("t.stale-*"))


def _numbers(d, prefix=""):
    """Every number of a summary except timings (wall clock, latency: they vary from run to run)."""
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()):
        key = f"{prefix}.{k}"
        if re.search(r"latency|_ms|wall|rl_s$|path", str(k)):
            continue
        if isinstance(v, (dict, list)):
            out.update(_numbers(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def test_recipe_through_the_cli_gives_the_demos_numbers_and_reruns_only_what_changed(smoke_run, tiny_foundation,
                                                                                     tmp_path, capsys):
    base, demo = smoke_run  # run_demo(seed=3, preset="smoke", world_dir=base / "world"): tests/conftest.py
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"preset: smoke\nseed: 3\nout: {tmp_path / 'run'}\nforeground: 1\n")
    assert main(["run", str(recipe)]) == 2  # a misspelt key is a one-line error
    assert "unknown recipe keys ['foreground']" in capsys.readouterr().err
    recipe.write_text(f"preset: smoke\nseed: 3\nout: {tmp_path / 'run'}\nfoundation: {tiny_foundation}\n"
                      f"world: {base / 'world'}\noverrides: {{}}\n")
    assert main(["run", str(recipe)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    got, want = _numbers(summary), _numbers(demo.to_json())
    assert got.keys() == want.keys() and len(got) > 100
    assert {k for k in got if got[k] != pytest.approx(want[k], abs=1e-9, nan_ok=True)} == set()
    stages = {"stage0": run / "eval", "selection": run / "selection", "stage1": run / "stage1", "stage2": run / "stage2"}
    for name, folder in stages.items():
        assert Manifest.load(folder).command == name and (folder / "result.json").exists(), name
    stamp = {n: (f / "result.json").stat().st_mtime_ns for n, f in stages.items()}

    assert main(["run", str(recipe)]) == 0  # everything done: every stage skipped
    assert {n: (f / "result.json").stat().st_mtime_ns for n, f in stages.items()} == stamp
    # one setting of stage 2 changed, run as stage 2 alone: stage 2 reruns, nothing before it does
    assert main(["stage2", "--recipe", str(recipe), "--set", "stage2.thresholds=[0.2, 0.5, 0.9]"]) == 0
    now = {n: (f / "result.json").stat().st_mtime_ns for n, f in stages.items()}
    assert [n for n in stages if now[n] != stamp[n]] == ["stage2"]
    assert len(list(tmp_path.glob("run/stage2.stale-*"))) == 1
    assert [p["threshold"] for p in json.loads((run / "summary.json").read_text())["gate"]["curve"]] == [0.9, 0.5, 0.2]
    # stage 2 alone cannot run over a stage 1 made with other settings: it names the stage to run first
    capsys.readouterr()
    assert main(["stage2", "--recipe", str(recipe), "--set", "stage1.loop.lr=0.001"]) == 2
    assert "stage stage1" in capsys.readouterr().err
