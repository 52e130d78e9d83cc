"""Attribution (captum integrated gradients) of s(e(q + r), e(t+)) against the toy world's known truth."""

import numpy as np
import pytest

from mmemb_lab.paths import foundation_dir

COMMITTED = foundation_dir() / "foundation.json"


@pytest.fixture(scope="module")
def foundation():
    from mmemb_lab.foundation import load_foundation

    return load_foundation(foundation_dir())[0]


@pytest.fixture(scope="module")
def explained(foundation):
    from mmemb_lab.attribution import explain_item
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
    from mmemb_lab.attribution import cell_attribution, fact_words, kind_means, named_cells

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


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed foundation model")
def test_figures_show_the_values(explained):
    from mmemb_lab.figures import patch_figure, token_figure

    it, tok, pat = explained[0]
    fig = token_figure(tok)
    assert len(fig.data) >= 1
    heat = patch_figure(pat)
    z = [tr.z for tr in heat.data if tr.type == "heatmap"]
    assert len(z) == 1 and np.allclose(np.asarray(z[0], dtype=float), np.abs(pat.grid))
