"""Attribution (captum integrated gradients) of s(e(q + r), e(t+)) against the toy world's known truth."""

import numpy as np
import pytest

from mmemb_lab.paths import data_dir, foundation_dir

COMMITTED = foundation_dir() / "foundation.json"
GATE = data_dir() / "gate"


@pytest.fixture(scope="module")
def foundation():
    from mmemb_lab.train.foundation import load_foundation

    return load_foundation(foundation_dir())[0]


@pytest.fixture(scope="module")
def explained(foundation):
    from mmemb_lab.eval.attribution import explain_item
    from mmemb_lab.world.tasks import make_item

    items = [make_item("toy_qa", 0, "eval", 300 + i, 1.0) for i in range(6)]
    return [(it, *explain_item(foundation, it, n_steps=16)) for it in items]


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed foundation model")
def test_only_the_reasoning_span_moves_from_the_baseline(explained):
    for it, tok, _ in explained:
        assert np.allclose([t.value for t in tok.tokens if not t.in_span], 0.0), it.item_id
        assert tok.similarity != tok.baseline_similarity


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed foundation model")
@pytest.mark.xfail(strict=True, reason="open defect: IG does not converge here - the attributions do not sum to "
                                        "s(x) - s(baseline) (tokens: error 0.23 of a 0.44 gap on qa-302 at 16 steps; "
                                        "patches: -0.045 of 0.226 on qa-300 even at 96 steps)")
def test_integrated_gradients_account_for_the_similarity(explained):
    """Completeness: the attributions sum to s(x) - s(baseline), up to a tenth of the gap."""
    for it, tok, pat in explained:
        assert abs(tok.delta) <= 0.1 * abs(tok.similarity - tok.baseline_similarity) + 1e-3, (it.item_id, tok.delta)
        assert abs(pat.delta) <= 0.1 * abs(pat.similarity - pat.baseline_similarity) + 1e-3, (it.item_id, pat.delta)


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed foundation model")
def test_the_similarity_rests_on_the_gold_facts_and_the_cells_they_name(explained):
    """Hard toy_qa items with their gold rationale, on the stage-0 model: the tokens naming gold facts carry
    more attribution per token than format tokens (span markers, punctuation, connectives), and the cells the
    steps name carry more patch attribution than the other cells. Measured: fact/format 1.88 and named/other
    cells 4.1 on the committed stage-0 model (8 items); the stage-1 model of `make demo SEED=0` gives 2.76 and
    5.5 (docs/research-log.md, Attribution)."""
    from mmemb_lab.eval.attribution import cell_attribution, fact_words, kind_means, named_cells

    fact, fmt, named, other = [], [], [], []
    for it, tok, pat in explained:
        km = kind_means(tok, fact_words(it.gold_steps))
        fact.append(km["fact"])
        fmt.append(km["format"])
        cells = cell_attribution(pat).flatten()
        nc = sorted(named_cells(it.gold_steps))
        named.append(cells[nc].mean())
        other.append(np.delete(cells, nc).mean())
    assert np.mean(fact) >= 1.5 * np.mean(fmt), (np.mean(fact), np.mean(fmt))
    assert np.mean(named) >= 2.0 * np.mean(other), (np.mean(named), np.mean(other))


def _ratios(model, n: int = 6):
    from mmemb_lab.eval.attribution import cell_attribution, explain_item, fact_words, kind_means, named_cells
    from mmemb_lab.world.tasks import make_item

    fact, fmt, named, other = [], [], [], []
    for i in range(n):
        it = make_item("toy_qa", 0, "eval", 300 + i, 1.0)
        tok, pat = explain_item(model, it, n_steps=16)
        km = kind_means(tok, fact_words(it.gold_steps))
        fact.append(km["fact"])
        fmt.append(km["format"])
        cells, nc = cell_attribution(pat).flatten(), sorted(named_cells(it.gold_steps))
        named.append(cells[nc].mean())
        other.append(np.delete(cells, nc).mean())
    return np.mean(fact) / np.mean(fmt), np.mean(named) / np.mean(other)


@pytest.mark.skipif(not (GATE / "gate.json").exists(), reason="no committed gate model")
def test_the_trained_model_rests_twice_as_much_on_gold_facts_as_on_format():
    """The issue's bar, on the model the method trains (data/gate: stage 1 then stage 2 of `make demo SEED=0`):
    per token, gold facts carry at least twice the attribution of format tokens, and the cells the steps name
    at least twice that of the other cells. Measured 2.60 and 6.5 (docs/research-log.md, Attribution)."""
    from mmemb_lab.model.backbone import load_backbone

    tokens, patches = _ratios(load_backbone(GATE))
    assert tokens >= 2.0 and patches >= 2.0, (tokens, patches)


def test_the_shortcut_experiment_trains_and_reads_every_arm(tiny_foundation, tmp_path):
    """Plumbing at smoke size (random weights: no claim about the ratios): every arm is trained from the same
    start on its own rationales, read, written to shortcut.json, and a rerun resumes instead of retraining."""
    import json

    from mmemb_lab.method.shortcut import ARMS, ShortcutConfig, _training_pairs, run_shortcut

    cfg = ShortcutConfig(n_train=8, n_eval=2, n_explain=1, ig_steps=2, steps=2)
    texts = {arm: [r for _, r in _training_pairs(cfg, arm)] for arm in ARMS}
    assert len(set(texts["shortcut"])) == 1 and texts["faithful"] != texts["misleading"]
    assert [it.item_id for it, _ in _training_pairs(cfg, "faithful")] == [
        it.item_id for it, _ in _training_pairs(cfg, "shortcut")]  # same pairs, other rationales
    res = run_shortcut(tiny_foundation, tmp_path, cfg)
    assert set(res) == set(ARMS) and all(np.isfinite(r.fact_per_format) for r in res.values())
    written = json.loads((tmp_path / "shortcut.json").read_text())
    assert written["arms"]["shortcut"]["hit1_gold"] == res["shortcut"].hit1_gold
    stamp = (tmp_path / "faithful" / "checkpoint.pt").stat().st_mtime_ns
    again = run_shortcut(tiny_foundation, tmp_path, cfg, arms=("faithful",))
    assert (tmp_path / "faithful" / "checkpoint.pt").stat().st_mtime_ns == stamp  # resumed at its last step
    assert again["faithful"].hit1_gold == res["faithful"].hit1_gold


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed foundation model")
def test_figures_show_the_values(explained):
    from mmemb_lab.figures import patch_figure, token_figure

    it, tok, pat = explained[0]
    fig = token_figure(tok)
    assert len(fig.data) >= 1
    heat = patch_figure(pat)
    z = [tr.z for tr in heat.data if tr.type == "heatmap"]
    assert len(z) == 1 and np.allclose(np.asarray(z[0], dtype=float), np.abs(pat.grid))
