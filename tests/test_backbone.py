"""Backbone and embedder: tokenizer, three Qwen-VL families, post-norm pooling, padding, save/load."""

import json

import pytest
import torch

from mmemb_lab.data import item_candidates, item_query
from mmemb_lab.model.backbone import EMB_TOKEN, QWEN_SPECIAL, CheckpointError, load_backbone
from mmemb_lab.model.embed import Input, base_model, collate, embed, length_key
from mmemb_lab.world.tasks import make_item


def _inputs():
    items = [make_item("toy_qa", 0, "eval", 0, 1.0), make_item("toy_video_qa", 0, "eval", 1, 0.0),
             make_item("toy_doc", 0, "eval", 2, 0.0), make_item("toy_gd", 0, "eval", 3, 0.0)]
    ins = [item_query(items[0]), item_query(items[1]), item_query(items[2]),
           item_candidates(items[2])[0], item_candidates(items[3])[0], Input("red star")]
    return ins + [Input("a much longer text query about the centre of the image " * 3, rationale="after red is green.")]


def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    text = "from the star follow colour then shape. other red: centre red square."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    for tok in QWEN_SPECIAL + ("<think>", "</think>", EMB_TOKEN):
        assert tokenizer.convert_tokens_to_ids(tok) != tokenizer.unk_token_id
        assert len(tokenizer(tok, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.padding_side == "left"


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl", "qwen2_vl"])
def test_embeddings_unit_norm_and_padding_invariant(make_backbone, arch):
    bb = make_backbone(arch)
    ins = _inputs()
    batched = embed(bb, ins, batch_size=len(ins))
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(ins)), atol=1e-5)
    for i, x in enumerate(ins):
        alone = embed(bb, [x])[0]
        assert (alone - batched[i]).abs().max() < 1e-5, (arch, i)


def test_embedding_is_post_norm(make_backbone):
    """The pooled state is the OUTPUT of the final RMSNorm at the last position (captured by a hook)."""
    bb = make_backbone(seed=1)
    norm = base_model(bb.model).language_model.norm
    with torch.no_grad():  # a trained norm has non-uniform gains; at init (all ones) pre and post align
        norm.weight.copy_(torch.rand_like(norm.weight) * 2 + 0.1)
    seen = {}
    hook = norm.register_forward_hook(lambda m, i, o: seen.update(pre=i[0].detach(), post=o.detach()))
    try:
        xs = _inputs()[:3]
        ours = embed(bb, xs)
    finally:
        hook.remove()
    pre, post = seen["pre"][:, -1], seen["post"][:, -1]
    ours = ours[sorted(range(len(xs)), key=lambda i: length_key(xs[i]))]  # embed batches inputs by length
    assert not torch.allclose(pre, post, atol=1e-3)  # the norm changes the state...
    assert torch.allclose(ours, torch.nn.functional.normalize(post, dim=-1), atol=1e-6)  # ...and we pool after it
    assert not torch.allclose(ours, torch.nn.functional.normalize(pre, dim=-1), atol=1e-3)


def test_embedding_token_is_last_position(backbone):
    batch = collate(backbone, _inputs())
    assert (batch["input_ids"][:, -1] == backbone.token_id(EMB_TOKEN)).all()


def test_save_load_round_trip_exact(backbone, tmp_path):
    backbone.save(tmp_path / "ck")
    loaded = load_backbone(tmp_path / "ck", device=backbone.device)  # the fixture's device (the CPU)
    a = dict(backbone.model.state_dict())
    b = dict(loaded.model.state_dict())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(embed(backbone, _inputs()), embed(loaded, _inputs()))
    assert loaded.tokenizer.get_vocab() == backbone.tokenizer.get_vocab()


def test_checkpoint_of_another_architecture_is_refused(make_backbone, tmp_path):
    make_backbone("qwen2_vl").save(tmp_path / "q2")
    with pytest.raises(CheckpointError, match="q2.*qwen2_vl.*qwen3_vl"):
        load_backbone(tmp_path / "q2", expect_arch="qwen3_vl")
    cfg = json.loads((tmp_path / "q2" / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "q2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="q2"):
        load_backbone(tmp_path / "q2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        load_backbone(tmp_path / "empty")


def test_real_checkpoint_gets_our_tokens_and_resized_embeddings(make_backbone, tmp_path):
    """A checkpoint whose tokenizer lacks <|emb|> (as a real Qwen3-VL's does) is extended on load."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["red star at top-left"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(QWEN_SPECIAL), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    from mmemb_lab.model.backbone import TinySpec, build_tiny
    from tests.conftest import SMALL

    bb = build_tiny(TinySpec(**SMALL), hf)
    n_before = bb.model.get_input_embeddings().weight.shape[0]
    bb.model.save_pretrained(tmp_path / "real")
    hf.save_pretrained(tmp_path / "real")
    loaded = load_backbone(tmp_path / "real")
    assert EMB_TOKEN in loaded.tokenizer.get_vocab()
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(loaded.tokenizer) > n_before - 3
    e = embed(loaded, [Input("red star")])
    assert torch.allclose(e.norm(), torch.tensor(1.0))
