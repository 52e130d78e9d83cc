"""Static export of figures: HTML always; PNG and PDF from one browser session when a Chromium exists, and a
warning naming what is missing when it does not."""

import logging
import os

import plotly.graph_objects as go
import pytest

from mmemb_lab import figures


def _figs():
    return {"a": go.Figure(go.Scatter(x=[0, 1], y=[1, 0])), "b": go.Figure(go.Bar(x=["x", "y"], y=[2, 3]))}


@pytest.mark.skipif(figures.find_browser() is None and not os.environ.get("MMEMB_REQUIRE_BROWSER"),
                    reason="no Chromium for kaleido on this machine")
def test_png_and_pdf_for_every_figure_from_one_session(tmp_path):
    figures.save_figures(_figs(), tmp_path, run="t", png_scale=2.0, pdf=True, timeout_s=120)
    for name in ("a", "b"):
        assert (tmp_path / f"{name}.html").is_file()
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (tmp_path / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name


def test_without_a_browser_only_html_and_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(figures.export, "find_browser", lambda: None)
    (tmp_path / "a.pdf").write_bytes(b"%PDF- stale")  # an older export never outlives its HTML
    with caplog.at_level(logging.WARNING, logger=figures.__name__):
        figures.save_figures(_figs(), tmp_path, run="t", pdf=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".js") == ["a.html", "b.html"]
    assert any("no Chromium" in r.getMessage() for r in caplog.records)


def test_print_style_keeps_reference_lines():
    """The print template's shape defaults draw lines with no width: a dashed reference line (the paper's
    invocation rate on the gate's sweep) must stay visible in the paper figure."""
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1]))
    fig.add_vline(x=0.74, line_dash="dash", line_color="black")
    shape = figures.print_style(fig).layout.shapes[0]
    assert shape.line.width and shape.line.width > 0 and shape.opacity == 1.0
