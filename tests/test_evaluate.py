"""The evaluation harness: scores follow the rankings, easy/hard split, per-dataset files."""

import json

import numpy as np
import torch

from mmemb_lab.data import EvalQuery, EvalSet
from mmemb_lab.eval.harness import evaluate
from mmemb_lab.eval.scoring import score_set
from mmemb_lab.model.embed import Input
from mmemb_lab.world.build import toy_registry


def _set():
    cands = {k: Input(k) for k in "abcd"}
    qs = [EvalQuery(Input("q0"), tuple("abcd"), {"a": 1}, False),
          EvalQuery(Input("q1"), tuple("abcd"), {"b": 1}, True),
          EvalQuery(Input("q2"), tuple("bcd"), {"d": 1}, True)]
    return EvalSet("toy", qs, cands, "local")


def test_score_set_matches_hand_ranking():
    c = torch.eye(4)  # candidate a, b, c, d = e0..e3
    q = torch.tensor([[1.0, 0.2, 0, 0],  # q0 -> a (correct)
                      [0.9, 0.5, 0, 0],  # q1 -> a ranked over its positive b (wrong at 1, right at 5)
                      [0, 0, 0.1, 0.3]])  # q2 -> among b, c, d: d (correct)
    s = score_set(_set(), q, c, "hit@1")
    assert s.per_query.tolist() == [1.0, 0.0, 1.0]
    assert np.isclose(s.score, 200 / 3)
    assert s.easy == 100.0 and s.hard == 50.0
    assert s.at_k["hit@5"] == 100.0
    assert s.top1 == ["a", "a", "d"]
    g = score_set(_set(), q, c, "ndcg@5")  # q1: positive at rank 2 -> 1/log2(3)
    assert np.isclose(g.per_query[1], 1 / np.log2(3))


def test_evaluate_runs_on_the_world_and_writes_files(backbone, small_world, tmp_path):
    root, info = small_world
    res = evaluate(backbone, root, toy_registry(info), out_dir=tmp_path, latency_sample=2, progress=False)
    assert set(res.per_dataset) == set(info["datasets"])
    assert 0 <= res.overall <= 100 and res.latency_ms_per_query > 0
    assert np.isclose(res.overall, np.mean([s.score for s in res.per_dataset.values()]))
    f = json.loads((tmp_path / "direct" / "toy_doc_score.json").read_text())
    assert {"hit@1", "hit@5", "hit@10", "ndcg_linear@1", "ndcg_linear@5", "ndcg_linear@10"} <= set(f)
    assert f["metric"] == "ndcg@5"
    preds = (tmp_path / "direct" / "toy_qa_pred.jsonl").read_text().splitlines()
    assert len(preds) == info["datasets"]["toy_qa"]["n_eval"]


def test_perfect_encoder_scores_100(backbone, small_world):
    """An encoder that embeds each query exactly as its positive candidate gets 100 on local tasks."""
    from mmemb_lab.data import load_eval
    from mmemb_lab.model.embed import embed

    root, info = small_world
    es = load_eval(root, "toy_cls", "local")
    pos = {q.query.name: es.candidates[next(iter(q.relevance))] for q in es.queries}
    oracle = lambda inputs: embed(backbone, [pos[x.name] for x in inputs])  # noqa: E731
    reg = {"toy_cls": toy_registry(info)["toy_cls"]}
    res = evaluate(backbone, root, reg, encoder=oracle, latency_sample=1, progress=False)
    assert res.per_dataset["toy_cls"].score == 100.0


def test_collapsed_model_scores_zero_and_is_flagged(caplog):
    """Every embedding equal: each positive ties with every negative. Listed first (the MMEB layout), it
    would win every tie under a lower-index-first rule (Hit@1 100); ties count against the model instead,
    and the score file and the log say the embeddings are constant."""
    cands = {k: Input(k) for k in "abcd"}
    qs = [EvalQuery(Input(f"q{i}"), tuple("abcd"[i:] + "abcd"[:i]), {"abcd"[i]: 1}) for i in range(4)]
    es = EvalSet("collapsed", qs, cands, "local")  # query i: its positive first, then the others
    same = torch.nn.functional.normalize(torch.ones(1, 8), dim=-1)
    with caplog.at_level("WARNING", logger="mmemb_lab.eval.scoring"):
        s = score_set(es, same.repeat(4, 1), same.repeat(4, 1), "hit@1")
    assert s.score == 0.0 and s.at_k["hit@5"] == 100.0
    assert all(t not in q.relevance for t, q in zip(s.top1, qs))  # the predictions file agrees with the score
    assert len(s.warnings) == 2 and "query embeddings are (near) constant" in s.warnings[0]
    assert "candidate embeddings are (near) constant" in s.warnings[1]
    assert sum("(near) constant" in r.getMessage() for r in caplog.records) == 2


def test_near_constant_embeddings_are_flagged_and_spread_ones_are_not():
    from mmemb_lab.eval.scoring import COLLAPSE_DISTANCE, collapse_warnings, mean_cosine_distance

    g = torch.Generator().manual_seed(0)
    spread = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    pairs = [1 - float(spread[i] @ spread[j]) for i in range(50) for j in range(50) if i != j]
    assert np.isclose(mean_cosine_distance(spread), np.mean(pairs), atol=1e-9)  # the O(n d) identity holds
    near = torch.nn.functional.normalize(torch.ones(50, 16) + 1e-3 * torch.randn(50, 16, generator=g), dim=-1)
    assert mean_cosine_distance(near) < COLLAPSE_DISTANCE < mean_cosine_distance(spread)
    assert collapse_warnings("x", spread, spread) == ()
    assert [w.split(" embeddings")[0] for w in collapse_warnings("x", spread, near)] == ["x: candidate"]
    assert mean_cosine_distance(spread[:1]) is None and collapse_warnings("x", spread[:1], spread[:1]) == ()
    s = score_set(_set(), torch.eye(4)[[0, 1, 3]], torch.eye(4), "hit@1")  # distinct embeddings: no warning
    assert s.warnings == () and s.score == 100.0
