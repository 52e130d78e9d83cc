"""The toy world and the direct embedder: easy vs hard scores, training curves, what the foundation sees, one
retrieval up close (notebooks 00, 01).
"""

from __future__ import annotations

import logging

import numpy as np
import plotly.graph_objects as go

from ..data import visual_array
from ..summary import ModeScores
from .export import EASY, HARD

log = logging.getLogger(__name__)


def easy_hard_by_dataset(scores: ModeScores, title: str = "Direct embedding: easy vs hard items") -> go.Figure:
    """Grouped bars per dataset: score on easy items vs hard items (where a direct embedder fails)."""
    names = list(scores.per_dataset)
    fig = go.Figure()
    for per, label, colour in ((scores.per_dataset_easy, "easy", EASY),
                               (scores.per_dataset_hard, "hard (multi-hop)", HARD)):
        fig.add_bar(x=names, y=[per.get(n) for n in names], name=label, marker_color=colour)
    fig.add_hline(y=scores.easy, line_dash="dot", line_color=EASY, annotation_text=f"easy mean {scores.easy:.1f}")
    fig.add_hline(y=scores.hard, line_dash="dot", line_color=HARD,
                  annotation_text=f"hard mean {scores.hard:.1f}", annotation_position="bottom right")
    fig.update_layout(title=title, barmode="group", yaxis_title="score (%)", yaxis_range=[0, 105],
                      legend_orientation="h", template="plotly_white")
    return fig


def training_curves(metrics: list[dict], keys=("lm", "aux", "nce", "loss"), title: str = "Training") -> go.Figure:
    """One line per loss term against the step (from a run's metrics.jsonl)."""
    fig = go.Figure()
    for k in keys:
        pts = [(m["step"], m[k]) for m in metrics if k in m]
        if pts:
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines", name=k)
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", yaxis_type="log", template="plotly_white")
    return fig


def description_accuracy(acc: dict[str, float], gate: float = 0.95,
                         title: str = "Stage 0: does the foundation model see?") -> go.Figure:
    """Held-out accuracy per attribute of the model's own descriptions, with the acceptance line."""
    fig = go.Figure(go.Bar(x=list(acc), y=list(acc.values()), marker_color=[EASY if v >= gate else HARD
                                                                            for v in acc.values()]))
    fig.add_hline(y=gate, line_dash="dot", annotation_text=f"{gate:.2f}")
    fig.update_layout(title=title, yaxis_range=[0, 1.02], yaxis_title="accuracy", template="plotly_white")
    return fig



def item_figure(scores, max_candidates: int = 12) -> go.Figure:
    """One example: the query's image (or the positive's, for text queries) and every candidate's similarity."""
    from plotly.subplots import make_subplots

    item = scores.item
    order = list(np.argsort(-scores.similarities))[:max_candidates]
    labels = []
    for j in order:
        text, vis = item.candidates[j] if j < len(item.candidates) else ("(pool)", None)
        labels.append((text or f"[{type(vis).__name__.lower()} {j}]") + ("  <- positive" if j in item.labels else ""))
    visual = item.query_visual if item.query_visual is not None else item.candidates[item.labels[0]][1]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.35, 0.65],
                        subplot_titles=("query image" if item.query_visual is not None else "positive target",
                                        "cosine similarity to each candidate"))
    fig.add_trace(go.Image(z=visual_array(visual)), row=1, col=1)
    colours = [EASY if j in item.labels else "#BBBBBB" for j in order]
    fig.add_trace(go.Bar(x=scores.similarities[order][::-1], y=labels[::-1], orientation="h",
                         marker_color=colours[::-1], showlegend=False), row=1, col=2)
    kind = "hard (needs reasoning)" if item.needs_reasoning else "easy"
    fig.update_layout(title=f"{item.dataset} [{kind}]: {item.query_text}", template="plotly_white",
                      height=140 + 22 * len(order), margin_l=20)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_yaxes(showticklabels=False, row=1, col=1)
    # candidate names on the right, in a margin sized to fit them: on the left they run over the image
    fig.update_yaxes(side="right", automargin=True, row=1, col=2)
    return fig
