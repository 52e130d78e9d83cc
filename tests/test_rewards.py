"""Stage-2 rewards, case by case: direct, reasoning that helps, that hurts, empty span, never-closed span, malformed."""

import math

import pytest
import torch

from mmemb_lab.method.rewards import (
    CostReward,
    FormatReward,
    PairTargets,
    RewardConfig,
    SpanTokens,
    UtilityGapReward,
    cost_reward,
    format_reward,
    parse_completion,
    reward_functions,
    total_reward,
    utility_gap,
    utility_reward,
)
from mmemb_lab.model.embed import Input, embed
from mmemb_lab.train.contrastive import log_prob_positive

CFG = RewardConfig(cost_per_token=0.1, cost_per_invocation=0.5, format_penalty=2.0)


@pytest.fixture(scope="module")
def tk(tokenizer):
    return SpanTokens.of(tokenizer)


def words(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def span(tk, body, close=True, emb=True):
    return [tk.think, *body] + ([tk.close] if close else []) + ([tk.emb] if emb else [])


# --- parsing -----------------------------------------------------------------------------------


def test_parse_every_shape(tokenizer, tk):
    r = words(tokenizer, " the red circle")
    assert parse_completion([tk.emb], tk).kind == "direct"
    p = parse_completion(span(tk, r), tk)
    assert (p.kind, p.rationale_ids, p.extra_tokens, p.invoked) == ("reason", tuple(r), len(r) + 2, True)
    assert parse_completion(span(tk, []), tk).kind == "empty"
    truncated = parse_completion(span(tk, r, close=False, emb=False), tk)
    assert (truncated.kind, truncated.extra_tokens, truncated.rationale_ids) == ("unclosed", len(r) + 1, tuple(r))
    assert parse_completion(span(tk, r, close=False), tk).kind == "unclosed"  # <|emb|> before </think>
    assert parse_completion(r + [tk.emb], tk).kind == "malformed"  # text instead of a decision
    assert parse_completion([tk.think, *r, tk.think, tk.close, tk.emb], tk).kind == "malformed"  # nested
    assert parse_completion([tk.think, *r, tk.close, *r, tk.emb], tk).kind == "malformed"  # text after </think>
    stopped = parse_completion([tk.think, *r, tk.close], tk)  # rollouts stop at </think>, like inference
    assert (stopped.kind, stopped.extra_tokens, stopped.rationale_ids) == ("reason", len(r) + 2, tuple(r))
    assert parse_completion([tokenizer.eos_token_id], tk).kind == "malformed"
    assert parse_completion([], tk).kind == "malformed"


# --- reward terms, case by case -------------------------------------------------------------------


def test_direct_completion_is_the_zero_baseline(tk):
    p = parse_completion([tk.emb], tk)
    assert utility_reward(p, s_direct=-2.0, s_reasoned=None) == 0.0
    assert cost_reward(p, CFG.cost_per_token, CFG.cost_per_invocation) == 0.0
    assert format_reward(p, CFG.format_penalty) == 0.0
    assert total_reward(p, -2.0, None, CFG) == 0.0


def test_reasoning_that_helps_earns_its_gap_minus_its_cost(tokenizer, tk):
    r = words(tokenizer, " left of the star")
    p = parse_completion(span(tk, r), tk)
    assert utility_gap(-0.5, -3.0) == 2.5
    assert utility_reward(p, -3.0, -0.5) == 2.5
    cost = CFG.cost_per_token * (len(r) + 2) + CFG.cost_per_invocation
    assert math.isclose(cost_reward(p, CFG.cost_per_token, CFG.cost_per_invocation), -cost)
    assert math.isclose(total_reward(p, -3.0, -0.5, CFG), 2.5 - cost)
    assert total_reward(p, -3.0, -0.5, CFG) > 0  # worth it: beats the direct completion
    assert total_reward(p, -3.0, -3.0 + 0.5 * cost, CFG) < 0  # helps, but less than it costs


def test_reasoning_that_hurts_is_worse_than_direct(tokenizer, tk):
    p = parse_completion(span(tk, words(tokenizer, " a wrong hop")), tk)
    assert utility_reward(p, -1.0, -4.0) == -3.0
    assert total_reward(p, -1.0, -4.0, CFG) < -3.0


def test_empty_span_earns_no_utility_and_pays_for_its_tokens(tk):
    p = parse_completion(span(tk, []), tk)
    assert p.well_formed
    assert utility_reward(p, -3.0, 5.0) == 0.0  # even if <think></think> moved the embedding: format only
    assert math.isclose(total_reward(p, -3.0, 5.0, CFG), -(2 * CFG.cost_per_token + CFG.cost_per_invocation))


def test_never_closed_span_pays_cost_and_penalty(tokenizer, tk):
    r = words(tokenizer, " the blue")
    p = parse_completion(span(tk, r, close=False, emb=False), tk)
    assert utility_reward(p, -3.0, 0.0) == 0.0
    assert format_reward(p, CFG.format_penalty) == -CFG.format_penalty
    expected = -(CFG.cost_per_token * (len(r) + 1) + CFG.cost_per_invocation) - CFG.format_penalty
    assert math.isclose(total_reward(p, -3.0, 0.0, CFG), expected)


def test_malformed_is_penalised(tokenizer, tk):
    p = parse_completion(words(tokenizer, " hello") + [tk.emb], tk)
    assert not p.invoked and format_reward(p, 2.0) == -2.0
    assert total_reward(p, -1.0, None, CFG) < -2.0


def test_config_rejects_negative_costs():
    with pytest.raises(ValueError):
        RewardConfig(cost_per_token=-0.1)
    with pytest.raises(ValueError):
        RewardConfig(temperature=0)


# --- the trl-callable reward objects ---------------------------------------------------------------


def _stub_pair():
    q = Input("which shape", None, "find it", None, "q0")
    return PairTargets("item0", q, Input("POS"), (Input("NEG0"), Input("NEG1"), Input("NEG2")), True, "toy")


def _stub_encoder(xs):
    """Unit vectors: targets are the axes; the direct query sits between them; a rationale saying
    "good" points at the positive, one saying "bad" at a negative."""
    out = []
    for x in xs:
        if x.text.startswith("POS"):
            v = [1.0, 0, 0, 0]
        elif x.text.startswith("NEG"):
            v = [0, 0, 0, 0]
            v[1 + int(x.text[-1])] = 1.0
        elif x.rationale and "good" in x.rationale:
            v = [1.0, 0.1, 0.1, 0.1]
        elif x.rationale and "bad" in x.rationale:
            v = [0.1, 1.0, 0.1, 0.1]
        else:
            v = [1.0, 1.0, 1.0, 1.0]
        out.append(torch.nn.functional.normalize(torch.tensor(v), dim=0))
    return torch.stack(out)


def test_utility_gap_reward_case_by_case(backbone, tokenizer, tk):
    rew = UtilityGapReward(backbone, [_stub_pair()], temperature=0.1, encoder=_stub_encoder, confidence="log_prob")
    cases = {"direct": [tk.emb], "helps": span(tk, words(tokenizer, " it is good")),
             "hurts": span(tk, words(tokenizer, " it is bad")), "empty": span(tk, []),
             "unclosed": span(tk, words(tokenizer, " it is good"), close=False, emb=False),
             "blank": span(tk, words(tokenizer, "   "))}
    out = dict(zip(cases, rew(prompts=[None] * len(cases), completions=[None] * len(cases),
                              completion_ids=list(cases.values()), item_id=["item0"] * len(cases))))
    s_d = math.log(0.25)  # the direct query is equally close to all four targets
    assert math.isclose(rew.last_s_direct[0], s_d, rel_tol=1e-5)
    assert out["direct"] == 0.0 and out["empty"] == 0.0 and out["unclosed"] == 0.0 and out["blank"] == 0.0
    assert out["helps"] > 1.0 and out["hurts"] < -1.0
    assert math.isclose(out["helps"], rew.last_s_reasoned[1] - s_d, rel_tol=1e-5)
    assert math.isnan(rew.last_s_reasoned[0])


def test_probability_scale_gap_is_bounded_and_keeps_the_order(backbone, tokenizer, tk):
    """confidence="prob" (the default): delta = p(t+ | q + r) - p(t+ | q), in [-1, 1]; the same sign and
    order as the log-gap, but a confidently wrong rationale costs at most p(t+ | q)."""
    cases = [[tk.emb], span(tk, words(tokenizer, " it is good")), span(tk, words(tokenizer, " it is bad"))]
    kw = dict(prompts=[None] * 3, completions=[None] * 3, completion_ids=cases, item_id=["item0"] * 3)
    logs = UtilityGapReward(backbone, [_stub_pair()], temperature=0.05, encoder=_stub_encoder, confidence="log_prob")
    probs = UtilityGapReward(backbone, [_stub_pair()], temperature=0.05, encoder=_stub_encoder)
    lg, pg = logs(**kw), probs(**kw)
    assert probs.confidence == RewardConfig().confidence == "prob"
    assert pg[0] == 0.0 and 0 < pg[1] <= 1 and -0.25 <= pg[2] < 0  # p(t+ | q) = 1/4: the most a rationale can lose
    assert lg[2] < -5  # ... while the log-gap of the same rationale is unbounded
    assert math.isclose(pg[1], math.exp(logs.last_s_reasoned[1]) - 0.25, rel_tol=1e-5)
    assert math.isclose(probs.last_s_direct[0], 0.25, rel_tol=1e-5)
    with pytest.raises(ValueError):
        RewardConfig(confidence="logit")


def test_a_frozen_embedder_scores_each_query_and_rationale_once(backbone, tokenizer, tk):
    seen = []

    def counting(xs):
        seen.extend(xs)
        return _stub_encoder(xs)

    ids = [[tk.emb], span(tk, words(tokenizer, " it is good")), span(tk, words(tokenizer, " it is bad"))]
    kw = dict(completion_ids=ids + ids[1:2], item_id=["item0"] * 4)
    fresh = UtilityGapReward(backbone, [_stub_pair()], encoder=_stub_encoder)(**kw)
    cached = UtilityGapReward(backbone, [_stub_pair()], encoder=counting, frozen_embedder=True)
    assert cached(**kw) == fresh
    n = len(seen)
    assert sum(x.rationale is not None for x in seen) == 2  # the repeated rationale embedded once
    assert cached(**kw) == fresh and len(seen) == n  # nothing embedded again


def test_utility_gap_uses_the_current_policy(make_backbone):
    """delta equals an independent computation with embed + log_prob_positive, and follows the weights."""
    from mmemb_lab.data import item_candidates, item_query
    from mmemb_lab.world.tasks import make_item

    bb = make_backbone(seed=4)
    it = make_item("toy_qa", 0, "train", 0, 0.5)
    cands = item_candidates(it)
    negs = tuple(c for j, c in enumerate(cands) if j not in it.labels)[:5]
    pair = PairTargets(it.item_id, item_query(it), cands[it.labels[0]], negs)
    tk = SpanTokens.of(bb.tokenizer)
    r_ids = words(bb.tokenizer, " the red circle is left")
    rew = UtilityGapReward(bb, [pair], temperature=0.05, confidence="log_prob")
    call = lambda: rew(completion_ids=[span(tk, r_ids), [tk.emb]], item_id=[it.item_id] * 2)  # noqa: E731
    got = call()
    e = embed(bb, [pair.query, item_query(it, bb.tokenizer.decode(r_ids).strip()), pair.positive, *negs])
    s = log_prob_positive(e[:2], e[2:3].expand(2, -1), e[3:][None].expand(2, -1, -1), 0.05)
    assert math.isclose(got[0], float(s[1] - s[0]), abs_tol=1e-3)
    assert got[1] == 0.0
    with torch.no_grad():
        bb.model.get_input_embeddings().weight.mul_(1.5)
    assert abs(call()[0] - got[0]) > 1e-4  # the reward is recomputed with the updated policy


def test_cost_and_format_rewards_have_trl_signature(tokenizer, tk):
    ids = [[tk.emb], span(tk, words(tokenizer, " ok")), [tk.think, tk.think]]
    cost = CostReward(tk, 0.1, 0.5)(prompts=[None] * 3, completions=[None] * 3, completion_ids=ids, trainer_state=None)
    fmt = FormatReward(tk, 2.0)(prompts=[None] * 3, completions=[None] * 3, completion_ids=ids)
    assert cost[0] == 0.0 and cost[1] < -0.5 and cost[2] < -0.5
    assert fmt == [0.0, 0.0, -2.0]


def test_reward_functions_have_distinct_names_for_trl(backbone):
    from trl.trainer.utils import get_callable_name

    funcs = reward_functions(backbone, [_stub_pair()])
    assert [get_callable_name(f) for f in funcs] == ["utility_gap", "reasoning_cost", "format"]
