"""Slot probes: what a retrieval task must match, read linearly out of one embedding."""

import numpy as np
import pytest

from mmemb_lab.method.diagnostics import PROBE_OFFSET, linear_readout, slot_labels, slot_probe
from mmemb_lab.world.scenes import COLOURS, LETTERS, POSITIONS, SHAPES
from mmemb_lab.world.tasks import make_item


def _labels(rng, n, slots=3, k=5, fill=0.6):
    return np.where(rng.random((n, slots)) < fill, rng.integers(1, k + 1, (n, slots)), 0)


def test_a_readout_finds_what_is_encoded_and_nothing_in_noise():
    rng = np.random.default_rng(0)
    y = _labels(rng, 600)
    onehot = np.concatenate([np.eye(6)[y[:, s]] for s in range(3)], 1)  # every slot's value, linearly
    encoded = np.concatenate([onehot, rng.normal(0, 0.3, (600, 14))], 1)
    acc, train, major = linear_readout(encoded, y, 450)
    assert acc > 0.95 and train > 0.95
    assert 0.15 < major < 0.35                                     # 5 values, near uniform
    acc, _, major = linear_readout(rng.normal(size=(600, 32)), y, 450)
    assert acc < major + 0.1                                        # noise: no better than chance


def test_a_readout_scores_filled_slots_only():
    rng = np.random.default_rng(1)
    y = _labels(rng, 400)
    y[:, 2] = 0                                                     # a slot nobody fills: skipped
    x = np.concatenate([np.eye(6)[y[:, 0]], rng.normal(size=(400, 6))], 1)  # slot 0 encoded, slot 1 not
    acc, _, _ = linear_readout(x, y, 300)
    only0, _, _ = linear_readout(x, y[:, :1], 300)
    only1, _, _ = linear_readout(x, y[:, 1:2], 300)
    assert only0 > 0.95 and only1 < 0.5
    assert acc == pytest.approx((only0 + only1) / 2)


def test_slot_labels_fill_what_the_caption_names_and_agree_with_the_target():
    for i in range(20):
        it = make_item("toy_t2i", 0, "eval", PROBE_OFFSET + i, 0.0)
        target, query = slot_labels(it)
        scene = it.candidates[it.labels[0]][1]
        named = [c for c, v in enumerate(query["object"]) if v]
        assert len(named) == 2 and all(f"at {POSITIONS[c]}" in it.query_text for c in named)
        for c in named:
            o = scene.cells[c]
            assert target["object"][c] == query["object"][c]
            assert COLOURS[query["colour"][c] - 1] == o.colour and SHAPES[query["shape"][c] - 1] == o.shape
        assert [bool(v) for v in target["object"]] == [o is not None for o in scene.cells]
        page_it = make_item("toy_doc", 0, "eval", PROBE_OFFSET + i, 0.0)
        target, query = slot_labels(page_it)
        page = page_it.candidates[0][1]
        for (k, d) in page_it.meta["conditions"]:
            assert query["digit"][LETTERS.index(k)] == target["digit"][LETTERS.index(k)] == 1 + int(d)
        assert sum(bool(v) for v in query["digit"]) == 2
        assert sum(bool(v) for v in target["digit"]) == len(page.rows)
    with pytest.raises(ValueError, match="toy_cls"):
        slot_labels(make_item("toy_cls", 0, "eval", 0, 0.0))


def test_slot_probe_runs_on_a_tiny_model(backbone):
    out = slot_probe(backbone, "toy_t2i", n=24)
    assert [(p.side, p.attribute) for p in out] == [(s, a) for s in ("target", "query")
                                                    for a in ("object", "colour", "shape")]
    assert all(0.0 <= p.accuracy <= 1.0 and 0.0 < p.majority <= 1.0 and p.n == 24 for p in out)
    assert [p.attribute for p in slot_probe(backbone, "toy_doc", n=24)] == ["digit", "digit"]
