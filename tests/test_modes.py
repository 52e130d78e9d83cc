"""Query modes: one QueryEncoder for every mode; `mmemb-lab benchmark --mode` runs each, writes what it generated,
scores as the toy evaluation path does, and shards over processes without changing a score."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mmemb_lab
from mmemb_lab.cli import main, parser
from mmemb_lab.data import item_query
from mmemb_lab.eval import harness, modes, scoring
from mmemb_lab.eval.mmeb import resolve
from mmemb_lab.eval.registry import MMEB_V2
from mmemb_lab.model.backbone import load_backbone
from mmemb_lab.model.embed import embed
from mmemb_lab.model.gating import AdaptiveEncoder, gate_forward
from mmemb_lab.model.inference import ReasoningEncoder
from mmemb_lab.world.build import toy_registry
from mmemb_lab.world.tasks import make_item
from tests.test_mmeb import write_mmeb

TOY = ("toy_cls", "toy_doc")
MMEB = ("ImageNet-1K", "MSCOCO_t2i", "K700", "ViDoRe_arxivqa")


@pytest.fixture(scope="module")
def inputs():
    return [item_query(make_item(d, 0, "eval", i, 0.5)) for i, d in
            enumerate(["toy_qa", "toy_t2i", "toy_video_qa", "toy_doc", "toy_cls"])]


def _between(p: np.ndarray) -> float:
    """A threshold halfway between the two middle gate scores: about half open, and no score sits near it."""
    s = np.sort(p)
    return float((s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)


def _preds(folder: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (folder / f"{name}_pred.jsonl").read_text().splitlines()]


def test_one_definition_of_each_piece_every_mode_shares():
    assert harness.QueryEncoder is modes.QueryEncoder and harness.direct_encoder is modes.direct_encoder
    assert harness.DatasetResult is scoring.DatasetResult and harness.BenchmarkResult is scoring.BenchmarkResult
    assert harness.Encoded is modes.Encoded and harness.PROMPTS is modes.PROMPTS
    src = "".join(p.read_text() for p in Path(mmemb_lab.__file__).parent.rglob("*.py"))
    for pattern in (r"^QueryEncoder = ", r"^def direct_encoder\(", r"^def (latency_ms|_latency)\(",
                    r"^class Encoded\b", r"^class InferenceConfig\b", r"^def score_set\(", r"^def sample_frame_indices\(",
                    r"^def run_benchmark\("):
        assert len(re.findall(pattern, src, flags=re.M)) == 1, pattern
    # the demo's evaluate is the runner with one chunk per dataset, not a second runner
    assert "run_benchmark(" in inspect.getsource(harness.evaluate)
    assert not (Path(mmemb_lab.__file__).parent / "evaluate.py").exists()
    # one result type per level: a dataset's and a benchmark's, whatever the mode or source
    assert sorted(re.findall(r"^class (\w*(?:Result|Score))\b", src, flags=re.M)) == \
        ["BenchmarkResult", "DatasetResult", "LoopResult", "RLResult", "TokenScore"]
    mode = next(a for a in parser()._subparsers._group_actions[0].choices["benchmark"]._actions if a.dest == "mode")
    assert tuple(mode.choices) == modes.MODES
    assert harness.HarnessConfig().batch_size == modes.InferenceConfig().batch_size
    assert harness.HarnessConfig().latency_sample == modes.InferenceConfig().latency_sample


def test_encoder_for_every_mode(backbone, inputs):
    cfg = modes.InferenceConfig(max_new_tokens=4)
    direct = modes.encoder_for(backbone, "direct", cfg)(inputs)
    assert torch.equal(direct, embed(backbone, inputs, batch_size=cfg.batch_size))
    always = modes.encoder_for(backbone, "always", cfg)(inputs)
    ref = ReasoningEncoder(backbone, 4)
    assert torch.allclose(always.embeddings, ref(inputs), atol=1e-5)
    assert list(always.rationales) == ref.last_rationales and list(always.generated_tokens) == ref.generated_tokens
    assert list(always.reasoned) == [True] * len(inputs)
    p = gate_forward(backbone, inputs).p_open.numpy()
    t = _between(p)
    adaptive = modes.encoder_for(backbone, "adaptive", modes.InferenceConfig(threshold=t, max_new_tokens=4))(inputs)
    assert list(adaptive.reasoned) == list(p > t) and 0 < sum(adaptive.reasoned) < len(inputs)
    for i, opened in enumerate(adaptive.reasoned):
        assert (adaptive.generated_tokens[i] > 0) == opened
        assert adaptive.rationales[i] == (always.rationales[i] if opened else "")
    assert modes.settings_for("adaptive", cfg) == {"threshold": 0.5, "max_new_tokens": 4}
    assert modes.settings_for("direct", cfg) == {} and modes.settings_for("oracle", cfg) == {"max_new_tokens": 4}
    with pytest.raises(ValueError, match="'user' prompt only"):
        modes.encoder_for(backbone, "adaptive", cfg, prompt="chat")
    with pytest.raises(ValueError, match="no encoder"):
        modes.encoder_for(backbone, "oracle", cfg)
    with pytest.raises(ValueError, match="invalid inference config"):
        modes.InferenceConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="use run_oracle"):
        harness.run_benchmark(backbone, None, {}, "unused", harness.HarnessConfig(mode="oracle"))


def _toy_args(root, foundation, out, *extra):
    return ["benchmark", "--benchmark", "toy", "--data", str(root), "--backbone", str(foundation), "--out", str(out),
            "--datasets", *TOY, *extra]


def test_cli_adaptive_on_the_toy_world_scores_as_evaluate_does(tiny_foundation, small_world, tmp_path, capsys):
    root, info = small_world
    reg = {k: v for k, v in toy_registry(info).items() if k in TOY}
    bb = load_backbone(tiny_foundation)
    source = harness.ToySource(root)
    queries = {n: [q.query for q in source.load(reg[n]).queries] for n in TOY}
    p = {n: gate_forward(bb, queries[n]).p_open.numpy() for n in TOY}  # batched as the harness batches them
    t = _between(np.concatenate(list(p.values())))
    assert main(_toy_args(root, tiny_foundation, tmp_path, "--mode", "adaptive", "--threshold", str(t),
                          "--max-new-tokens", "4")) == 0
    assert '"mode": "adaptive"' in capsys.readouterr().out
    ref = harness.evaluate(bb, root, reg, "adaptive", encoder=AdaptiveEncoder(bb, t, 4), latency_sample=1,
                            progress=False)
    opened = 0
    for name in TOY:
        score = json.loads((tmp_path / "adaptive" / f"{name}_score.json").read_text())
        assert score["score"] == ref.per_dataset[name].score, name  # exactly: the same encoders, batches
        preds = _preds(tmp_path / "adaptive", name)
        assert [x["score"] for x in preds] == ref.per_dataset[name].per_query.tolist()
        assert [x["reasoned"] for x in preds] == (p[name] > t).tolist()
        for x in preds:
            assert (x["generated_tokens"] > 0) == x["reasoned"] and isinstance(x["rationale"], str)
            assert x["reasoned"] or x["rationale"] == ""
        opened += sum(x["reasoned"] for x in preds)
        assert score["reasoned_share"] == pytest.approx(np.mean(p[name] > t))
    assert 0 < opened < sum(len(q) for q in queries.values())
    assert any(x["rationale"] for n in TOY for x in _preds(tmp_path / "adaptive", n))  # text, not just counts
    # the threshold is part of the run's identity: another one into the same folder refuses, naming it
    assert main(_toy_args(root, tiny_foundation, tmp_path, "--mode", "adaptive", "--threshold", str(t + 0.01),
                          "--max-new-tokens", "4")) == 2
    assert "encoder.threshold" in capsys.readouterr().err
    assert main(_toy_args(root, tiny_foundation, tmp_path, "--mode", "direct", "--threshold", "0.3")) == 2
    assert "--threshold does not apply to --mode direct" in capsys.readouterr().err


def test_cli_scores_the_validation_split_as_its_own_data(tiny_foundation, small_world, tmp_path, capsys):
    """`--split val` scores the world's validation queries; it is another data identity than eval (a run
    folder of one refuses the other), and MMEB-V2 has no such split."""
    root, info = small_world
    assert main(_toy_args(root, tiny_foundation, tmp_path / "val", "--split", "val")) == 0
    for name in TOY:
        preds = _preds(tmp_path / "val" / "direct", name)
        assert len(preds) == info["datasets"][name]["n_val"], name
    assert main(_toy_args(root, tiny_foundation, tmp_path / "val")) == 2  # eval into the val run: refused
    capsys.readouterr()
    assert main(["benchmark", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--split", "val"]) == 2
    assert "no validation split" in capsys.readouterr().err


def test_cli_oracle_is_the_better_of_the_cached_direct_and_always_runs(tiny_foundation, small_world, tmp_path,
                                                                       capsys):
    root, info = small_world
    reg = {k: v for k, v in toy_registry(info).items() if k in TOY}
    assert main(_toy_args(root, tiny_foundation, tmp_path, "--mode", "oracle", "--max-new-tokens", "4")) == 0
    assert "upper bound" in capsys.readouterr().out
    results = json.loads((tmp_path / "oracle" / "results.json").read_text())
    assert results["upper_bound"] is True and results["mode"] == "oracle"
    assert json.loads((tmp_path / "direct" / "results.json").read_text())["upper_bound"] is False
    bb = load_backbone(tiny_foundation)
    direct = harness.evaluate(bb, root, reg, latency_sample=1, progress=False)
    always = harness.evaluate(bb, root, reg, "always", encoder=ReasoningEncoder(bb, 4), latency_sample=1,
                              progress=False)
    for name in TOY:
        d, a, o = (_preds(tmp_path / m, name) for m in ("direct", "always", "oracle"))
        assert [x["query"] for x in o] == [x["query"] for x in d] == [x["query"] for x in a]
        assert [x["score"] for x in o] == [max(x["score"], y["score"]) for x, y in zip(d, a)]
        assert [x["reasoned"] for x in o] == [y["score"] > x["score"] for x, y in zip(d, a)]
        assert [x["rationale"] for x in o] == [y["rationale"] if y["score"] > x["score"] else "" for x, y in zip(d, a)]
        best = np.maximum(direct.per_dataset[name].per_query, always.per_dataset[name].per_query)
        assert results["per_dataset"][name] == pytest.approx(100 * best.mean(), abs=1e-9), name
    # a second oracle run reuses everything: nothing is embedded again
    assert main(_toy_args(root, tiny_foundation, tmp_path, "--mode", "oracle", "--max-new-tokens", "4")) == 0
    assert json.loads(capsys.readouterr().out.split("\nskipped rows")[0])["per_dataset"] == results["per_dataset"]


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")  # the CPU (gloo) equivalence, also on a GPU machine
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_mmeb_adaptive_scores_the_same_in_one_and_two_processes(tiny_foundation, tmp_path):
    data = write_mmeb(tmp_path / "MMEB-V2")
    bb = load_backbone(tiny_foundation)
    source = harness.MMEBSource(data)
    p = np.concatenate([gate_forward(bb, [resolve(q.query) for q in source.load(MMEB_V2[n]).queries],
                                     batch_size=2).p_open.numpy() for n in MMEB])  # the chunks' batches
    t = _between(p)
    args = ["-m", "mmemb_lab", "benchmark", "--benchmark", "mmeb-v2", "--data", str(data), "--backbone",
            str(tiny_foundation), "--mode", "adaptive", "--threshold", str(t), "--max-new-tokens", "8",
            "--chunk-size", "2", "--datasets", *MMEB]  # chunks of 2: both ranks embed queries and candidates
    _run([sys.executable, *args, "--out", str(tmp_path / "one")], tmp_path)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    _run([torchrun, "--nproc-per-node", "2", "--master-port", "29537", *args, "--out", str(tmp_path / "two")],
         tmp_path)
    opened = 0
    for name in MMEB:
        one, two = (json.loads((tmp_path / r / "adaptive" / f"{name}_score.json").read_text()) for r in ("one", "two"))
        for key in ("score", "hit@1", "hit@5", "ndcg_linear@5", "n_queries", "n_candidates", "reasoned_share",
                    "generated_tokens_per_query"):
            assert one[key] == two[key], (name, key)
        pred = _preds(tmp_path / "one" / "adaptive", name)
        assert pred == _preds(tmp_path / "two" / "adaptive", name)
        opened += sum(x["reasoned"] for x in pred)
        assert all((x["generated_tokens"] > 0) == x["reasoned"] for x in pred)
    assert 0 < opened < len(p)
    manifest = json.loads((tmp_path / "two" / "adaptive" / "manifest.json").read_text())
    assert manifest["config"]["encoder"] == {"threshold": t, "max_new_tokens": 8}
