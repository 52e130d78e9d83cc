"""Stage 1: the generation term's labels, the joint step, and chunked (GradCache) == unchunked gradients."""

import torch

from mmemb_lab.data import item_query
from mmemb_lab.method.stage1 import Stage1Config, Stage1Model, assistant_target, generation_labels, make_step_fn
from mmemb_lab.model.backbone import EMB_TOKEN, THINK_CLOSE, THINK_OPEN
from mmemb_lab.model.embed import Input, collate, encode
from mmemb_lab.world.tasks import make_item


def test_generation_labels_cover_only_the_reasoning_span(backbone):
    items = [make_item("toy_qa", 0, "train", i, h) for i, h in ((0, 1.0), (1, 0.0))]
    rats = [" ".join(items[0].gold_steps), None]
    targets = [assistant_target(r) for r in rats]
    batch = collate(backbone, [item_query(it) for it in items], targets)
    labels = generation_labels(backbone, batch, targets)
    tok = backbone.tokenizer
    span = tok.decode(labels[0][labels[0] != -100])
    assert span == f"{THINK_OPEN}{rats[0]}{THINK_CLOSE}"  # the span, not the prompt, image or <|emb|>
    assert tok.decode(labels[1][labels[1] != -100]) == EMB_TOKEN  # no reasoning: only the decision token
    image_pad = backbone.token_id("<|image_pad|>")
    assert not ((labels != -100) & (batch["input_ids"] == image_pad)).any()
    assert not ((labels != -100) & (batch["attention_mask"] == 0)).any()


def test_stage1_step_runs_and_all_terms_have_gradients(backbone):
    data = [(make_item(n, 0, "train", i, 0.5), None) for n in ("toy_qa", "toy_doc", "toy_gd") for i in range(3)]
    data[0] = (data[0][0], " ".join(data[0][0].gold_steps) or "so it is.")
    fn = make_step_fn(backbone, data, Stage1Config(batch_size=4), seed=0)
    module = Stage1Model(backbone.model)
    out = fn(0, module)
    out["loss"].backward()
    assert {"nce_reasoned", "gen", "nce_direct"} <= set(out)
    emb = backbone.model.get_input_embeddings().weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    backbone.model.zero_grad()


def test_chunked_contrastive_backward_matches_unchunked(make_backbone):
    """GradCache on the real tiny Qwen3-VL: same parameter gradients within 1e-5 (fp32)."""
    from mmemb_lab.train.contrastive import grad_cache_step, info_nce

    bb = make_backbone(seed=4)
    bb.model.train()
    items = [make_item(n, 0, "train", i, 0.5) for n in ("toy_qa", "toy_cls", "toy_doc") for i in range(2)]
    qs = [item_query(it) for it in items]
    ts = [Input(it.answer) for it in items]
    loss_fn = lambda e: info_nce(e["q"], e["t"], 0.05).loss  # noqa: E731
    full = loss_fn({"q": encode(bb, qs), "t": encode(bb, ts)})
    full.backward()
    ref = {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.grad is not None}
    bb.model.zero_grad()
    chunks = [("q", qs[:2]), ("q", qs[2:4]), ("q", qs[4:]), ("t", ts[:3]), ("t", ts[3:])]
    loss, _ = grad_cache_step(chunks, lambda c: ({c[0]: encode(bb, c[1])}, None), loss_fn)
    assert abs(float(loss) - float(full.detach())) < 1e-5
    got = {n: p.grad for n, p in bb.model.named_parameters() if p.grad is not None}
    assert ref.keys() == got.keys()
    worst = max((ref[n] - got[n]).abs().max().item() for n in ref)
    assert worst < 1e-5, worst
    bb.model.zero_grad()
    bb.model.eval()


def test_chunked_stage1_step_matches_unchunked(make_backbone):
    """The joint stage-1 loss (two InfoNCE terms + generation) under GradCache chunks of 2: same gradients."""
    bb = make_backbone(seed=9)
    data = [(make_item(n, 0, "train", i, 0.6), None) for n in ("toy_qa", "toy_doc", "toy_cls") for i in range(2)]
    data[0] = (data[0][0], " ".join(data[0][0].gold_steps) or "so it is.")
    data[3] = (data[3][0], "after A is B.")
    module = Stage1Model(bb.model)
    full = make_step_fn(bb, data, Stage1Config(batch_size=6), seed=2)(0, module)
    bb.model.zero_grad()
    full["loss"].backward()
    ref = {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.grad is not None}
    bb.model.zero_grad()
    out = make_step_fn(bb, data, Stage1Config(batch_size=6, chunk_size=2), seed=2)(0, module)
    assert out["backward_done"] and abs(float(out["loss"]) - float(full["loss"])) < 1e-5
    got = {n: p.grad for n, p in bb.model.named_parameters() if p.grad is not None}
    assert ref.keys() == got.keys()
    worst = max((ref[n] - got[n]).abs().max().item() for n in ref)
    assert worst < 1e-5, worst
    bb.model.zero_grad()


def test_length_buckets_give_the_one_batch_step(make_backbone):
    """Forwards split into length buckets (rows re-ordered inside, put back after) give the loss and
    gradients of one padded batch; the buckets hold every row once."""
    from mmemb_lab.method.stage1 import length_buckets

    bb = make_backbone(seed=9)
    data = [(make_item(n, 0, "train", i, 0.6), None) for n in ("toy_qa", "toy_doc", "toy_video_qa") for i in range(2)]
    data[0] = (data[0][0], " ".join(data[0][0].gold_steps) or "so it is.")
    data[4] = (data[4][0], "after A is B. after B is C. after C is D. after D is E.")
    queries = [item_query(it) for it, _ in data]
    buckets = length_buckets(bb, queries, None, 3)
    assert sorted(i for b in buckets for i in b) == list(range(6)) and len(buckets) == 3
    module = Stage1Model(bb.model)
    grads, losses = [], []
    for n in (1, 3):
        bb.model.zero_grad()
        out = make_step_fn(bb, data, Stage1Config(batch_size=6, length_buckets=n), seed=2)(0, module)
        out["loss"].backward()
        losses.append(float(out["loss"]))
        grads.append({k: p.grad.clone() for k, p in bb.model.named_parameters() if p.grad is not None})
    assert abs(losses[0] - losses[1]) < 1e-5
    assert grads[0].keys() == grads[1].keys()
    worst = max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0])
    assert worst < 1e-5, worst
    bb.model.zero_grad()


def test_bucketed_batches_equal_collating_each_bucket_alone(make_backbone):
    """One collate for all rows, then per-bucket views: the same tensors as collating each bucket's rows
    on their own (images, frame sequences and text-only rows mixed; with and without assistant turns)."""

    from mmemb_lab.method.stage1 import assistant_target, bucketed_batches
    from mmemb_lab.model.embed import collate

    bb = make_backbone(seed=9)
    items = [make_item(n, 0, "train", i, 0.6) for n in ("toy_qa", "toy_doc", "toy_video_qa", "toy_t2i") for i in range(2)]
    queries = [item_query(it) for it in items]
    assistants = [assistant_target(" ".join(it.gold_steps) or None) for it in items]
    for a in (None, assistants):
        buckets, batches = bucketed_batches(bb, queries, a, 3)
        assert sorted(i for b in buckets for i in b) == list(range(len(items))) and len(buckets) == 3
        for b, got in zip(buckets, batches):
            want = collate(bb, [queries[i] for i in b], None if a is None else [a[i] for i in b])
            assert got.keys() == want.keys()
            for k in want:
                assert torch.equal(got[k], want[k]), k


def test_a_stage1_checkpoint_is_resumed_only_by_the_run_that_wrote_it(make_backbone, tmp_path):
    import pytest

    from mmemb_lab.method.stage1 import train_stage1
    from mmemb_lab.runs import RunMismatch
    from mmemb_lab.train.loop import LoopConfig

    data = [(make_item(n, 0, "train", i, 0.5), None) for n in ("toy_qa", "toy_cls") for i in range(2)]
    cfg = Stage1Config(loop=LoopConfig(steps=2, lr=1e-4, warmup=1, ckpt_every=1), batch_size=2)
    # each call starts from the same weights, as a resumed demo reloads its foundation
    train_stage1(make_backbone(seed=5), data, tmp_path, cfg, stop_after=1)
    assert train_stage1(make_backbone(seed=5), data, tmp_path, cfg).resumed_from == 1  # the same run resumes
    other = [(data[0][0], "so it is."), *data[1:]]  # a different rationale: another run
    with pytest.raises(RunMismatch, match="inputs.pairs"):
        train_stage1(make_backbone(seed=5), other, tmp_path, cfg)
    with pytest.raises(RunMismatch, match="inputs.weights"):  # other starting weights: another run too
        train_stage1(make_backbone(seed=6), data, tmp_path, cfg)
    # the demo's choice: the old run is moved aside whole, and the new one starts at step 0
    old_files = sorted(p.name for p in tmp_path.iterdir())
    assert train_stage1(make_backbone(seed=5), other, tmp_path, cfg, stale="archive").resumed_from == 0
    (moved,) = tmp_path.parent.glob(f"{tmp_path.name}.stale-*")
    assert sorted(p.name for p in moved.iterdir()) == old_files
