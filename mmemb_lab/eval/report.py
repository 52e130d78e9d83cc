"""The paper table: MMEB-V2 scores by meta-task, modality and overall, beside the peers' published numbers.

Concept
    Papers on multimodal embeddings report MMEB-V2 as one table: image CLS / QA / RET / GD, video CLS / QA /
    RET / MRET, visual documents VDRv1 / VDRv2 / VisRAG / OOD, a mean per modality, and the overall score.
    Every cell is an unweighted mean over datasets (``metrics.aggregate``), and the overall is the mean
    over *all 78 datasets*, not over the three modality means - so image (36 datasets) weighs more than
    video (18). A :class:`PaperTable` holds one such row; :func:`table_markdown` and
    :func:`table_figure` render rows of ours beside the peers' overall scores, which are read from
    ``data/peers_mmeb_v2.json`` (each with its source), never typed here.

    A row computed on fewer datasets than the registry is marked partial (``n/78``): its overall is not
    comparable with a paper's. Peers' numbers come from different split versions; the file says so.

Used by: ``mmemb-lab benchmark`` (prints the markdown), notebook 06.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from ..data import DatasetInfo
from ..paths import data_dir
from .metrics import aggregate
from .registry import META_TASKS

__all__ = ["PaperTable", "Peer", "paper_table", "table_from_result", "load_peers", "columns_of",
           "table_markdown", "table_figure", "overall_figure", "SHORT"]

SHORT = {"VisRAG": "VR"}  # the papers' column captions
OURS, PEER = "#4C78A8", "#BAB0AC"


@dataclass(frozen=True)
class PaperTable:
    """One row of the paper table (percent)."""

    label: str
    """Row caption, e.g. the model or run name."""
    cells: dict[str, float]
    """``"<modality>/<meta_task>"`` -> unweighted mean over its scored datasets."""
    modality: dict[str, float]
    """Modality -> unweighted mean over its scored datasets."""
    overall: float
    """Unweighted mean over every scored dataset."""
    n_datasets: int
    """Datasets that went into ``overall``."""
    n_expected: int
    """Datasets in the registry (78 for MMEB-V2)."""
    missing: tuple[str, ...]
    """Registry datasets without a score."""

    @property
    def partial(self) -> bool:
        return self.n_datasets < self.n_expected


@dataclass(frozen=True)
class Peer:
    """A peer's published overall score and where it comes from."""

    model: str
    size: str
    overall: float
    source: str
    note: str = ""
    approx: bool = False

    @property
    def label(self) -> str:
        return f"{self.model} {self.size}".strip()


def paper_table(per_dataset: Mapping[str, float], registry: Mapping[str, DatasetInfo], label: str = "ours",
                ) -> PaperTable:
    """Aggregate per-dataset scores (percent) into one paper-table row by the MMEB-V2 rules."""
    agg = aggregate(per_dataset, registry)
    return PaperTable(label, dict(agg.per_meta_task), dict(agg.per_modality), agg.overall, agg.n_datasets,
                      len(registry), agg.missing)


def table_from_result(result, registry: Mapping[str, DatasetInfo], label: str | None = None) -> PaperTable:
    """A row from a ``harness.BenchmarkResult`` or its ``summary()`` dict."""
    summary = result if isinstance(result, dict) else result.summary()
    return paper_table(summary["per_dataset"], registry, label or f"{summary.get('backbone', 'ours')} "
                       f"({summary.get('mode', 'direct')}, {summary.get('prompt', 'user')} prompt)")


def load_peers(path: str | Path | None = None) -> tuple[Peer, ...]:
    """Peers' published overall MMEB-V2 scores (default ``data/peers_mmeb_v2.json``)."""
    p = Path(path) if path is not None else data_dir() / "peers_mmeb_v2.json"
    return tuple(Peer(**d) for d in json.loads(p.read_text())["peers"])


def columns_of(registry: Mapping[str, DatasetInfo]) -> list[tuple[str, list[str]]]:
    """[(modality, [meta-task column keys])] in paper order, for the columns the registry has."""
    present = {(d.modality, d.meta_task) for d in registry.values()}
    order = [mt for mt in META_TASKS if mt in present] + sorted(present - set(META_TASKS))
    out: list[tuple[str, list[str]]] = []
    for modality, task in order:
        if not out or out[-1][0] != modality:
            out.append((modality, []))
        out[-1][1].append(f"{modality}/{task}")
    return out


def _fmt(x: float | None) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.1f}"


def _header(groups) -> list[str]:
    head = ["model"]
    for modality, cols in groups:
        head += [f"{modality} {SHORT.get(c.split('/')[1], c.split('/')[1])}" for c in cols] + [f"{modality} mean"]
    return head + ["overall", "datasets"]


def _row(t: PaperTable, groups) -> list[str]:
    row = [t.label]
    for modality, cols in groups:
        row += [_fmt(t.cells.get(c)) for c in cols] + [_fmt(t.modality.get(modality))]
    return row + [_fmt(t.overall), f"{t.n_datasets}/{t.n_expected}"]


def _peer_row(p: Peer, groups) -> list[str]:
    n_cells = sum(len(cols) + 1 for _, cols in groups)
    return [p.label + " (published)"] + ["–"] * n_cells + [("~" if p.approx else "") + _fmt(p.overall), "–"]


def table_markdown(tables: Sequence[PaperTable], registry: Mapping[str, DatasetInfo],
                   peers: Sequence[Peer] = ()) -> str:
    """The paper table as markdown: our rows, then the peers' published overall scores, with notes."""
    groups = columns_of(registry)
    rows = [_header(groups)] + [_row(t, groups) for t in tables] + [_peer_row(p, groups) for p in peers]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|")
    notes = [f"- {t.label}: partial, {t.n_datasets} of {t.n_expected} datasets; its overall is not comparable "
             "with a paper's." for t in tables if t.partial]
    notes += [f"- {p.label}: {p.source}" + (f"; {p.note}" if p.note else "") for p in peers]
    if peers:
        notes.append("- Peers' scores are as published; split versions and prompt conventions differ.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def table_figure(tables: Sequence[PaperTable], registry: Mapping[str, DatasetInfo], peers: Sequence[Peer] = (),
                 title: str = "MMEB-V2 by meta-task") -> go.Figure:
    """The paper table as a plotly table (our rows shaded, peers' published rows below)."""
    groups = columns_of(registry)
    head = _header(groups)
    rows = [_row(t, groups) for t in tables] + [_peer_row(p, groups) for p in peers]
    fill = [["#DCE6F2"] * len(tables) + ["white"] * len(peers)] * len(head)
    fig = go.Figure(go.Table(header=dict(values=head, fill_color="#4C78A8", font_color="white", align="center"),
                             cells=dict(values=[list(c) for c in zip(*rows)] if rows else [[]] * len(head),
                                        fill_color=fill, align=["left"] + ["center"] * (len(head) - 1))))
    fig.update_layout(title=title, template="plotly_white", margin=dict(l=10, r=10, t=50, b=10))
    return fig


def overall_figure(tables: Sequence[PaperTable], peers: Sequence[Peer] = (),
                   title: str = "MMEB-V2 overall: ours beside published peers") -> go.Figure:
    """Horizontal bars of the overall score: our rows and the peers' published scores (hover: source)."""
    items = [(t.label + (f" [{t.n_datasets}/{t.n_expected}]" if t.partial else ""), t.overall, OURS,
              "this run" + (" (partial)" if t.partial else "")) for t in tables]
    items += [(p.label, p.overall, PEER, p.source) for p in peers]
    items.sort(key=lambda x: x[1])
    fig = go.Figure(go.Bar(x=[i[1] for i in items], y=[i[0] for i in items], orientation="h",
                           marker_color=[i[2] for i in items], customdata=[i[3] for i in items],
                           hovertemplate="%{y}: %{x:.1f}<br>%{customdata}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="overall (%)", xaxis_range=[0, 100], template="plotly_white",
                      height=max(300, 28 * len(items) + 120))
    return fig
