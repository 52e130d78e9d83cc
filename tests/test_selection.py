"""Counterfactual gains and selection, on hand-built embeddings where the right answer is known."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmemb_lab.method.selection import TAU, Pair, random_worker, score_pairs, select, swap_partners
from mmemb_lab.method.workers import FORMAT_ONLY_TEXT, Rationale
from mmemb_lab.model.embed import Input
from mmemb_lab.world.tasks import make_item

D = 8


def _vec(*pairs):
    v = torch.zeros(D)
    for i, w in pairs:
        v[i] = w
    return F.normalize(v, dim=0)


def _fake_embedder(table):
    """Text -> hand-built vector; a query with a rationale is looked up by its rationale text."""
    def f(inputs):
        return torch.stack([table[x.rationale if x.rationale is not None else ("Q:" + x.name)]
                            if x.rationale is not None or ("Q:" + x.name) in table else table[x.text]
                            for x in inputs])
    return f


def _pairs():
    items = [make_item("toy_qa", 0, "train", i, 1.0) for i in (0, 1)]
    pairs, table = [], {}
    for n, it in enumerate(items):
        pos, negs = f"pos{n}", [f"neg{n}a", f"neg{n}b"]
        table[pos], table[negs[0]], table[negs[1]] = _vec((0 + 3 * n, 1)), _vec((1 + 3 * n, 1)), _vec((2 + 3 * n, 1))
        table["Q:" + it.item_id] = _vec((0 + 3 * n, 0.3), (1 + 3 * n, 1))  # direct: leans to a negative
        good, bad = f"good{n}", f"bad{n}"
        table[good] = _vec((0 + 3 * n, 1), (1 + 3 * n, 0.1))   # reasoning that points at the positive
        table[bad] = _vec((2 + 3 * n, 1))                       # reasoning that points at a negative
        rats = [Rationale("concise", good), Rationale("format_only", FORMAT_ONLY_TEXT), Rationale("hallucinating", bad)]
        pairs.append(Pair(it, Input(pos), [Input(x) for x in negs], rats))
    # the format-only text moves every query the same way, a little toward its positive... of pair 0 only
    table[FORMAT_ONLY_TEXT] = _vec((0, 1), (1, 1))
    return pairs, table


def test_gain_signs_and_ordering():
    pairs, table = _pairs()
    t = score_pairs(_fake_embedder(table), pairs, temperature=0.1)
    g = t.gain_removal
    assert g[0, 0] > 0 and g[1, 0] > 0           # the good rationale helps
    assert g[0, 2] < 0 and g[1, 2] < 0           # the wrong one hurts
    assert g[0, 0] > g[0, 1] > g[0, 2]           # ordering good > format > bad
    # logp is an InfoNCE log-probability against the pair's own negatives
    q, pos = table["good0"], table["pos0"]
    negs = torch.stack([table["neg0a"], table["neg0b"]])
    logits = torch.cat([(q @ pos)[None], negs @ q]) / 0.1
    assert math.isclose(t.logp_with[0, 0], float(torch.log_softmax(logits, 0)[0]), rel_tol=1e-5)


def test_swap_exposes_a_format_only_benefit():
    pairs, table = _pairs()
    t = score_pairs(_fake_embedder(table), pairs, temperature=0.1)
    assert t.gain_removal[0, 1] > TAU            # removal alone would keep format-only for pair 0 ...
    assert t.gain_swap[0, 1] == 0.0              # ... swap (same text for another query) gives it nothing
    assert select(t, "removal").choice[0] == 0   # the best is still the good one
    s = select(t, "swap")
    assert list(s.choice) == [0, 0]


def test_swap_max_measures_every_candidate_against_the_strongest_swapped_rationale():
    """swap_max: one intervention per pair (the best of the partner's valid rationales), so a wrong rationale
    cannot pass just because its own worker's swap partner happened to be worse."""
    pairs, table = _pairs()
    t = score_pairs(_fake_embedder(table), pairs, temperature=0.1)
    strongest = np.nanmax(np.where(t.valid, t.logp_swap, np.nan), axis=1)
    assert np.allclose(t.gain_swap_max, t.logp_with - strongest[:, None])
    assert (t.gain_swap_max <= t.gain_swap + 1e-9).all()      # never laxer than the per-worker swap
    assert np.allclose(t.gains("swap_max"), t.gain_swap_max)
    assert select(t, "swap_max").choice[1] == 0               # the good rationale still beats the other query's


def test_swap_never_pairs_a_query_with_itself():
    ds = ["a", "a", "b", "a", "b", "c"]
    p = swap_partners(ds)
    for i, j in enumerate(p):
        if ds[i] == "c":
            assert j == -1
        else:
            assert j != i and ds[j] == ds[i]
    assert sorted(p[[0, 1, 3]]) == [0, 1, 3]  # a permutation within each dataset


def test_no_reasoning_when_nothing_clears_tau_and_random_baseline():
    pairs, table = _pairs()
    t = score_pairs(_fake_embedder(table), pairs, temperature=0.1)
    s = select(t, "swap", tau=1e9)
    assert (s.choice == -1).all() and s.no_reasoning_rate(True) == 1.0
    r = random_worker(t, seed=0)
    assert (r.choice >= 0).all()


def test_invalid_rationales_are_never_selected():
    pairs, table = _pairs()
    p0 = pairs[0]
    pairs[0] = Pair(p0.item, p0.positive, p0.negatives,
                    [Rationale("concise", "", "empty")] + p0.rationales[1:])
    t = score_pairs(_fake_embedder(table), pairs, temperature=0.1)
    assert not t.valid[0, 0] and np.isnan(t.logp_with[0, 0])
    assert select(t, "removal").choice[0] != 0


def test_batched_scoring_equals_each_candidate_scored_alone(backbone):
    """score_pairs shares targets and batches query variants; scoring each candidate on its own (the bench's
    baseline) gives the same gains."""
    from mmemb_lab.method.selection import score_candidate, toy_pairs
    from mmemb_lab.method.workers import toy_rationales

    items = [make_item(d, 0, "train", i, 0.8) for i, d in enumerate(["toy_qa", "toy_doc", "toy_qa", "toy_doc"])]
    pairs = toy_pairs(items, [toy_rationales(it, 0) for it in items])
    table = score_pairs(backbone, pairs, batch_size=7)
    checked = 0
    for i, p in enumerate(pairs):
        for j, r in enumerate(p.rationales):
            if r.status != "ok":
                continue
            s = pairs[table.swap_partner[i]].rationales[j]
            removal, swap = score_candidate(backbone, p, r.text, s.text if s.status == "ok" else None)
            assert math.isclose(removal, table.gain_removal[i, j], abs_tol=2e-4)
            if swap is not None:
                assert math.isclose(swap, table.gain_swap[i, j], abs_tol=2e-4)
                checked += 1
    assert checked >= 8


def test_swap_partner_has_another_target():
    """A rationale written for a query with the same target is no counterfactual: skip to the next one."""
    ds = ["a", "a", "a", "a", "b", "b"]
    tg = ["x", "x", "y", "x", "z", "z"]
    p = swap_partners(ds, tg)
    assert list(p) == [2, 2, 3, 2, -1, -1]
    assert all(j < 0 or (tg[j] != tg[i] and ds[j] == ds[i]) for i, j in enumerate(p))


def _tied_table(n_tied=30, n_told=10):
    """Two workers whose rationales tie under the evaluator on ``n_tied`` pairs (the wrong one ahead by
    noise) and are told apart on ``n_told`` (the wrong one far behind)."""
    from mmemb_lab.method.selection import GainTable

    n = n_tied + n_told
    with_ = np.stack([np.full(n, -0.100), np.r_[np.full(n_tied, -0.099), np.full(n_told, -5.0)]], axis=1)
    nan = np.full((n, 2), np.nan)
    return GainTable([f"qa-{i}" for i in range(n)], ["toy_qa"] * n, np.ones(n, bool), ["concise", "hallucinating"],
                     [["a", "b"]] * n, np.ones((n, 2), bool), np.tile([True, False], (n, 1)), np.full(n, -3.0),
                     with_, np.full((n, 2), -6.0), np.zeros(n), nan, nan, np.arange(n)[::-1].copy())


def test_the_fitted_worker_prior_breaks_ties_toward_the_worker_that_wins_where_it_is_told_apart():
    from mmemb_lab.method.selection import worker_prior

    t = _tied_table()
    prior = worker_prior(t)
    assert prior.shape == (3,) and np.isclose(prior.sum(), 1.0)
    assert prior[1] > 0.8 and prior[2] < 0.15 and prior[0] < 0.05   # none, concise, hallucinating
    uniform, fitted = select(t, "both"), select(t, "both", prior=prior)
    assert (uniform.choice[:30] == 1).all() and uniform.precision() < 0.3   # noise decides the ties
    assert (fitted.choice == 0).all() and fitted.precision() == 1.0
    # the prior ranks, it never lets a candidate through: nothing passes tau -> no reasoning
    assert (select(t, "both", tau=1e9, prior=prior).choice == -1).all()
    # and it is fitted from confidences only: flipping the ground truth changes nothing
    flipped = dataclasses.replace(t, correct=~t.correct)
    assert np.allclose(worker_prior(flipped), prior)


def test_precision_best_ranking_bounds_every_choice_among_the_passing_candidates():
    """The oracle ranking's precision: pairs where a wrong candidate alone clears tau count against every
    ranking; pairs where a correct one clears it too count for the oracle whatever the prior picks."""
    t = _tied_table()   # 30 ties (both pass, the correct one among them), 10 where only the correct one passes
    uniform = select(t, "both")
    assert uniform.precision() < 0.3 and uniform.precision_best_ranking() == 1.0
    only_wrong = dataclasses.replace(t, logp_with=t.logp_with[:, ::-1].copy())  # the wrong one alone passes on 10
    s = select(only_wrong, "both")
    assert s.precision_best_ranking() == 0.75 and s.precision() <= s.precision_best_ranking()
    assert np.isnan(select(t, "both", tau=1e9).precision_best_ranking())


def test_both_max_does_not_keep_a_rationale_for_out_gaining_its_own_workers_swap():
    """Seed 0's "cls-57": the hallucinating rationale's own swap partner is wrong too, so its per-worker swap
    gain clears tau where the correct one's (against a correct partner) does not; "both" keeps it. "both_max"
    measures both against the strongest swapped rationale: neither is kept on that evidence."""
    from mmemb_lab.method.selection import GainTable

    nan = np.full((1, 2), np.nan)
    t = GainTable(["cls-57"], ["toy_cls"], np.ones(1, bool), ["concise", "hallucinating"], [["a", "b"]],
                  np.ones((1, 2), bool), np.array([[True, False]]), np.array([-2.64]),
                  np.array([[-0.01, -0.21]]), np.array([[-0.53, -1.18]]), np.zeros(1), nan, nan, np.zeros(1, int))
    assert t.gain_swap[0, 1] > TAU > t.gain_swap[0, 0] and (t.gain_removal > TAU).all()
    assert select(t, "both").choice[0] == 1                 # the hallucinating rationale is kept
    assert (t.gains("both_max") < TAU).all() and select(t, "both_max").choice[0] == -1
    good = dataclasses.replace(t, logp_swap=np.array([[-1.5, -1.18]]))  # a partner the correct one does beat
    assert select(good, "both_max").choice[0] == 0


def test_no_reasoning_per_dataset_and_the_headroom_figure_show_the_tables_numbers():
    from mmemb_lab.figures import reasoning_headroom
    from mmemb_lab.method.selection import Selection
    from mmemb_lab.summary import GateSummary, ModeScores, SelectionSummary

    t = dataclasses.replace(_tied_table(4, 2), datasets=["toy_qa"] * 3 + ["toy_doc"] * 3,
                            needs_reasoning=np.array([True, True, False, True, True, True]),
                            logp_direct=np.log([0.9, 0.2, 0.9, 0.55, 0.45, 0.1]))
    s = Selection("both", TAU, np.array([0, -1, -1, -1, -1, 1]), t)
    per = s.no_reasoning_rate_per_dataset(True)
    assert per == {"toy_doc": 2 / 3, "toy_qa": 0.5}   # the easy qa pair counts in neither
    assert s.no_reasoning_rate_per_dataset(False) == {"toy_qa": 1.0}
    # p(t+ | q) >= 1/2 = exp(-ln 2): no rationale can double it (0.55 is solved, 0.45 is not)
    solved = s.solved_directly_rate_per_dataset(True)
    assert solved == {"toy_doc": 1 / 3, "toy_qa": 0.5}
    sel = SelectionSummary(tau=TAU, precision=None, recall_on_opportunity=None, selected_share_by_worker={},
                           worker_step_accuracy={}, no_reasoning_rate_hard_per_dataset=per,
                           solved_directly_rate_hard_per_dataset=solved,
                           gold_rationale_hard_per_dataset={"direct": {"toy_qa": 30.0, "toy_doc": 50.0},
                                                            "gold": {"toy_qa": 90.0, "toy_doc": 52.0}})
    gate = GateSummary(threshold=0.5, curve=[], threshold_choice={}, latency={},
                       invocation_per_dataset={"toy_qa": {"hard": 0.9}, "toy_doc": {"hard": 0.0}})

    def stage0(easy):
        return ModeScores(overall=0.0, easy=None, hard=None, per_dataset={}, per_dataset_easy=easy,
                          per_dataset_hard={}, latency_ms_per_query=None)

    fig = reasoning_headroom(stage0({"toy_qa": 100.0, "toy_doc": 62.0}), sel, gate)
    bars = {tr.name: dict(zip(tr.x, tr.y)) for tr in fig.data}
    assert bars["direct"] == {"toy_qa": 30.0, "toy_doc": 50.0} and bars["with the gold rationale"]["toy_doc"] == 52.0
    assert bars["direct, easy items"] == {"toy_qa": 100.0, "toy_doc": 62.0}
    assert bars["selection kept a rationale"] == {"toy_qa": 0.5, "toy_doc": pytest.approx(1 / 3)}
    assert bars["gate opens (eval)"] == {"toy_qa": 0.9, "toy_doc": 0.0}
    assert bars["solved directly (no rationale can gain tau)"] == {"toy_qa": 0.5, "toy_doc": pytest.approx(1 / 3)}
    assert "gate opens (eval)" not in {tr.name for tr in reasoning_headroom(stage0({}), sel).data}


def test_recall_on_opportunity_counts_only_hard_pairs_where_a_correct_candidate_clears_tau():
    from mmemb_lab.method.selection import Selection, worker_prior

    t = _tied_table()   # 40 hard pairs; the correct worker's removal gain is 2.9 on every one
    uniform, fitted = select(t, "both"), select(t, "both", prior=worker_prior(t))
    assert uniform.recall_on_opportunity() == 10 / 40   # noise hands the 30 ties to the wrong worker
    assert fitted.recall_on_opportunity() == 1.0
    none = Selection("both", TAU, np.full(40, -1), t)
    assert none.recall_on_opportunity() == 0.0          # opportunities missed count against it
    no_opp = dataclasses.replace(t, correct=np.zeros((40, 2), bool))
    assert np.isnan(select(no_opp, "both").recall_on_opportunity())
    easy = dataclasses.replace(t, needs_reasoning=np.zeros(40, bool))
    assert np.isnan(select(easy, "both").recall_on_opportunity())
    step = dataclasses.replace(t, step_accuracy=np.tile([1.0, 0.5], (40, 1)))
    assert step.step_accuracy is not None and select(step, "both").worker_step_accuracy() == {"concise": 1.0,
                                                                                          "hallucinating": 0.5}
