"""Metrics against hand-computed rankings and an independent brute-force implementation."""

import itertools
import math
import random

import numpy as np
import pytest

from mmemb_lab.data import DatasetInfo
from mmemb_lab.eval.metrics import (
    Aggregate,
    QueryScores,
    aggregate,
    hit_at_k,
    ndcg_at_k,
    percent,
    rank_candidates,
    score_queries,
)
from mmemb_lab.eval.registry import META_TASKS, MMEB_V2

# ---------------------------------------------------------------- ranking and tie-breaking

def test_rank_candidates_best_first():
    assert rank_candidates([0.1, 0.7, -2.0, 0.3]).tolist() == [1, 3, 0, 2]


def test_ties_broken_by_lower_index_first():
    # three candidates tie at 0.9: they must come out as 1, 2, 4, then 0 (0.5), then 3 (0.1)
    scores = [0.5, 0.9, 0.9, 0.1, 0.9]
    assert rank_candidates(scores).tolist() == [1, 2, 4, 0, 3]
    # so a positive that ties with an earlier negative does not get Hit@1
    assert hit_at_k(rank_candidates(scores), [2], 1) == 0.0
    assert hit_at_k(rank_candidates(scores), [1], 1) == 1.0
    # all-equal scores: identity order
    assert rank_candidates(np.zeros(6)).tolist() == list(range(6))


def test_ties_count_against_the_model():
    """A collapsed model (every score equal) must not score 100 because its positive is listed first."""
    collapsed = np.zeros((4, 5))  # four queries, five candidates each, the positive first (the MMEB layout)
    res = score_queries(collapsed, [0, 0, 0, {0: 1.0}], metric="hit@1", ks=(1, 5))
    assert res.hit[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert res.hit[5].tolist() == [1.0] * 4  # ranked last of five, still inside the top 5
    # the positive sits at rank 5 behind four equal negatives: NDCG@5 = (1/log2 6) / 1 = 0.3868528
    assert res.ndcg_linear[5] == pytest.approx([0.3868528] * 4, abs=1e-7)
    # partial ties: candidates 1, 2, 4 tie at 0.9; the positive 2 goes below both negatives it ties with
    scores = [0.5, 0.9, 0.9, 0.1, 0.9]
    assert rank_candidates(scores, [2]).tolist() == [1, 4, 2, 0, 3]
    assert score_queries([np.array(scores)], [[2]], metric="hit@1", ks=(1, 3)).hit[3].tolist() == [1.0]
    assert score_queries([np.array(scores)], [[2]], metric="hit@1", ks=(1, 2)).hit[2].tolist() == [0.0]
    # graded ties: the lower grade first, so among three equal scores grade 1 precedes grade 2
    assert rank_candidates([0.3, 0.3, 0.3, 0.9], {0: 2.0, 1: 1.0}).tolist() == [3, 2, 1, 0]
    # a strictly higher score still wins whatever the grades, and without ties nothing changes
    assert rank_candidates([0.2, 0.7, 0.1], {0: 3.0}).tolist() == rank_candidates([0.2, 0.7, 0.1]).tolist()
    assert score_queries(np.eye(3), [0, 1, 2], metric="hit@1").main == 1.0


def test_rank_candidates_rowwise_and_rejects_nan():
    m = np.array([[0.0, 1.0, 0.5], [3.0, 3.0, 4.0]])
    assert rank_candidates(m).tolist() == [[1, 2, 0], [2, 0, 1]]
    with pytest.raises(ValueError):
        rank_candidates([0.1, float("nan")])


# ---------------------------------------------------------------- Hit@k

def test_hit_at_k_by_hand():
    ranking = [2, 0, 1]
    assert [hit_at_k(ranking, [1], k) for k in (1, 2, 3)] == [0.0, 0.0, 1.0]
    assert hit_at_k(ranking, [0, 1], 2) == 1.0          # any positive counts
    assert hit_at_k(ranking, 2, 1) == 1.0               # a bare index is one positive
    assert hit_at_k(ranking, {2: 0.0, 1: 1.0}, 1) == 0.0  # grade 0 is not a positive
    with pytest.raises(ValueError):
        hit_at_k(ranking, [1], 0)


# ---------------------------------------------------------------- NDCG@k (linear gain)

def test_graded_ndcg_at_5_by_hand():
    # labels: candidate 0 -> 3, 1 -> 2, 2 -> 1, 5 -> 2 (5 is ranked 6th, outside the top 5)
    ranking = [3, 0, 4, 1, 2, 5]
    relevance = {0: 3, 1: 2, 2: 1, 5: 2}
    # top-5 gains by position 1..5: [0, 3, 0, 2, 1]
    # DCG  = 3/log2(3) + 2/log2(5) + 1/log2(6)
    #      = 1.8927893 + 0.8613531 + 0.3868528 = 3.1409952
    # IDCG = grades sorted desc, top 5: [3, 2, 2, 1]
    #      = 3/log2(2) + 2/log2(3) + 2/log2(4) + 1/log2(5)
    #      = 3 + 1.2618595 + 1 + 0.4306766 = 5.6925361
    # NDCG@5 = 3.1409952 / 5.6925361 = 0.5517743
    assert ndcg_at_k(ranking, relevance, 5) == pytest.approx(0.5517743, abs=1e-6)
    # exponential gain (2^rel - 1) would give 0.5631644: make sure we are on the linear side
    assert abs(ndcg_at_k(ranking, relevance, 5) - 0.5631644) > 1e-3
    # a dense per-candidate grade list means the same thing
    dense = [3, 2, 1, 0, 0, 2]
    assert ndcg_at_k(ranking, dense, 5) == pytest.approx(0.5517743, abs=1e-6)


def test_ndcg_simple_cases_by_hand():
    # one positive at rank 2 of a binary query: (1/log2 3) / 1 = 0.6309298
    assert ndcg_at_k([4, 7, 1], {7: 1.0}, 5) == pytest.approx(1 / math.log2(3), abs=1e-12)
    # a sequence is a dense grade per candidate index (unlike hit_at_k, where it lists positives):
    # grades [0, 1] mean candidate 1 is relevant, ranked first here
    assert ndcg_at_k([1, 0], [0, 1], 5) == 1.0 and ndcg_at_k([0, 1], [0, 1], 5) < 1.0
    # perfect ranking -> 1, positive below the cut-off -> 0
    assert ndcg_at_k([1, 0, 2], {1: 2.0, 0: 1.0}, 5) == pytest.approx(1.0)
    assert ndcg_at_k([0, 1, 2, 3], {3: 1.0}, 3) == 0.0


def test_reference_grade_pairing_example_of_the_docstring():
    """The module docstring's example: qrels p0 -> 2, p1 -> 1, perfect ranking p0, p1, p2 (indices 0, 1, 2)."""
    import mmemb_lab.eval.metrics as metrics

    ours = ndcg_at_k([0, 1, 2], {0: 2.0, 1: 1.0}, 5)
    swapped = ndcg_at_k([0, 1, 2], {0: 1.0, 1: 2.0}, 5)  # the grades paired the other way round
    assert ours == pytest.approx(1.0, abs=1e-12)
    assert swapped == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)), abs=1e-12)
    for number in (f"{2 + 1 / math.log2(3):.7f}", f"{1 + 2 / math.log2(3):.7f}", f"{swapped:.7f}"):
        assert number in metrics.__doc__, number


def test_ndcg_zero_when_ideal_dcg_is_zero():
    assert ndcg_at_k([0, 1, 2], {1: 0.0}, 5) == 0.0
    assert ndcg_at_k([0, 1, 2], [0.0, 0.0, 0.0], 5) == 0.0
    assert ndcg_at_k([0, 1, 2], {}, 5) == 0.0
    with pytest.raises(ValueError):
        ndcg_at_k([0, 1], {0: -1.0}, 5)


# ---------------------------------------------------------------- brute force agreement

def _bf_ranking(scores):
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _bf_dcg(order, grades, k):
    return sum(grades.get(c, 0.0) / math.log2(pos + 1) for pos, c in enumerate(order[:k], start=1))


def _bf_ndcg(order, grades, k, n):
    # ideal DCG as the best DCG over every ordering of the candidates (no sorting shortcut)
    ideal = max(_bf_dcg(list(p), grades, k) for p in itertools.permutations(range(n)))
    return _bf_dcg(order, grades, k) / ideal if ideal > 0 else 0.0


def _bf_hit(order, grades, k):
    return 1.0 if any(grades.get(c, 0.0) > 0 for c in order[:k]) else 0.0


def _bf_worst(scores, grades, k, n):
    """The worst Hit@k and NDCG@k over every ordering that sorts the scores (ties in any order)."""
    orders = [list(p) for p in itertools.permutations(range(n))
              if all(scores[a] >= scores[b] for a, b in zip(p, p[1:]))]
    return (min(_bf_hit(o, grades, k) for o in orders),
            min(_bf_ndcg(o, grades, k, n) for o in orders))


def test_agrees_with_brute_force_on_random_rankings():
    rng = random.Random(0)
    ks = (1, 2, 3, 5, 10)
    rows, labels = [], []
    for _ in range(200):
        n = rng.randint(1, 6)
        scores = [float(rng.randint(0, 4)) for _ in range(n)]  # small range -> many ties
        grades = {c: float(rng.choice([0, 0, 1, 2, 3])) for c in rng.sample(range(n), rng.randint(0, n))}
        rows.append(np.array(scores))
        labels.append(grades)
    res = score_queries(rows, labels, metric="ndcg@5", ks=ks)
    for q, (scores, grades) in enumerate(zip(rows, labels)):
        order = _bf_ranking(scores.tolist())
        assert rank_candidates(scores).tolist() == order
        for k in ks:
            expected_ndcg = _bf_ndcg(order, grades, k, len(scores))
            assert abs(ndcg_at_k(order, grades, k) - expected_ndcg) < 1e-9
            # score_queries counts ties against the model: its metrics are the worst over all tie orders,
            # never above those of the plain (lower index first) order
            worst_hit, worst_ndcg = _bf_worst(scores.tolist(), grades, k, len(scores))
            assert abs(res.ndcg_linear[k][q] - worst_ndcg) < 1e-9 and worst_ndcg <= expected_ndcg + 1e-12
            assert res.hit[k][q] == worst_hit <= _bf_hit(order, grades, k)
    for k in ks:
        assert abs(res.means[f"ndcg_linear@{k}"] - sum(res.ndcg_linear[k]) / 200) < 1e-12


# ---------------------------------------------------------------- score_queries

def test_score_queries_by_hand():
    scores = np.array([
        [0.9, 0.1, 0.2, 0.3],   # ranking 0,3,2,1
        [0.1, 0.2, 0.9, 0.3],   # ranking 2,3,1,0
        [0.5, 0.1, 0.2, 0.9],   # ranking 3,0,2,1
    ])
    labels = [0, [1, 2], {3: 2.0, 0: 1.0}]
    res = score_queries(scores, labels, metric="hit@1", ks=(1, 5))
    assert isinstance(res, QueryScores)
    assert res.ks == (1, 5) and res.n_queries == 3 and res.metric == "hit@1"
    assert res.hit[1].tolist() == [1.0, 1.0, 1.0]
    # query 1: positives 1 and 2 at ranks 3 and 1; ideal puts them at ranks 1, 2
    # NDCG@5 = (1/log2 2 + 1/log2 4) / (1/log2 2 + 1/log2 3) = 1.5 / 1.6309298 = 0.9197208
    assert res.ndcg_linear[5][1] == pytest.approx(0.9197208, abs=1e-6)
    assert res.ndcg_linear[5][0] == 1.0 and res.ndcg_linear[5][2] == 1.0
    assert res.main == res.means["hit@1"] == 1.0
    assert res.means["ndcg_linear@5"] == pytest.approx((2 + 0.9197208) / 3, abs=1e-6)


def test_score_queries_local_lists_of_different_sizes_and_metric_k_added():
    rows = [np.array([0.2, 0.8]), np.array([0.3, 0.1, 0.2, 0.0, 0.9])]
    res = score_queries(rows, [0, 4], metric="ndcg@5", ks=(1,))
    assert res.ks == (1, 5) and res.metric == "ndcg_linear@5"
    assert res.hit[1].tolist() == [0.0, 1.0]
    # query 0: its positive is second -> 1/log2(3)
    assert res.main == pytest.approx((1 / math.log2(3) + 1.0) / 2)
    for arr in list(res.hit.values()) + list(res.ndcg_linear.values()):
        assert ((arr >= 0) & (arr <= 1)).all()


def test_score_queries_rejects_bad_input():
    with pytest.raises(ValueError):
        score_queries(np.zeros((2, 3)), [0], metric="hit@1")        # one label short
    with pytest.raises(ValueError):
        score_queries(np.zeros((1, 3)), [3], metric="hit@1")        # label out of range
    with pytest.raises(ValueError):
        score_queries(np.zeros((1, 3)), [0], metric="recall@1")     # unknown metric
    with pytest.raises(ValueError):
        score_queries(np.zeros((0, 3)), [], metric="hit@1")         # no queries


def test_every_registry_metric_is_accepted():
    for metric in {info.metric for info in MMEB_V2.values()}:
        assert 0.0 <= score_queries(np.eye(3), [0, 1, 2], metric=metric).main == 1.0


# ---------------------------------------------------------------- aggregation

def _info(name, modality, meta_task):
    return DatasetInfo(name, modality, meta_task, "hit@1", "local", name, "instr")


def test_overall_is_mean_over_datasets_not_modality_means():
    registry = {"a": _info("a", "image", "CLS"), "b": _info("b", "image", "QA"),
                "c": _info("c", "video", "CLS")}
    agg = aggregate({"a": 80.0, "b": 60.0, "c": 20.0}, registry)
    assert isinstance(agg, Aggregate)
    # mean over datasets = (80 + 60 + 20) / 3 = 53.33; mean of modality means = (70 + 20) / 2 = 45
    assert agg.overall == pytest.approx(160 / 3)
    assert agg.per_modality == {"image": 70.0, "video": 20.0}
    assert abs(agg.overall - np.mean(list(agg.per_modality.values()))) > 8
    assert agg.per_meta_task == {"image/CLS": 80.0, "image/QA": 60.0, "video/CLS": 20.0}
    assert agg.n_datasets == 3 and agg.missing == ()


def test_aggregate_full_mmeb_v2_weights_modalities_by_dataset_count():
    per_dataset = {n: (100.0 if i.modality == "image" else 0.0) for n, i in MMEB_V2.items()}
    agg = aggregate(per_dataset, MMEB_V2)
    assert agg.overall == pytest.approx(100 * 36 / 78)   # 46.15, not 100/3
    assert agg.per_modality == {"image": 100.0, "video": 0.0, "visdoc": 0.0}
    assert list(agg.per_meta_task) == [f"{m}/{t}" for m, t in META_TASKS]


def test_aggregate_reports_missing_and_rejects_unknown():
    per_dataset = {n: 50.0 for n in MMEB_V2 if n != "MSVD"}
    per_dataset["ImageNet-1K"] = 127.0
    agg = aggregate(per_dataset, MMEB_V2)
    assert agg.missing == ("MSVD",) and agg.n_datasets == 77
    assert agg.overall == pytest.approx((76 * 50 + 127) / 77)
    with pytest.raises(KeyError):
        aggregate({"NotADataset": 1.0}, MMEB_V2)
    with pytest.raises(ValueError):
        aggregate({}, MMEB_V2)


def test_percent():
    assert percent(0.25) == 25.0
    assert percent(np.array([0.5, 1.0])).tolist() == [50.0, 100.0]
