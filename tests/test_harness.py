"""The benchmark harness: scores as the reference computes them, resumable, sharded, bad data reported."""

import json
import math
import re

import numpy as np
import pytest
import torch

from mmemb_lab.data import DataError, EvalQuery, EvalSet
from mmemb_lab.eval import harness
from mmemb_lab.eval.embedding_cache import shard
from mmemb_lab.eval.harness import Encoded, HarnessConfig, MMEBSource, ToySource, evaluate, run_benchmark
from mmemb_lab.eval.metrics import score_queries
from mmemb_lab.eval.registry import MMEB_V2
from mmemb_lab.eval.scoring import score_set
from mmemb_lab.model.embed import Input, embed
from mmemb_lab.runs import RunMismatch
from mmemb_lab.train.loop import distributed
from mmemb_lab.world.build import toy_registry
from tests.test_mmeb import FIXTURE_DATASETS, write_mmeb

TOY_SUBSET = ("toy_cls", "toy_doc", "toy_video_ret")


# --- an independent reference: brute force over Python lists, as the reference's RankingMetrics does ----


def _ref_ranking(scores):
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _ref_hit(ranking, grades, k):
    return 1.0 if any(grades.get(c, 0) > 0 for c in ranking[:k]) else 0.0


def _ref_ndcg(ranking, grades, k):
    dcg = sum(grades.get(c, 0) / math.log2(i + 2) for i, c in enumerate(ranking[:k]))
    ideal = sorted(grades.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_hit_and_ndcg_agree_with_brute_force_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    n_q, n_c = 40, int(rng.integers(5, 60))
    scores = rng.normal(size=(n_q, n_c))
    labels = []
    for _ in range(n_q):
        pos = rng.choice(n_c, size=int(rng.integers(1, min(6, n_c) + 1)), replace=False)
        labels.append({int(c): float(rng.integers(0, 4)) if seed % 2 else 1.0 for c in pos})
    qs = score_queries(scores, labels, metric="ndcg@5", ks=(1, 5, 10))
    for k in (1, 5, 10):
        hit = [_ref_hit(_ref_ranking(list(s)), g, k) for s, g in zip(scores, labels)]
        ndcg = [_ref_ndcg(_ref_ranking(list(s)), g, k) for s, g in zip(scores, labels)]
        assert np.allclose(qs.hit[k], hit, atol=1e-9, rtol=0)
        assert np.allclose(qs.ndcg_linear[k], ndcg, atol=1e-9, rtol=0)
        assert abs(qs.means[f"ndcg_linear@{k}"] - np.mean(ndcg)) < 1e-9


def test_score_set_on_keyed_candidates_agrees_with_brute_force():
    """The harness path: candidates keyed by id, local lists of different lengths, graded relevance."""
    rng = np.random.default_rng(7)
    keys = [f"c{i}" for i in range(30)]
    cands = {k: Input(k) for k in keys}
    queries, grades = [], []
    for qi in range(25):
        mine = tuple(rng.choice(keys, size=int(rng.integers(3, 30)), replace=False))
        rel = {mine[j]: float(rng.integers(1, 3)) for j in rng.choice(len(mine), size=2, replace=False)}
        queries.append(EvalQuery(Input(f"q{qi}"), mine, rel))
        grades.append(rel)
    es = EvalSet("rand", queries, cands, "local")
    q_emb = torch.nn.functional.normalize(torch.randn(25, 16, dtype=torch.float64), dim=-1)
    c_emb = torch.nn.functional.normalize(torch.randn(30, 16, dtype=torch.float64), dim=-1)
    for metric in ("hit@1", "ndcg@5"):
        s = score_set(es, q_emb, c_emb, metric)
        k = int(metric[-1])
        ref = []
        for qi, q in enumerate(queries):
            sims = [float(q_emb[qi] @ c_emb[keys.index(c)]) for c in q.candidates]
            ranked = [q.candidates[i] for i in _ref_ranking(sims)]
            ref.append((_ref_hit if metric.startswith("hit") else _ref_ndcg)(
                list(range(len(ranked))), {i: grades[qi].get(c, 0) for i, c in enumerate(ranked)}, k))
        assert np.allclose(s.per_query, ref, atol=1e-9, rtol=0)


# --- the harness on the toy world --------------------------------------------------------------------


def _toy(small_world, names=TOY_SUBSET):
    root, info = small_world
    reg = toy_registry(info)
    return ToySource(root), {n: reg[n] for n in names}


def test_harness_matches_evaluate_and_records_its_settings(backbone, small_world, tmp_path):
    source, reg = _toy(small_world)
    res = run_benchmark(backbone, source, reg, tmp_path, HarnessConfig(latency_sample=2), benchmark="toy",
                        progress=False)
    ev = evaluate(backbone, source.root, reg, latency_sample=1, progress=False)
    for name in reg:
        assert res.per_dataset[name].score == pytest.approx(ev.per_dataset[name].score, abs=1e-9)
    assert res.overall == pytest.approx(np.mean([r.score for r in res.per_dataset.values()]), abs=1e-12)
    f = json.loads((tmp_path / "direct" / "toy_doc_score.json").read_text())
    assert {"hit@1", "hit@5", "hit@10", "ndcg_linear@1", "ndcg_linear@5", "ndcg_linear@10"} <= set(f)
    assert f["prompt"] == "user" and f["video_mode"] == backbone.video_mode and f["mode"] == "direct"
    assert f["split_version"].startswith("toy-world-v4/eval/seed3") and f["latency_ms_per_query"] > 0
    assert len((tmp_path / "direct" / "toy_cls_pred.jsonl").read_text().splitlines()) == f["n_queries"]
    summary = json.loads((tmp_path / "direct" / "results.json").read_text())
    assert summary["overall"] == res.overall and summary["missing"] == []
    with pytest.raises(RunMismatch, match="config.prompt: 'user' -> 'raw'"):  # same folder, other prompt convention
        run_benchmark(backbone, source, reg, tmp_path, HarnessConfig(prompt="raw"), benchmark="toy", progress=False)


class _Interrupt(Exception):
    pass


def _counting(backbone, log, fail_at=None):
    enc = harness.direct_encoder(backbone)

    def f(inputs):
        log.append([x.name for x in inputs])
        if fail_at is not None and len(log) == fail_at:
            raise _Interrupt
        return enc(inputs)
    return f


def test_interrupted_run_resumes_without_recomputing(backbone, small_world, tmp_path):
    source, reg = _toy(small_world)
    cs = 5
    cfg = HarnessConfig(chunk_size=cs, latency_sample=0)
    clean = run_benchmark(backbone, source, reg, tmp_path / "clean", cfg, progress=False)
    total = clean.embedded["queries"] + clean.embedded["candidates"]
    cls, doc = source.load(reg["toy_cls"]), source.load(reg["toy_doc"])
    assert len(doc.candidates) > 2 * cs  # toy_doc's pool spans several chunks
    fail_at = math.ceil(len(cls.candidates) / cs) + math.ceil(len(cls.queries) / cs) + 2
    calls1 = []
    with pytest.raises(_Interrupt):  # killed while embedding toy_doc's 2nd chunk of candidates
        run_benchmark(backbone, source, reg, tmp_path / "run", cfg, encoder=_counting(backbone, calls1, fail_at),
                      candidate_encoder=_counting(backbone, calls1, fail_at), progress=False)
    assert (tmp_path / "run" / "direct" / "toy_cls_score.json").exists()
    assert not (tmp_path / "run" / "direct" / "toy_doc_score.json").exists()
    done_before = sum(len(c) for c in calls1[:-1])  # the failing call computed nothing
    calls2 = []
    res = run_benchmark(backbone, source, reg, tmp_path / "run", cfg, encoder=_counting(backbone, calls2),
                        candidate_encoder=_counting(backbone, calls2), progress=False)
    assert not any(name.startswith("toy_cls") for c in calls2 for name in c)  # finished: not touched
    assert sum(len(c) for c in calls2) == total - done_before  # cached chunks: not recomputed
    assert len(calls2[0]) == cs and calls2[0] == calls1[-1]  # toy_doc resumes at the chunk that failed
    assert res.embedded["queries"] + res.embedded["candidates"] == total - done_before
    assert {k: v.score for k, v in res.per_dataset.items()} == {k: v.score for k, v in clean.per_dataset.items()}
    assert res.per_dataset["toy_cls"].resumed and not res.per_dataset["toy_doc"].resumed
    calls3 = []
    again = run_benchmark(backbone, source, reg, tmp_path / "run", cfg, encoder=_counting(backbone, calls3),
                          candidate_encoder=_counting(backbone, calls3), progress=False)
    assert calls3 == [] and again.overall == res.overall and again.embedded == {"queries": 0, "candidates": 0}


def test_two_ranks_embed_disjoint_contiguous_blocks(backbone, small_world, tmp_path, monkeypatch):
    """Ranks simulated one after the other in this process; they meet in the shared cache folder."""
    source, reg = _toy(small_world, ("toy_doc",))
    cfg = HarnessConfig(chunk_size=3, latency_sample=0)
    one = run_benchmark(backbone, source, reg, tmp_path / "one", cfg, progress=False)
    assert [list(shard(7, r, 2)) for r in (0, 1)] == [[0, 1, 2], [3, 4, 5, 6]]
    assert [list(shard(4, r, 1)) for r in (0,)] == [[0, 1, 2, 3]]
    seen = {0: set(), 1: set()}

    def as_rank(r):
        monkeypatch.setattr(distributed, "rank", lambda: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        calls = []
        try:
            return run_benchmark(backbone, source, reg, tmp_path / "two", cfg, encoder=_counting(backbone, calls),
                                 candidate_encoder=_counting(backbone, calls), progress=False)
        finally:
            seen[r] |= {n for c in calls for n in c}
    with pytest.raises(RuntimeError, match="ranks must share"):  # rank 0 alone: rank 1's block is missing
        as_rank(0)
    assert as_rank(1) is None
    out = as_rank(0)
    assert not seen[0] & seen[1]
    assert len(seen[0]) + len(seen[1]) == one.embedded["queries"] + one.embedded["candidates"]
    assert out.per_dataset["toy_doc"].score == pytest.approx(one.per_dataset["toy_doc"].score, abs=1e-9)


def test_generated_tokens_and_latency_are_recorded(backbone, small_world, tmp_path):
    source, reg = _toy(small_world, ("toy_cls",))
    base = harness.direct_encoder(backbone)

    def reasoning(inputs):  # stands in for a reasoning mode: reports tokens per query
        return Encoded(base(inputs), [len(x.text.split()) for x in inputs])
    res = run_benchmark(backbone, source, reg, tmp_path, HarnessConfig(mode="always", latency_sample=2),
                        encoder=reasoning, progress=False)
    r = res.per_dataset["toy_cls"]
    es = source.load(reg["toy_cls"])
    assert r.generated_tokens_per_query == pytest.approx(np.mean([len(q.query.text.split()) for q in es.queries]))
    assert r.latency_ms_per_query > 0 and r.mode == "always" and (tmp_path / "always" / "toy_cls_score.json").exists()
    assert (tmp_path / "cache" / "always" / "toy_cls").is_dir()
    pred = [json.loads(x) for x in (tmp_path / "always" / "toy_cls_pred.jsonl").read_text().splitlines()]
    assert [p["generated_tokens"] for p in pred] == [len(q.query.text.split()) for q in es.queries]


def test_prompt_conventions(backbone):
    from PIL import Image

    inp = Input("a red star", Image.new("RGB", (64, 64), (200, 20, 20)), "Find the object:")
    chat = harness.render_prompt("chat", inp, [4])
    assert chat.startswith("<|im_start|>system\nFind the object:<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    raw = harness.render_prompt("raw", inp, [4])
    assert "<|im_start|>" not in raw and raw.endswith("Find the object:\na red star<|emb|>")
    assert raw.count("<|image_pad|>") == chat.count("<|image_pad|>") == 4
    embs = {p: harness.embed_prompted(backbone, [inp, Input("text only", instruction="Find:")], p)
            for p in harness.PROMPTS}
    assert torch.equal(embs["user"], embed(backbone, [inp, Input("text only", instruction="Find:")]))
    for p, e in embs.items():
        assert e.shape[0] == 2 and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5), p
    assert not torch.allclose(embs["chat"], embs["raw"])
    with pytest.raises(ValueError, match="prompt must be one of"):
        HarnessConfig(prompt="system")


# --- real MMEB-V2 schemas through the harness, and bad data ------------------------------------------


def _mmeb_reg(names=FIXTURE_DATASETS):
    return {n: MMEB_V2[n] for n in names}


def test_mmeb_fixture_runs_through_the_harness(backbone, tmp_path):
    root = write_mmeb(tmp_path / "MMEB-V2")
    res = run_benchmark(backbone, MMEBSource(root), MMEB_V2, tmp_path / "run", HarnessConfig(latency_sample=1),
                        benchmark="mmeb-v2", progress=False)
    assert set(res.per_dataset) == set(FIXTURE_DATASETS) and len(res.missing) == 78 - len(FIXTURE_DATASETS)
    assert res.overall == pytest.approx(np.mean([r.score for r in res.per_dataset.values()]), abs=1e-12)
    assert res.per_dataset["ViDoRe_arxivqa"].metric == "ndcg@5" and res.per_dataset["K700"].n_candidates == 3
    assert all(r.split_version == f"fixture/{n}@test" for n, r in res.per_dataset.items())
    assert res.skipped_records == 0 and res.per_dataset["ImageNet-1K"].easy is None


@pytest.mark.parametrize("case, dataset, message", [
    ("missing_frame", "Video-MME", r"Video-MME row 1: missing frame\(s\) \[5\]"),
    ("unreadable_image", "MSCOCO_t2i", r"MSCOCO_t2i row 1 candidate 2: corrupt or unreadable image .*img_3.jpg"),
    ("qrels_orphan", "ViDoRe_arxivqa", r"ViDoRe_arxivqa qrels row 5: corpus-id 'p-404' is not in the corpus"),
    ("empty_candidates", "ImageNet-1K", r"ImageNet-1K row 2: empty candidate list"),
])
def test_bad_data_is_skipped_and_counted_or_stops_in_strict_mode(backbone, tmp_path, case, dataset, message):
    root = write_mmeb(tmp_path / "MMEB-V2", bad={case})
    reg = _mmeb_reg((dataset,))
    with pytest.raises(DataError, match=message):
        run_benchmark(backbone, MMEBSource(root), reg, tmp_path / "strict",
                      HarnessConfig(strict=True, latency_sample=0), progress=False)
    res = run_benchmark(backbone, MMEBSource(root), reg, tmp_path / "lenient", HarnessConfig(latency_sample=0),
                        progress=False)
    r = res.per_dataset[dataset]
    assert r.skipped >= 1 and res.skipped_records == r.skipped
    assert any(re.search(message, p) for p in r.problems), r.problems
    f = json.loads((tmp_path / "lenient" / "direct" / f"{dataset}_score.json").read_text())
    assert f["skipped"] == r.skipped and f["problems"] == list(r.problems)
    if case == "unreadable_image":  # rows 1 and 2 rank img_3 and are dropped; row 0 is scored
        assert r.n_queries == 1 and r.n_candidates == 3


def _pred_ids(run, dataset):
    return [json.loads(x)["query"] for x in (run / "direct" / f"{dataset}_pred.jsonl").read_text().splitlines()]


def test_prediction_ids_are_unique_when_rows_share_a_video(backbone, tmp_path):
    root = write_mmeb(tmp_path / "MMEB-V2")
    (root / "video" / "MSR-VTT" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"video_id": "video0", "caption": "a man is singing"},
        {"video_id": "video1", "caption": "a cat plays piano"},
        {"video_id": "video0", "caption": "a man sings on stage"},  # a second caption row of video0
        {"video_id": "video2", "caption": "cars race on a track"}]) + "\n")
    reg, cfg = _mmeb_reg(("MSR-VTT",)), HarnessConfig(latency_sample=0)
    run_benchmark(backbone, MMEBSource(root), reg, tmp_path / "a", cfg, progress=False)
    ids = _pred_ids(tmp_path / "a", "MSR-VTT")
    assert len(ids) == 4 and len(set(ids)) == 4, ids
    run_benchmark(backbone, MMEBSource(root), reg, tmp_path / "b", cfg, progress=False)
    assert _pred_ids(tmp_path / "b", "MSR-VTT") == ids  # stable: another run writes the same ids


class _RepeatedIds:
    """A source whose item ids repeat (or are missing), as a hand-made or converted table can have."""

    root = "memory"

    def available(self, info):
        return True

    def version(self, info):
        return "test"

    def load(self, info, strict=False):
        from mmemb_lab.eval.mmeb import MMEBSet

        cands = {k: Input(k) for k in ("red", "green", "blue")}
        ids = ["a", "a", "b", "", "a@1"]
        qs = [EvalQuery(Input(f"query {i}"), tuple(cands), {"red": 1.0}, item_id=x) for i, x in enumerate(ids)]
        return MMEBSet(info.name, qs, cands, "local", version="test")


def test_prediction_ids_are_unique_and_keep_unique_item_ids(backbone, tmp_path):
    reg = _mmeb_reg(("ImageNet-1K",))
    res = run_benchmark(backbone, _RepeatedIds(), reg, tmp_path, HarnessConfig(latency_sample=0), progress=False)
    ids = _pred_ids(tmp_path, "ImageNet-1K")
    assert res.per_dataset["ImageNet-1K"].n_queries == 5 and len(set(ids)) == 5, ids
    assert ids[2] == "b" and ids[4] == "a@1"  # an item id that does not repeat is kept as it is
    assert ids[0].startswith("a@") and ids[1].startswith("a@") and ids[3]  # repeated or empty: positions added


def test_collapsed_encoder_is_flagged_in_the_score_file(backbone, small_world, tmp_path):
    """Constant embeddings tie everywhere: they score no better than the worst tie order, and say so."""
    source, reg = _toy(small_world, ("toy_cls",))
    const = lambda inputs: torch.nn.functional.normalize(torch.ones(len(inputs), 8), dim=-1)  # noqa: E731
    res = run_benchmark(backbone, source, reg, tmp_path, HarnessConfig(latency_sample=0), encoder=const,
                        candidate_encoder=const, progress=False)
    r = res.per_dataset["toy_cls"]
    f = json.loads((tmp_path / "direct" / "toy_cls_score.json").read_text())
    assert r.score == 0.0 and f["score"] == 0.0
    assert len(f["warnings"]) == 2 and all("(near) constant" in w for w in f["warnings"])
    assert harness.load_results(tmp_path, reg)["toy_cls"].warnings == r.warnings  # read back on resume
    preds = [json.loads(x) for x in (tmp_path / "direct" / "toy_cls_pred.jsonl").read_text().splitlines()]
    assert all(p["score"] == 0.0 for p in preds)


def test_harness_bench_measures_throughput_and_the_global_pool_saving(backbone):
    from mmemb_lab.bench import harness_bench

    b = harness_bench(backbone, n_eval=4)
    assert b["queries"] == 8 * 4 and b["queries_per_s"] > 0, b
    assert b["resumed_embedded"] == {"queries": 0, "candidates": 0}, b
    g = b["global_pool"]
    assert g["pool"] == 4 and g["queries"] == 4, b
    assert g["saving_ratio"] > 1, b  # 4 pool embeddings per query vs 4 in all (best of 3 timings each)
