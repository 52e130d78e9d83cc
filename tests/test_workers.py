"""Workers (the simulated prior): known toy behaviours, span-aware parsing, resumable sharded generation."""

import pytest

from mmemb_lab.data import item_query
from mmemb_lab.method.workers import (
    FORMAT_ONLY_TEXT,
    TOY_WORKERS,
    HFWorker,
    WorkerSpec,
    generate_candidates,
    load_candidates,
    parse_output,
    states_gold_facts,
    step_accuracy,
    toy_rationales,
)
from mmemb_lab.world.tasks import DATASETS, make_item


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_toy_workers_behave_as_labelled(name):
    """Format-only and hallucinating never state the gold facts; concise and verbose do, except on their
    documented share of multi-hop items, where they go astray (a wrong fact) or skip a hop."""
    from mmemb_lab.method.workers import CONCISE_SKIP_HOP, CONCISE_WRONG_HOP, VERBOSE_WRONG_HOP

    n, wrong = 200, {"concise": 0, "verbose": 0}
    multi = 0
    for i in range(n):
        it = make_item(name, 0, "train", i, 0.65)
        r = {x.worker: x for x in toy_rationales(it, 0)}
        assert set(r) == set(TOY_WORKERS)
        assert r["format_only"].text == FORMAT_ONLY_TEXT and not states_gold_facts(r["format_only"].text, it)
        assert not states_gold_facts(r["hallucinating"].text, it), r["hallucinating"].text
        assert len(r["verbose"].text) > len(r["concise"].text)
        multi += len(it.gold_steps) >= 2
        for w in wrong:
            ok = states_gold_facts(r[w].text, it)
            assert ok == (step_accuracy(r[w].text, it) == 1.0)
            if not ok:
                assert len(it.gold_steps) >= 2, (w, r[w].text)  # errors only on multi-hop items
                wrong[w] += 1
    if multi >= 100:  # the error rates show over enough multi-hop items
        assert 0.5 * CONCISE_WRONG_HOP < wrong["concise"] / multi < 1.6 * (CONCISE_WRONG_HOP + CONCISE_SKIP_HOP)
        assert 0.4 * VERBOSE_WRONG_HOP < wrong["verbose"] / multi < 2.0 * VERBOSE_WRONG_HOP


def test_no_worker_is_an_answer_key():
    """Over the training items of every dataset, no toy worker states all the gold facts every time."""
    items = [make_item(name, 0, "train", i, 0.65) for name in sorted(DATASETS) for i in range(60)]
    for w in TOY_WORKERS:
        acc = [step_accuracy(toy_rationales(it, 0, workers=(w,))[0].text, it) for it in items]
        assert min(acc) < 1.0, w


def test_toy_rationales_are_deterministic():
    it = make_item("toy_qa", 0, "train", 5, 1.0)
    assert toy_rationales(it, 3) == toy_rationales(it, 3)


@pytest.mark.parametrize("text,n,closed,expect", [
    ("star: top-left red star.</think>", 8, True, ("star: top-left red star.", "ok")),
    ("</think>", 1, True, ("", "empty")),
    ("   </think>", 2, True, ("", "empty")),
    ("a b c d e f g h", 64, False, ("", "overlong")),
    ("never closes", 5, False, ("", "no_span")),
    ("x " * 70 + "</think>", 71, True, ("", "overlong")),
])
def test_bad_worker_output_is_classified(text, n, closed, expect):
    assert parse_output(text, n, closed, max_tokens=60) == expect


def test_resumable_generation_with_a_tiny_hf_worker(make_backbone, tmp_path):
    """A job killed after its first shard and restarted ends with every row exactly once."""
    make_backbone(seed=5).save(tmp_path / "vlm")
    spec = WorkerSpec("tiny", str(tmp_path / "vlm"), max_new_tokens=6, batch_size=4, max_rationale_tokens=5)
    worker = HFWorker(spec)
    rows = [(f"qa-{i}", item_query(make_item("toy_qa", 0, "train", i, 0.5))) for i in range(10)]
    calls = {"n": 0}

    def dies_on_second_shard(inputs, seed):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return worker(inputs, seed=seed)
    with pytest.raises(KeyboardInterrupt):
        generate_candidates(dies_on_second_shard, rows, tmp_path / "cand", {"spec": "tiny"}, shard_size=4,
                            progress=False)
    assert len(load_candidates(tmp_path / "cand")) == 4
    rep = generate_candidates(worker, rows, tmp_path / "cand", {"spec": "tiny"}, shard_size=4, progress=False)
    ds = load_candidates(tmp_path / "cand")
    assert sorted(ds["row_id"]) == sorted(r for r, _ in rows)  # each row exactly once
    assert rep.shards_skipped == 1 and rep.shards_done == 2
    assert sum(rep.status_counts.values()) == 10  # a random model's garbage is counted, not crashed on
    assert set(rep.status_counts) <= {"ok", "empty", "overlong", "no_span"}
    assert all('"spec": "tiny"' in p for p in ds["provenance"])
