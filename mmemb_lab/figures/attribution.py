"""Attribution as figures: the rationale's tokens as a heat strip and the query image's patches as a heat map.

Used by: ``figures.paper`` (notebook 07, ``make figures``); :func:`shortcut_figure` by ``method.shortcut``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go

if TYPE_CHECKING:  # the attribution module imports captum when it runs: named for the annotations only
    from ..eval.attribution import PatchAttribution, TokenAttribution


def token_figure(attr: TokenAttribution, span_only: bool = True, title: str | None = None) -> go.Figure:
    """The prompt's tokens as a heat strip, shaded by signed attribution (blue +, red -), wrapped in rows."""
    toks = [t for t in attr.tokens if t.in_span or not span_only]
    per_row = 16
    n_rows = max(1, -(-len(toks) // per_row))
    z = np.full((n_rows, per_row), np.nan)
    text = np.full((n_rows, per_row), "", dtype=object)
    for i, t in enumerate(toks):
        z[i // per_row, i % per_row] = t.value
        text[i // per_row, i % per_row] = t.token.replace("<", "&lt;").replace(">", "&gt;")
    lim = float(np.nanmax(np.abs(z))) if toks else 1.0
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", zmin=-lim, zmax=lim, colorscale="RdBu",
                               hovertemplate="%{text}: %{z:.4f}<extra></extra>", colorbar_title="IG"))
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=title or f"token attribution of s(e(q + r), e(t+)) = {attr.similarity:.3f} "
                                     f"(pad baseline {attr.baseline_similarity:.3f})",
                      template="plotly_white", height=120 + 40 * n_rows)
    return fig


def patch_figure(patches: PatchAttribution, image: int = 0, title: str | None = None) -> go.Figure:
    """The query image with its per-patch attribution (absolute) laid over it as a translucent heat map."""
    im = np.asarray(patches.images[image]) if patches.images else None
    g = np.abs(patches.grids[image])
    w, h = patches.image_sizes[image]
    p = patches.patch_size
    fig = go.Figure()
    if im is not None:
        fig.add_trace(go.Image(z=im))
    fig.add_trace(go.Heatmap(z=g, x=np.arange(g.shape[1]) * p + (p - 1) / 2, y=np.arange(g.shape[0]) * p + (p - 1) / 2,
                             colorscale="Hot", opacity=0.55, colorbar_title="|IG|",
                             hovertemplate="patch (%{y}, %{x}): %{z:.4f}<extra></extra>"))
    fig.update_xaxes(range=[-0.5, w - 0.5], showticklabels=False)
    fig.update_yaxes(range=[h - 0.5, -0.5], showticklabels=False, scaleanchor="x")
    fig.update_layout(title=title or f"patch attribution (mean-colour baseline; s = {patches.similarity:.3f})",
                      template="plotly_white", width=420, height=420)
    return fig


def shortcut_figure(results: dict) -> go.Figure:
    """Models trained on different rationales (arm -> ``method.shortcut.ShortcutArm``), read with the gold one:
    how much a fact token moves the similarity against a format token, and Hit@1 with the gold rationale
    against a format-only one."""
    from plotly.subplots import make_subplots

    arms = list(results)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("attribution per token: fact / format",
                                                        "Hit@1 by the rationale in the span"))
    fig.add_bar(x=arms, y=[results[a].fact_per_format for a in arms], name="fact / format", marker_color="#0072B2",
                row=1, col=1)
    fig.add_hline(y=1.0, line_dash="dot", row=1, col=1, annotation_text="format = fact")
    for key, label, colour in (("hit1_gold", "gold rationale", "#009E73"), ("hit1_format", "format-only", "#D55E00")):
        fig.add_bar(x=arms, y=[getattr(results[a], key) for a in arms], name=label, marker_color=colour, row=1, col=2)
    fig.update_yaxes(title_text="ratio", row=1, col=1)
    fig.update_yaxes(title_text="Hit@1 (%)", range=[0, 105], row=1, col=2)
    fig.update_layout(title="Does the vector use the reasoning, or its format? (models by training rationale)",
                      barmode="group", template="plotly_white", legend_orientation="h")
    return fig
