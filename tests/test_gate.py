"""The adaptive gate: one prefill gives the direct embedding and the decision; only opened inputs generate."""

import numpy as np
import pytest
import torch

from mmemb_lab.data import item_query
from mmemb_lab.method import gate
from mmemb_lab.method.gate import gate_precision_recall, sweep
from mmemb_lab.model import gating
from mmemb_lab.model.embed import collate, embed
from mmemb_lab.model.gating import AdaptiveEncoder, gate_forward
from mmemb_lab.model.inference import ReasoningEncoder
from mmemb_lab.world.tasks import make_item


@pytest.fixture(scope="module")
def inputs():
    """An image query, a text-only query, a frame sequence, a page query: different lengths, left padding."""
    return [item_query(make_item(d, 0, "eval", i, 0.5)) for i, d in
            enumerate(["toy_qa", "toy_t2i", "toy_video_qa", "toy_doc", "toy_cls"])]


def test_direct_embedding_from_the_gate_prefill_equals_embed(backbone, inputs):
    g = gate_forward(backbone, inputs, batch_size=3)
    ref = embed(backbone, inputs, batch_size=5)
    assert g.direct.shape == ref.shape
    assert torch.allclose(g.direct, ref, atol=1e-5)


def test_decision_is_the_next_token_distribution_after_the_prompt(backbone, inputs):
    """p(<think>) at the assistant start equals the LM's softmax on the prompt alone (no <|emb|> seen)."""
    g = gate_forward(backbone, inputs)
    with torch.no_grad():
        logits = backbone.model(**collate(backbone, inputs, [""] * len(inputs))).logits[:, -1]
    p = torch.softmax(logits.float(), dim=-1)
    assert torch.allclose(g.p_think, p[:, backbone.token_id("<think>")], atol=1e-6)
    assert torch.allclose(g.p_emb, p[:, backbone.token_id("<|emb|>")], atol=1e-6)
    assert ((g.p_open > 0) & (g.p_open < 1)).all()
    assert torch.allclose(g.p_open, g.p_think / (g.p_think + g.p_emb))


def _hf_greedy(bb, inputs, n):
    """Reference spans from transformers' own ``generate``: greedy after a forced ``<think>``, ``<think>``
    suppressed, stopping at ``</think>``."""
    close = bb.token_id("</think>")
    batch = collate(bb, inputs, ["<think>"] * len(inputs))
    with torch.no_grad():
        gen = bb.model.generate(**batch, max_new_tokens=n, do_sample=False, eos_token_id=close,
                                pad_token_id=bb.tokenizer.pad_token_id, suppress_tokens=[bb.token_id("<think>")])
    rows = gen[:, batch["input_ids"].shape[1]:].tolist()
    return [r[:r.index(close)] if close in r else r for r in rows], [close in r for r in rows]


def test_spans_from_the_gate_prefill_equal_generate(make_backbone, inputs):
    """Both span writers - ``generate_rationales`` (its own prefill) and the adaptive path (the gate's
    prefill, KV cache cropped to the prompt) - draw exactly the tokens of transformers' ``generate``, in a
    left-padded batch and one at a time, for both architectures (multimodal and text-only rope positions)."""
    from mmemb_lab.model.inference import generate_rationales

    for arch in ("qwen3_vl", "qwen2_5_vl"):
        bb = make_backbone(arch)
        ids, closed = _hf_greedy(bb, inputs, 6)
        ref = generate_rationales(bb, inputs, 6, batch_size=3)
        run = gating.gate_and_spans(bb, inputs, -1.0, 6, batch_size=3)
        assert run.opened == list(range(len(inputs)))
        assert ref.ids == ids and ref.closed == closed
        assert run.spans.ids == ids and run.spans.closed == closed and run.spans.texts == ref.texts
        assert torch.allclose(run.gate.direct, embed(bb, inputs), atol=1e-5)
        for x in inputs[:3]:
            assert gating.gate_and_spans(bb, [x], -1.0, 6).spans.ids == _hf_greedy(bb, [x], 6)[0]
    # a span that closes early stops there; one that does not is cut at the budget
    bb = make_backbone()
    close = bb.token_id("</think>")
    head = bb.model.get_output_embeddings()
    with torch.no_grad():
        bias = torch.zeros(head.weight.shape[0])
        bias[close] = 1e4
        head.bias = torch.nn.Parameter(bias)
        try:
            run = gating.gate_and_spans(bb, inputs, -1.0, 6)
        finally:
            head.bias = None
    assert run.spans.ids == [[]] * len(inputs) and all(run.spans.closed)
    assert run.spans.n_tokens == [1] * len(inputs)


def test_bench_of_the_span_continuation_runs_and_writes_the_same_spans(backbone):
    from mmemb_lab.bench import gate_span_reuse

    res = gate_span_reuse(backbone, n=2, max_new_tokens=3)
    assert res["same_spans"] is True and res["gate_continued_ms"] > 0 and res["fresh_over_continued"] > 0


def _spy(monkeypatch):
    """Rows handed to span generation, per call that generates anything."""
    calls = []
    real = gating.continue_spans

    def spy(bb, pre, rows, *a, **k):
        if rows:
            calls.append(list(rows))
        return real(bb, pre, rows, *a, **k)
    monkeypatch.setattr(gating, "continue_spans", spy)
    return calls


def test_a_closed_gate_generates_nothing(backbone, inputs, monkeypatch):
    calls = _spy(monkeypatch)
    enc = AdaptiveEncoder(backbone, threshold=1.0, max_new_tokens=4)
    out = enc(inputs)
    assert calls == []
    assert torch.allclose(out, embed(backbone, inputs), atol=1e-5)
    assert enc.generated_tokens == [0] * len(inputs) and enc.invoked == [False] * len(inputs)
    assert len(enc.latency_ms) == len(inputs) and all(t > 0 for t in enc.latency_ms)


def test_an_open_gate_matches_the_always_mode(backbone, inputs, monkeypatch):
    calls = _spy(monkeypatch)
    enc = AdaptiveEncoder(backbone, threshold=0.0, max_new_tokens=4)
    out = enc(inputs)
    always = ReasoningEncoder(backbone, max_new_tokens=4)
    assert calls == [list(range(len(inputs)))]
    assert torch.allclose(out, always(inputs), atol=1e-5)
    assert enc.generated_tokens == always.generated_tokens and all(enc.invoked)


def test_only_inputs_above_the_threshold_generate(backbone, inputs, monkeypatch):
    p = gate_forward(backbone, inputs).p_open
    t = float(p.median())
    above = [i for i in range(len(inputs)) if p[i] > t]
    calls = _spy(monkeypatch)
    enc = AdaptiveEncoder(backbone, threshold=t, max_new_tokens=4)
    out = enc(inputs)
    assert calls == [above]
    assert enc.invoked == [i in above for i in range(len(inputs))]
    direct = embed(backbone, inputs)
    for i in range(len(inputs)):
        if i not in above:
            assert torch.allclose(out[i], direct[i], atol=1e-5)
    assert all((enc.generated_tokens[i] > 0) == (i in above) for i in range(len(inputs)))


def test_precision_recall_by_hand():
    assert gate_precision_recall([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == (2 / 3, 2 / 3)
    assert gate_precision_recall([0, 0], [1, 0]) == (None, 0.0)
    assert gate_precision_recall([1, 0], [0, 0]) == (0.0, None)


def test_sweep_is_monotone_and_its_ends_are_direct_and_always(backbone, small_world):
    from mmemb_lab.eval.harness import evaluate
    from mmemb_lab.world.build import toy_registry

    root, info = small_world
    reg = {k: v for k, v in toy_registry(info).items() if k in ("toy_qa", "toy_t2i", "toy_doc")}
    points = sweep(backbone, root, reg, [0.5, 0.0, 1.0, 0.45, 0.55], max_new_tokens=4, latency_sample=1)
    assert [pt.threshold for pt in points] == [1.0, 0.55, 0.5, 0.45, 0.0]
    rates = [pt.invocation_rate for pt in points]
    assert rates == sorted(rates) and rates[0] == 0.0 and rates[-1] == 1.0
    lat = [pt.latency_ms_per_query for pt in points]
    assert lat == sorted(lat) and lat[0] > 0
    assert points[0].generated_tokens_per_query == 0 and points[-1].generated_tokens_per_query > 0
    direct = evaluate(backbone, root, reg, latency_sample=1, progress=False)
    assert np.isclose(points[0].overall, direct.overall)
    always = evaluate(backbone, root, reg, "always", encoder=ReasoningEncoder(backbone, 4), latency_sample=1,
                      progress=False)
    assert np.isclose(points[-1].overall, always.overall)
    assert set(points[2].summary()) >= {"threshold", "invocation_rate", "overall", "latency_ms_per_query"}


def test_stage2_modes_from_one_pass_equal_the_encoders(backbone, small_world, monkeypatch):
    """direct / always / adaptive scored from one gate pass equal evaluate() with the real encoders, and the
    gate block's precision / recall follow from the per-query openings."""
    from mmemb_lab.eval.harness import evaluate
    from mmemb_lab.method.stage2 import gate_block, mode_results
    from mmemb_lab.world.build import toy_registry

    root, info = small_world
    reg = {k: v for k, v in toy_registry(info).items() if k in ("toy_qa", "toy_doc")}
    gp = gate.gate_pass(backbone, root, reg, -1.0, max_new_tokens=4, latency_sample=1)
    th = float(np.median(np.concatenate([dg.p for dg in gp.per.values()])))  # opens about half of the queries
    lat = {"direct_ms": 1.0, "always_ms": 2.0, "adaptive_ms": 1.5}
    modes = mode_results(gp, reg, th, lat)
    enc = {"direct": None, "always": ReasoningEncoder(backbone, 4), "adaptive": AdaptiveEncoder(backbone, th, 4)}
    for mode, e in enc.items():
        ref = evaluate(backbone, root, reg, mode, encoder=e, latency_sample=1, progress=False)
        for name in reg:
            assert np.allclose(modes[mode].per_dataset[name].per_query, ref.per_dataset[name].per_query), (mode, name)
    rates, g = gate_block(gp, reg, th)
    inv = np.concatenate([dg.p > th for dg in gp.per.values()])
    need = np.concatenate([dg.hard for dg in gp.per.values()])
    assert 0 < rates["invocation_rate"] < 1 and rates["invocation_rate"] == inv.mean()
    assert g["precision_vs_needs_reasoning"] == (inv & need).sum() / inv.sum()
    assert g["recall_vs_needs_reasoning"] == (inv & need).sum() / need.sum()


def test_reference_latency_times_the_stage1_model_in_the_same_loop(make_backbone, inputs, monkeypatch):
    """With a stage-1 model, its direct and always modes are timed per input between the others: each input
    is timed once per mode, in one loop."""
    from mmemb_lab.method import stage2

    rl, s1 = make_backbone(seed=0), make_backbone(seed=1)
    seen = []
    real = stage2.embed
    monkeypatch.setattr(stage2, "embed", lambda bb, xs: seen.append("rl" if bb is rl else "s1") or real(bb, xs))
    lat = stage2.reference_latency(rl, inputs[:2], AdaptiveEncoder(rl, 2.0, 4), 4, stage1=s1)  # gate never opens
    assert seen == ["rl", "s1"] * 3                                 # warm-up, then input 1, input 2
    assert {"stage1_direct_ms", "stage1_always_ms"} <= set(lat) and lat["n"] == 2
    assert "stage1_direct_ms" not in stage2.reference_latency(rl, inputs[:1], AdaptiveEncoder(rl, 2.0, 4), 4)


def test_retime_fixed_modes_takes_the_interleaved_stage1_timings():
    from mmemb_lab.method.stage2 import retime_fixed_modes

    evals = {"direct": {"overall": 50.0, "latency_ms_per_query": 15.0},
             "always": {"overall": 55.0, "latency_ms_per_query": 140.0},
             "oracle": {"overall": 80.0, "latency_ms_per_query": 50.0, "reasoned_share": 0.25},
             "adaptive": {"overall": 75.0, "latency_ms_per_query": 45.0}}
    lat = {"stage1_direct_ms": 10.0, "stage1_always_ms": 110.0}
    out = retime_fixed_modes(evals, lat)
    assert out["direct"]["latency_ms_per_query"] == 10.0 and out["always"]["latency_ms_per_query"] == 110.0
    assert out["always"]["latency_ms_per_query_stage1_pass"] == 140.0 and out["always"]["overall"] == 55.0
    assert out["oracle"]["latency_ms_per_query"] == pytest.approx(10.0 + 0.25 * 100.0)
    assert out["adaptive"] == evals["adaptive"] and evals["always"]["latency_ms_per_query"] == 140.0  # no mutation
    assert retime_fixed_modes(evals, {"direct_ms": 1.0}) is evals                # no stage-1 timings: unchanged


def test_the_threshold_chosen_on_validation_is_the_best_and_ties_go_to_the_highest():
    from mmemb_lab.method.gate import SweepPoint, choose_threshold

    def pt(t, overall):
        return SweepPoint(t, 1 - t, None, None, overall, None, None, {}, 0.0, 0.0)

    assert choose_threshold([pt(0.9, 60.0), pt(0.5, 64.0), pt(0.1, 62.0)]).threshold == 0.5
    assert choose_threshold([pt(0.98, 64.0), pt(0.5, 64.0), pt(0.1, 63.0)]).threshold == 0.98


def test_committed_gate_is_the_demo_model_it_says_it_is():
    """``data/gate`` (notebook 05's gate without a demo run) is a stage-2 model of the foundation's architecture
    and tokenizer; its weights are the ones ``gate.json`` records (a changed file is caught), and its threshold
    is the one the demo chose on validation."""
    import json

    from mmemb_lab.model.backbone import load_backbone
    from mmemb_lab.paths import data_dir, foundation_dir
    from mmemb_lab.runs import weights_digest

    folder = data_dir() / "gate"
    if not (folder / "gate.json").exists():
        pytest.skip("no committed gate in this checkout")
    record = json.loads((folder / "gate.json").read_text())
    gate_model = load_backbone(folder)
    assert weights_digest(gate_model.model) == record["weights"]
    assert gate_model.arch == load_backbone(foundation_dir()).arch
    assert gate_model.tokenizer.get_vocab() == load_backbone(foundation_dir()).tokenizer.get_vocab()
    assert record["threshold_rule"].startswith("best overall on val") and 0 < record["threshold"] < 1


def test_p_open_for_a_kept_row_equals_a_forward_with_that_row(make_backbone, inputs):
    """A stage-2 snapshot's gate is scored from the states of one prefill: p_open recomputed for another
    ``<think>`` row equals a forward of the model holding that row, and the spans and embeddings do not move."""
    from mmemb_lab.method.rl_decision import untie_output_embedding

    bb = make_backbone(seed=5)
    untie_output_embedding(bb.model)
    g = gate_forward(bb, inputs)
    head, think = bb.model.get_output_embeddings(), bb.token_id("<think>")
    assert torch.allclose(gating.p_open_for_row(bb, g.state, head.weight[think]), g.p_open, atol=1e-5)
    row = head.weight[think].detach() + 0.5 * torch.randn(head.weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head.weight[think] = row
    moved = gate_forward(bb, inputs)
    assert not torch.allclose(moved.p_open, g.p_open, atol=1e-3)
    assert torch.allclose(gating.p_open_for_row(bb, g.state, row), moved.p_open, atol=1e-5)
    assert torch.equal(moved.direct, g.direct) and torch.equal(moved.state, g.state)


def test_the_step_chosen_on_validation_is_the_best_and_ties_go_to_fewer_openings_then_later(backbone, small_world):
    from mmemb_lab.method.gate import choose_step_and_threshold, choose_threshold, sweep_points, with_think_row
    from mmemb_lab.world.build import toy_registry

    root, info = small_world
    reg = {k: v for k, v in toy_registry(info).items() if k in ("toy_qa", "toy_doc")}
    gp = gate.gate_pass(backbone, root, reg, -1.0, max_new_tokens=4, latency_sample=0)
    w = backbone.model.get_output_embeddings().weight
    row, emb = w[backbone.token_id("<think>")].detach(), w[backbone.token_id("<|emb|>")].detach()
    ths = [0.2, 0.5, 0.8]
    # the same row at steps 0 and 5 ties; a row pointing away from the states shuts the gate everywhere
    mean_state = torch.cat([dg.state for dg in gp.per.values()]).mean(0)
    rows = {0: row, 5: row.clone(), 10: emb - 100 * mean_state / mean_state.norm()}
    shut = with_think_row(gp, backbone, rows[10])
    assert max(dg.p.max() for dg in shut.per.values()) < min(ths)
    c = choose_step_and_threshold(gp, backbone, rows, reg, ths)
    scores = {s: choose_threshold(sweep_points(with_think_row(gp, backbone, r), reg, ths)) for s, r in rows.items()}
    assert [r["overall"] for r in c["per_step"]] == [scores[s].overall for s in sorted(rows)]
    best = max(p.overall for p in scores.values())
    tied = [s for s, p in scores.items() if p.overall >= best - 1e-9]
    want = min(tied, key=lambda s: (scores[s].invocation_rate, -s))
    assert c["step"] == want and c["threshold"] == scores[want].threshold
    assert (c["step"] == 5) if set(tied) == {0, 5} else c["step"] in tied
    assert scores[10].invocation_rate == 0 and scores[10].generated_tokens_per_query == 0  # the direct mode
