"""Stage 0: the committed foundation model matches the current world and tokenizer, and it sees."""

import json

import numpy as np
import pytest
import torch

from mmemb_lab.foundation import (
    Stage0, answer_labels, description_accuracy, load_foundation, score_page_text, score_scene_text,
    world_fingerprint,
)
from mmemb_lab.paths import foundation_dir
from mmemb_lab.world.scenes import random_page, random_scene

COMMITTED = foundation_dir() / "foundation.json"


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed foundation model")
def test_committed_foundation_matches_world_and_tokenizer():
    """Fails when the world generator or the tokenizer changes: rerun `make foundation` and commit."""
    backbone, meta = load_foundation(foundation_dir())
    assert meta["fingerprint"] == world_fingerprint(backbone.tokenizer)
    acc = meta["description_accuracy"]  # measured at training time on 100 held-out scenes, videos, pages
    assert min(acc[k] for k in ("occupancy", "colour", "shape", "page_letter", "page_digit")) >= 0.95, acc
    # Frames are read at 0.86-0.91 (below the 0.95 the issue asks for; see the closing note): a regression
    # guard, not the acceptance line.
    assert min(acc[k] for k in ("frame_occupancy", "frame_colour", "frame_shape")) >= 0.85, acc
    size = sum(p.stat().st_size for p in foundation_dir().iterdir())
    assert size <= 20 * 2 ** 20


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed foundation model")
def test_committed_foundation_sees_fresh_items():
    backbone, _ = load_foundation(foundation_dir())
    acc = description_accuracy(backbone, seed=4242, n=10)
    assert min(acc[k] for k in ("occupancy", "colour", "shape", "page_letter", "page_digit")) >= 0.9, acc
    assert min(acc[k] for k in ("frame_occupancy", "frame_colour", "frame_shape")) >= 0.7, acc


def test_description_scoring_is_exact():
    rng = np.random.default_rng(0)
    s = random_scene(rng)
    assert set(map(np.mean, score_scene_text(s.describe(), s).values())) == {1.0}
    wrong = s.describe().replace("empty", "red star", 1)
    assert np.mean(score_scene_text(wrong, s)["occupancy"]) == pytest.approx(8 / 9)
    p = random_page(rng)
    assert np.mean(score_page_text(p.describe(), p)["digit"]) == 1.0
    assert np.mean(score_page_text("", p)["letter"]) == 0.0


def test_answer_labels_cover_only_the_answer(backbone):
    from mmemb_lab.embed import Input, collate

    answers = ["top-left red star.<|im_end|>", "E is 4.<|im_end|>"]
    batch = collate(backbone, [Input("what is at top-left?"), Input("a much longer question, what is E?")], answers)
    labels = answer_labels(backbone, batch, answers)
    for i, a in enumerate(answers):
        kept = labels[i][labels[i] != -100]
        assert backbone.tokenizer.decode(kept) == a


def test_stage0_step_trains_head_and_backbone(backbone):
    from mmemb_lab.foundation import FoundationConfig, make_step_fn

    st = Stage0(backbone)
    cfg = FoundationConfig(gen_batch=4, nce_batch=4, see_steps=0)
    out = make_step_fn(backbone, cfg, 0)(0, st)
    out["loss"].backward()
    assert {"lm", "aux", "nce"} <= set(out)
    assert st.head.weight.grad is not None and st.head.weight.grad.abs().sum() > 0
    assert backbone.model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    backbone.model.zero_grad()
