"""The shared training loop: a killed-and-resumed run ends exactly where an uninterrupted one does."""

import json

import torch

from mmemb_lab.train.finetune import FinetuneConfig, finetune
from mmemb_lab.train.loop import LoopConfig, read_metrics


def _cfg():
    return FinetuneConfig(loop=LoopConfig(steps=5, lr=1e-3, warmup=1, ckpt_every=2, log_every=1), batch_size=8)


def test_killed_and_resumed_run_matches_uninterrupted(make_backbone, small_world, tmp_path):
    root, info = small_world
    names = sorted(info["datasets"])
    a = make_backbone(seed=7)
    res_a = finetune(a, root, names, tmp_path / "a", _cfg(), seed=1)
    assert res_a.steps_done == 5

    b = make_backbone(seed=7)
    res_b1 = finetune(b, root, names, tmp_path / "b", _cfg(), seed=1, stop_after=3)  # "killed" after step 3
    assert res_b1.steps_done == 3
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    b2 = make_backbone(seed=7)  # a fresh process: weights come only from the checkpoint
    res_b2 = finetune(b2, root, names, tmp_path / "b", _cfg(), seed=1)
    assert res_b2.resumed_from == 2 and res_b2.steps_done == 5
    sa, sb = a.model.state_dict(), b2.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = [m["step"] for m in read_metrics(tmp_path / "b")]
    assert steps == [1, 2, 3, 4, 5]  # each step logged once, the redone step 3 replaced
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]


def test_loss_decreases_on_a_fixed_batch_stream(make_backbone, small_world, tmp_path):
    root, info = small_world
    bb = make_backbone(seed=3)
    cfg = FinetuneConfig(loop=LoopConfig(steps=30, lr=3e-3, warmup=2, ckpt_every=100, log_every=1), batch_size=8)
    finetune(bb, root, ["toy_cls"], tmp_path / "r", cfg, seed=0)
    losses = [m["loss"] for m in read_metrics(tmp_path / "r")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_resume_refuses_a_checkpoint_of_another_size(make_backbone, small_world, tmp_path):
    import pytest

    from mmemb_lab.model.backbone import TinySpec, build_tiny

    root, info = small_world
    finetune(make_backbone(seed=0), root, ["toy_cls"], tmp_path / "r", _cfg(), seed=0, stop_after=2)
    other = make_backbone(seed=0)
    bigger = build_tiny(TinySpec(hidden=96, layers=2, heads=2, kv_heads=1, ffn=128, vision_dim=32, vision_depth=1,
                                 vision_heads=1), other.tokenizer)
    with pytest.raises(ValueError, match="checkpoint.pt: checkpoint does not match"):
        finetune(bigger, root, ["toy_cls"], tmp_path / "r", _cfg(), seed=0)
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
