"""The GPU code path: the same functions as on the CPU, with the model on a CUDA device.

Skipped where there is no GPU (CI, the CPU workbench). On a GPU machine, ``pytest tests/test_gpu.py``
checks that batches follow the model onto the device, that results come back on the CPU, that the
numbers agree with the CPU run of the same weights, and that a checkpoint written on the GPU resumes
on the CPU.
"""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_matmul():
    """fp32 matmuls without TF32, so GPU and CPU agree to ~1e-5."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _queries(n=24):
    from mmemb_lab.data import item_query
    from mmemb_lab.world.tasks import DATASETS, make_item

    names = sorted(DATASETS)
    return [make_item(names[i % len(names)], 0, "eval", i, 0.65) for i in range(n)], item_query


def _pair():
    """The committed foundation in fp32 on the CPU and on the GPU (the same weights)."""
    from mmemb_lab.paths import foundation_dir
    from mmemb_lab.train.foundation import load_foundation

    return tuple(load_foundation(foundation_dir(), dtype=torch.float32, device=d)[0] for d in ("cpu", "cuda"))


def test_built_tiny_lands_on_the_gpu_and_collate_follows(tokenizer):
    from mmemb_lab.model.backbone import TinySpec, build_tiny
    from mmemb_lab.model.embed import Input, collate

    bb = build_tiny(TinySpec(hidden=64, layers=2, heads=2, kv_heads=1, ffn=128, vision_dim=32, vision_depth=1,
                             vision_heads=1), tokenizer)
    assert bb.device.type == "cuda"
    batch = collate(bb, [Input("what is at top-left?")])
    assert all(v.device.type == "cuda" for v in batch.values())
    assert all(v.device.type == "cpu" for v in collate(bb, [Input("x")], device="cpu").values())


def test_embeddings_on_gpu_match_cpu():
    from mmemb_lab.model.embed import embed

    cpu, gpu = _pair()
    items, item_query = _queries()
    inputs = [item_query(it) for it in items]
    e_cpu, e_gpu = embed(cpu, inputs), embed(gpu, inputs)
    assert e_gpu.device.type == "cpu"  # results come back to the CPU
    assert torch.allclose(e_cpu, e_gpu, atol=2e-4), float((e_cpu - e_gpu).abs().max())


def _padded_batch():
    """The demo's first length-sorted batch of toy_video_ret eval queries: 32 text queries, 65 tokens, all but
    one left-padded (11-19 positions)."""
    from mmemb_lab.data import item_query
    from mmemb_lab.model.embed import length_key
    from mmemb_lab.world.tasks import make_item

    qs = [item_query(make_item("toy_video_ret", 0, "eval", i, 0.65)) for i in range(100)]
    return sorted(qs, key=length_key)[:32]


def test_a_left_padded_batch_embeds_on_gpu_as_on_cpu():
    """Found running ``mmemb_lab demo`` on an H200 (torch 2.11+cu130, fp32): toy_video_ret's easy queries
    scored Hit@1 0 on the GPU against 90 on the CPU, everything else equal. Their length-sorted batch (this
    one) embeds up to 0.44 away from the CPU under transformers' SDPA; the same batch one input at a time, or
    in the gate's input-order batches, agrees to 1e-7. Forcing SDPBackend.MATH agreed to 1e-7; forcing
    EFFICIENT_ATTENTION reproduced the 0.44; letting fully masked (padding) rows attend to every key did not
    fix it (0.31). It no longer reproduced on 2026-12-04 (README, GPU section): kept as a regression test."""
    from mmemb_lab.model.embed import embed

    cpu, gpu = _pair()
    q = _padded_batch()
    e_cpu, e_gpu = embed(cpu, q, batch_size=32), embed(gpu, q, batch_size=32)
    assert torch.allclose(e_cpu, e_gpu, atol=2e-4), float((e_cpu - e_gpu).abs().max())


def _embed_padded(bb, inputs, extra: int = 0) -> torch.Tensor:
    """``inputs`` as one batch, with ``extra`` more padding positions on the left of every row."""
    from mmemb_lab.model.embed import collate, hidden_states, pool

    b = collate(bb, inputs)
    if extra:
        fill = {"input_ids": bb.tokenizer.pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0}
        b = {k: torch.cat([torch.full((v.shape[0], extra), fill[k], dtype=v.dtype, device=v.device), v], 1)
             for k, v in b.items()}
    with torch.no_grad():
        return pool(hidden_states(bb, b)).cpu()


@pytest.mark.parametrize("extra", [1, 15])
def test_the_padded_batch_made_longer_embeds_on_gpu_as_on_cpu(extra):
    """Written without a GPU (2026-11-27), to test one hypothesis on the next GPU run. The failing batch is
    65 tokens long, and 65 = 1 mod 32: pytorch/pytorch#191937 reports EFFICIENT_ATTENTION returning wrong
    rows for a masked kv length = 1 mod 32 (MATH right on the same tensors; one more kv position clean).
    Here the same batch with 1 / 15 more left pads (66 / 80 tokens). If both pass while the 65-token test
    above still xfails, pad batches to a multiple of 16 on CUDA (``collate``) and drop the xfail; if they
    fail, the length is not the cause."""
    cpu, gpu = _pair()
    q = _padded_batch()
    assert torch.allclose(_embed_padded(cpu, q), _embed_padded(cpu, q, extra), atol=2e-5)  # padding is inert
    e_cpu, e_gpu = _embed_padded(cpu, q, extra), _embed_padded(gpu, q, extra)
    assert torch.allclose(e_cpu, e_gpu, atol=2e-4), float((e_cpu - e_gpu).abs().max())


def test_the_padded_batch_in_bf16_agrees_with_the_math_kernel():
    """Written without a GPU (2026-11-27): does the open bug reach bf16, the dtype real Qwen3-VL runs in?
    The 65-token batch in bf16 under the default SDPA kernels against the same under SDPBackend.MATH (which
    agreed with the CPU in fp32)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mmemb_lab.paths import foundation_dir
    from mmemb_lab.train.foundation import load_foundation

    bf = load_foundation(foundation_dir(), dtype=torch.bfloat16, device="cuda")[0]
    q = _padded_batch()
    e = _embed_padded(bf, q)
    with sdpa_kernel(SDPBackend.MATH):
        ref = _embed_padded(bf, q)
    cos = (e * ref).sum(-1)
    assert float(cos.min()) > 0.995, cos


def test_generation_and_gate_on_gpu_match_cpu():
    from mmemb_lab.model.gating import gate_and_spans, gate_forward
    from mmemb_lab.model.inference import generate_rationales

    cpu, gpu = _pair()
    items, item_query = _queries(16)
    inputs = [item_query(it) for it in items]
    g_cpu, g_gpu = generate_rationales(cpu, inputs, 24), generate_rationales(gpu, inputs, 24)
    same = np.mean([a == b for a, b in zip(g_cpu.texts, g_gpu.texts)])
    assert same >= 0.9, (g_cpu.texts, g_gpu.texts)  # greedy ties may break differently, rarely
    o_cpu, o_gpu = gate_forward(cpu, inputs), gate_forward(gpu, inputs)
    assert o_gpu.p_open.device.type == "cpu"
    assert torch.allclose(o_cpu.p_open, o_gpu.p_open, atol=1e-4)
    run = gate_and_spans(gpu, inputs, -1.0, 24)  # spans continued from the gate's prefill, on the GPU
    assert run.gate.direct.device.type == "cpu"
    assert np.mean([a == b for a, b in zip(run.spans.texts, g_gpu.texts)]) >= 0.9, (run.spans.texts, g_gpu.texts)


def test_load_backbone_on_gpu_keeps_the_checkpoint_dtype_and_bf16_is_close_to_fp32():
    from mmemb_lab.model.backbone import load_backbone
    from mmemb_lab.model.embed import embed
    from mmemb_lab.paths import foundation_dir

    own = load_backbone(foundation_dir())  # the tiny checkpoint is fp32 (a Qwen-VL release: bf16)
    assert own.device.type == "cuda" and next(own.model.parameters()).dtype == torch.float32
    bf = load_backbone(foundation_dir(), dtype=torch.bfloat16)
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    fp = load_backbone(foundation_dir(), dtype=torch.float32, device="cpu")
    items, item_query = _queries()
    inputs = [item_query(it) for it in items]
    cos = (embed(bf, inputs) * embed(fp, inputs)).sum(-1)
    assert float(cos.min()) > 0.97, cos


def test_foundation_trains_on_gpu_with_the_search_term_and_resumes_on_cpu(tmp_path, monkeypatch):
    from mmemb_lab.model.backbone import TinySpec
    from mmemb_lab.train.foundation import FoundationConfig, train_foundation
    from mmemb_lab.train.loop import LoopConfig, read_metrics

    cfg = FoundationConfig(spec=TinySpec(hidden=64, layers=2, heads=2, kv_heads=1, ffn=128, vision_dim=32,
                                         vision_depth=1, vision_heads=1, vocab_size=400),
                           loop=LoopConfig(steps=6, warmup=1, ckpt_every=3), gen_batch=8, nce_batch=8,
                           gen_batch_nce=8, see_steps=1, frame_phase=2, read_phase=2, skill_phase=3,
                           search_phase=3, tokenizer_corpus=300)
    train_foundation(tmp_path / "f", cfg, stop_after=4)
    rows = read_metrics(tmp_path / "f.work")
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    assert any("search" in r for r in rows)
    ckpt = torch.load(tmp_path / "f.work" / "checkpoint.pt", weights_only=False, map_location="cpu")
    assert ckpt["step"] == 3
    import mmemb_lab.distributed as distributed

    monkeypatch.setattr(distributed, "default_device", lambda: torch.device("cpu"))
    bb = train_foundation(tmp_path / "f", cfg)  # the GPU checkpoint resumes on the CPU and finishes
    assert bb.device.type == "cpu" and read_metrics(tmp_path / "f.work")[-1]["step"] == 6


def test_stage1_chunked_and_unchunked_gradients_agree_on_gpu():
    from mmemb_lab.method.stage1 import Stage1Config, Stage1Model, make_step_fn
    from mmemb_lab.paths import foundation_dir
    from mmemb_lab.train.foundation import load_foundation
    from mmemb_lab.world.tasks import DATASETS, make_item

    bb, _ = load_foundation(foundation_dir(), dtype=torch.float32)
    names = sorted(DATASETS)
    data = [(make_item(names[i % 8], 0, "train", i, 0.65), None) for i in range(16)]
    data = [(it, " ".join(it.gold_steps) if it.needs_reasoning else None) for it, _ in data]
    grads = []
    for chunk in (0, 4):
        bb.model.zero_grad(set_to_none=True)
        out = make_step_fn(bb, data, Stage1Config(batch_size=8, chunk_size=chunk), seed=0)(0, Stage1Model(bb.model))
        if not out.get("backward_done"):
            out["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in bb.model.parameters() if p.grad is not None]))
    assert grads[0].is_cuda
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-3), float((grads[0] - grads[1]).abs().max())


def test_stage2_decision_grpo_with_greedy_rationales_on_gpu(tmp_path, tokenizer):
    """The demo's stage-2 setting (``Stage2Config().rl``: decision-only, greedy rationales, cached scores) on a
    CUDA model: the rationales are written on the GPU before trl wraps ``generate``, every reward sees the
    written span, the gate moves the way the reward favours, and only the ``<think>`` output row changes."""
    from dataclasses import replace

    from mmemb_lab.method.rewards import SpanTokens
    from mmemb_lab.method.rl import probe_invocation, toy_rl_pairs, train_rl
    from mmemb_lab.method.stage2 import Stage2Config
    from mmemb_lab.model.backbone import TinySpec, build_tiny

    bb = build_tiny(TinySpec(hidden=64, layers=2, heads=2, kv_heads=1, ffn=128, vision_dim=32, vision_depth=1,
                             vision_heads=1), tokenizer, seed=16)
    tk = SpanTokens.of(bb.tokenizer)
    pairs = toy_rl_pairs(0, 0.5, 1, datasets=["toy_qa", "toy_t2i", "toy_cls", "toy_doc"])
    weights = {n: p.detach().cpu().clone() for n, p in bb.model.named_parameters()}
    table = [n for n, p in bb.model.named_parameters() if p is bb.model.get_input_embeddings().weight][0]
    seen = []

    def pays_for_a_written_span(prompts, completions, completion_ids, **kw):
        seen.extend(list(ids) for ids in completion_ids)
        return [1.0 if ids[0] == tk.think and len(ids) > 1 else 0.0 for ids in completion_ids]

    cfg = replace(Stage2Config().rl, steps=6, lr=3e-2, prompts_per_step=2, num_generations=4, max_completion_length=8,
                  probe_every=3)
    before = probe_invocation(bb, [p.query for p in pairs])["mean_p_open"]
    res = train_rl(bb, pairs, cfg, tmp_path, reward_funcs=[pays_for_a_written_span])
    after = probe_invocation(bb, [p.query for p in pairs])["mean_p_open"]
    assert after > before + 0.1, (before, after)
    assert all(h["completions/mean_length"] == 1.0 for h in res.history)
    assert all(len(ids) > 1 for ids in seen if ids[0] == tk.think)
    out = bb.model.get_output_embeddings().weight
    for n, p in bb.model.named_parameters():
        if p is out:  # untied from the input table for training: compare with the table it was
            changed = (p.detach().cpu() != weights[table]).any(dim=1).nonzero().flatten().tolist()
            assert changed == [tk.think], changed
        else:
            assert torch.equal(p.detach().cpu(), weights[n]), n
