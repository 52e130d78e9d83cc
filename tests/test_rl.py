"""Stage 2 with trl's GRPOTrainer: advantages, the processor trl sees, and tiny runs that move the gate."""

import json

import numpy as np
import pytest
import torch

from mmemb_lab.data import item_query
from mmemb_lab.method.rewards import RewardConfig, SpanTokens, parse_completion, reward_functions
from mmemb_lab.method.rl import (
    RLConfig,
    group_advantages,
    make_processor,
    probe_invocation,
    prompt_messages,
    read_rl_run,
    rl_dataset,
    toy_rl_pairs,
    train_rl,
)
from mmemb_lab.model.embed import collate
from mmemb_lab.world.tasks import make_item


def test_group_advantages_have_zero_mean_per_group_and_match_trl():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(0)
    r = torch.randn(5 * 4, generator=g) * 3 + 1
    a = group_advantages(r, 4)
    assert torch.allclose(a.view(5, 4).mean(1), torch.zeros(5), atol=1e-5)
    grouped = r.view(5, 4)
    trl_way = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    assert torch.allclose(a, trl_way.reshape(-1), atol=1e-6)
    assert torch.allclose(a.view(5, 4).std(1), torch.ones(5), atol=1e-3)  # unit std per group
    assert torch.allclose(group_advantages(r, 4, scale="none").view(5, 4).sum(1), torch.zeros(5), atol=1e-5)
    flat = group_advantages([1.0, 1.0, 0.0, 2.0], 2)
    assert flat[:2].tolist() == [0.0, 0.0]  # a group with equal rewards carries no signal
    assert flat[2] < 0 < flat[3]
    with pytest.raises(ValueError):
        group_advantages(r, 3)


@pytest.mark.parametrize("dataset", ["toy_qa", "toy_t2i", "toy_video_qa"])
def test_trl_prompts_are_the_embedders_prompts(backbone, dataset):
    """The processor trl tokenises with renders exactly ``embed.prompt_text``: same ids, same pixels."""
    q = item_query(make_item(dataset, 0, "train", 1, 0.5))
    msgs, ims = prompt_messages(q, backbone.video_mode)
    k = iter(ims)
    msgs = [{"role": "user", "content": [dict(c, image=next(k)) if c["type"] == "image" else c
                                         for c in msgs[0]["content"]]}]
    got = make_processor(backbone).apply_chat_template([msgs], add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt")
    ref = collate(backbone, [q], [""])
    assert got["input_ids"].tolist() == ref["input_ids"].tolist()
    if ims:
        assert torch.allclose(torch.as_tensor(got["pixel_values"]), ref["pixel_values"])


def test_processor_builds_for_qwen2_5_vl(make_backbone):
    bb = make_backbone("qwen2_5_vl")
    q = item_query(make_item("toy_qa", 0, "train", 0, 0.5))
    msgs, ims = prompt_messages(q)
    text = make_processor(bb).apply_chat_template([msgs], add_generation_prompt=True, tokenize=False)[0]
    out = make_processor(bb)(images=[ims, None], text=[text, "<|im_start|>user\nhi<|im_end|>\n"], padding=True)
    assert out["input_ids"][0][-len(collate(bb, [q], [""])["input_ids"][0]):] == \
        collate(bb, [q], [""])["input_ids"][0].tolist()


def test_rl_dataset_columns():
    pairs = toy_rl_pairs(0, 0.5, 1, datasets=["toy_qa", "toy_t2i"])
    ds = rl_dataset(pairs)
    assert set(ds.column_names) == {"prompt", "images", "item_id", "needs_reasoning", "dataset"}
    assert len(ds[0]["images"]) == 1 and ds[1]["images"] == []
    assert ds["item_id"] == [p.key for p in pairs]
    assert all(len(p.negatives) >= 3 for p in pairs)


@pytest.fixture
def one_thread():
    """GRPO on a 64-wide model is made of tiny ops: one thread avoids OpenMP spin-waits when the 2 cores
    are shared (7x faster here with a background job); the autouse fixture restores 2 threads."""
    torch.set_num_threads(1)
    yield


def _run(bb, tmp_path, reward_funcs=None, reward=RewardConfig(), steps=4, progress=False, **kw):
    pairs = toy_rl_pairs(0, 0.5, 1, datasets=["toy_qa", "toy_t2i", "toy_cls", "toy_doc"])
    cfg = RLConfig.textbook(steps=steps, lr=3e-2, prompts_per_step=2, num_generations=4, max_completion_length=6,
                            probe_every=2, reward=reward, **kw)
    before = probe_invocation(bb, [p.query for p in pairs])["mean_p_open"]
    res = train_rl(bb, pairs, cfg, tmp_path, reward_funcs=reward_funcs, progress=progress)
    after = probe_invocation(bb, [p.query for p in pairs])["mean_p_open"]
    return res, before, after


def test_grpo_with_the_stage2_rewards_lowers_invocation_when_reasoning_only_costs(make_backbone, tmp_path, one_thread,
                                                                                   capfd):
    """Constructed case: the tiny random model never writes a span that helps, so with a price on
    reasoning the full reward (utility + cost + format, through trl) favours direct completions. With a
    progress bar, the log dicts are not printed under it (the history holds them)."""
    bb = make_backbone(seed=11)
    res, before, after = _run(bb, tmp_path, reward=RewardConfig(cost_per_token=0.1, cost_per_invocation=1.0),
                              progress=True)
    printed = capfd.readouterr()
    assert "4/4" in printed.err and "'loss'" not in printed.out + printed.err
    assert after < before - 0.1, (before, after)
    assert res.steps_done == 4 and len(res.history) == 4
    assert {"rewards/utility_gap/mean", "rewards/reasoning_cost/mean", "rewards/format/mean",
            "sampled_invocation_rate"} <= set(res.history[0])
    assert [r["step"] for r in res.invocation] == [0, 2, 4]
    assert res.invocation[0]["mean_p_open"] > res.invocation[-1]["mean_p_open"]
    assert res.invocation[0]["invocation_rate_easy"] is not None
    history, invocation = read_rl_run(tmp_path)
    assert history == res.history and invocation == res.invocation
    assert json.loads((tmp_path / "config.json").read_text())["reward"]["cost_per_invocation"] == 1.0
    assert bb.model.generation_config.eos_token_id != [bb.token_id("<|emb|>"), bb.tokenizer.eos_token_id]


def test_grpo_raises_invocation_when_the_reward_pays_for_opening(make_backbone, tmp_path, one_thread):
    bb = make_backbone(seed=12)
    tk = SpanTokens.of(bb.tokenizer)

    def pays_for_opening(prompts, completions, completion_ids, **kw):
        return [1.0 if parse_completion(ids, tk).invoked else 0.0 for ids in completion_ids]

    res, before, after = _run(bb, tmp_path, reward_funcs=[pays_for_opening])
    assert after > before + 0.1, (before, after)
    assert np.mean([h["reward"] for h in res.history[-2:]]) >= np.mean([h["reward"] for h in res.history[:1]])


def test_decision_only_grpo_moves_the_gate_and_nothing_else(make_backbone, tmp_path, one_thread):
    """train="decision": the gate still learns what the reward favours; every other weight is bit-identical -
    the INPUT embedding of ``<think>`` included (the tiny models tie input and output embeddings, and a
    tied row moved the input every rationale is written after) - so every direct embedding is too, and
    the model's trainable flags come back."""
    from mmemb_lab.model.embed import embed

    bb = make_backbone(seed=13)
    tk = SpanTokens.of(bb.tokenizer)
    probe = [p.query for p in toy_rl_pairs(0, 0.5, 1, datasets=["toy_qa", "toy_doc"])]
    direct_before = embed(bb, probe)
    weights = {n: p.detach().clone() for n, p in bb.model.named_parameters()}

    def pays_for_opening(prompts, completions, completion_ids, **kw):
        return [1.0 if parse_completion(ids, tk).invoked else 0.0 for ids in completion_ids]

    _, before, after = _run(bb, tmp_path, reward_funcs=[pays_for_opening], train="decision",
                            decision_exploration=0.5)
    assert after > before + 0.1, (before, after)
    inp, out = bb.model.get_input_embeddings().weight, bb.model.get_output_embeddings().weight
    assert out is not inp and not bb.model.config.get_text_config().tie_word_embeddings  # untied, and saved so
    table = [n for n, p in bb.model.named_parameters() if p is inp][0]
    assert torch.equal(inp.cpu(), weights[table])  # the input row of <think> did not move
    changed = (out.detach().cpu() != weights[table]).any(dim=1).nonzero().flatten().tolist()
    assert changed == [tk.think], changed
    for n, p in bb.model.named_parameters():  # on a GPU machine trl has moved the model there
        if p is not out:
            assert torch.equal(p.cpu(), weights[n]), n
    bb.model.cpu()  # the same weights on the same device as before (CPU and GPU kernels differ in the last bits)
    assert torch.equal(embed(bb, probe), direct_before)
    assert all(p.requires_grad for p in bb.model.parameters())


def test_greedy_rationales_expand_a_decision_into_the_span_inference_writes(make_backbone):
    from mmemb_lab.method.rl import GreedyRationales
    from mmemb_lab.model.inference import generate_rationales

    bb = make_backbone(seed=14)
    tk = SpanTokens.of(bb.tokenizer)
    pairs = toy_rl_pairs(0, 0.5, 1, datasets=["toy_qa", "toy_t2i", "toy_cls"])
    g = generate_rationales(bb, [p.query for p in pairs], 6)
    writer = GreedyRationales(bb, pairs, 6)
    keys = [p.key for p in pairs]
    full = writer.expand(keys + keys[:1], [[tk.think]] * 3 + [[tk.emb]])
    for f, ids, closed in zip(full, g.ids, g.closed):
        assert f == [tk.think, *ids] + ([tk.close] if closed else [])
        assert parse_completion(f, tk).kind == ("reason" if closed and ids else "empty" if closed else "unclosed")
    assert full[3] == [tk.emb]


def test_generated_rationales_never_open_a_second_span(make_backbone):
    """A nested <think> is suppressed inside a span - even when its output row is made to win every position,
    as decision-only GRPO may move it."""
    from mmemb_lab.model.inference import generate_rationales

    bb = make_backbone(seed=15)
    tk = SpanTokens.of(bb.tokenizer)
    qs = [p.query for p in toy_rl_pairs(0, 0.5, 1, datasets=["toy_qa", "toy_t2i"])]
    hooked = bb.model.get_output_embeddings().register_forward_hook(
        lambda m, i, out: out.index_fill(-1, torch.tensor([tk.think]), 1e4))  # <think> would be argmax everywhere
    try:
        g = generate_rationales(bb, qs, 5)
    finally:
        hooked.remove()
    assert all(tk.think not in ids for ids in g.ids) and all(len(ids) > 0 for ids in g.ids)


def test_decision_only_grpo_with_greedy_rationales(make_backbone, tmp_path, one_thread):
    """rationale="greedy": trl samples one token (the decision); the rewards see the full span the model
    writes greedily, and the gate learns what they favour."""
    bb = make_backbone(seed=16)
    tk = SpanTokens.of(bb.tokenizer)
    seen = []

    def pays_for_a_written_span(prompts, completions, completion_ids, **kw):
        seen.extend(list(ids) for ids in completion_ids)
        return [1.0 if ids[0] == tk.think and len(ids) > 1 else 0.0 for ids in completion_ids]

    res, before, after = _run(bb, tmp_path, reward_funcs=[pays_for_a_written_span], train="decision",
                              rationale="greedy", decision_exploration=0.5)
    assert after > before + 0.1, (before, after)
    assert all(h["completions/mean_length"] == 1.0 for h in res.history)  # rollouts are the decision alone
    opened = [ids for ids in seen if ids[0] == tk.think]
    assert opened and all(len(ids) > 1 for ids in opened)  # ... scored with the written span
    assert all(ids == [tk.emb] for ids in seen if ids[0] != tk.think)


def test_config_validation():
    with pytest.raises(ValueError):
        RLConfig(rationale="greedy", train="all")  # the cached greedy rationale is only exact for a frozen writer
    with pytest.raises(ValueError):
        RLConfig(num_generations=1)
    with pytest.raises(ValueError):
        RLConfig(scale_rewards="global")


def test_too_few_prompts_is_an_error(backbone, tmp_path):
    pairs = toy_rl_pairs(0, 0.5, 1, datasets=["toy_qa"])
    with pytest.raises(ValueError, match="prompts per step"):
        train_rl(backbone, pairs, RLConfig(prompts_per_step=2), tmp_path,
                 reward_funcs=reward_functions(backbone, pairs))


def test_decision_exploration_mixes_only_the_first_token():
    from mmemb_lab.method.rl import DecisionExploration

    proc = DecisionExploration(think=1, emb=2, eps=0.5)
    scores = torch.tensor([[0.0, 10.0, -10.0, 3.0]])  # p(think | two) ~ 1
    first = proc(torch.zeros(1, 5, dtype=torch.long), scores.clone())
    p = first.softmax(-1)[0]
    assert torch.isclose(p[1] + p[2], torch.tensor(1.0)) and p[0] == 0 and p[3] == 0  # only the two decisions
    assert torch.isclose(p[2], torch.tensor(0.25), atol=1e-4)  # (1 - eps) * ~0 + eps / 2
    later = proc(torch.zeros(1, 6, dtype=torch.long), scores.clone())
    assert torch.equal(later, scores)  # every later position untouched
