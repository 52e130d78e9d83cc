"""Paper figures: the method's figures rebuilt from one run folder, styled for print (notebook 07,
``make figures``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import plotly.graph_objects as go

from ..model.backbone import load_backbone
from ..summary import Summary
from ..train.loop import read_metrics
from ..world.tasks import make_item
from .attribution import patch_figure, token_figure
from .basic import easy_hard_by_dataset
from .method import (
    MODE_ORDER,
    gate_curve,
    gate_invocation,
    modes_easy_hard,
    reasoning_headroom,
    rl_curves,
    stage1_curves,
    step_choice,
    worker_gains,
)

log = logging.getLogger(__name__)


def print_style(fig: go.Figure) -> go.Figure:
    """A copy of ``fig`` for a paper: white template, larger type, a fixed 7 x 4.4 inch box (at 100 dpi)."""
    out = go.Figure(fig)
    two_panels = "xaxis2" in out.layout and out.layout.xaxis2.domain is not None
    out.update_layout(template="simple_white", font={"family": "Arial, Helvetica, sans-serif", "size": 15},
                      width=1000 if two_panels else 700, height=500 if two_panels else 440,
                      margin={"l": 70, "r": 20, "t": 60, "b": 90}, colorway=OKABE_ITO)
    for shape in out.layout.shapes:  # simple_white's shape defaults have no line: reference lines keep theirs
        if shape.type == "line" and shape.line.width is None:
            shape.line.width, shape.opacity = 1.5, 1.0
    return out


OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
"""Colour-blind-safe palette (Okabe and Ito) for traces that set no colour of their own in print."""


def attribution_examples(run: Path, summary: Summary, n_steps: int = 32) -> dict[str, go.Figure]:
    """Which words of a gold rationale and which patches of the query image the match rests on, for the first
    hard ``toy_qa`` evaluation item of the run's world, on the run's stage-1 model (``mmemb_lab.eval.attribution``);
    empty when the run has no stage-1 model."""
    from ..eval.attribution import explain_item  # captum: imported when drawn

    model = run / "stage1" / "selected" / "model"
    if not (model / "mmemb_backbone.json").is_file():
        return {}
    cfg = summary.world["config"]
    item = next(it for it in (make_item("toy_qa", cfg["seed"], "eval", i, cfg["hard_fraction"]) for i in range(10_000))
                if it.needs_reasoning)
    tokens, patches = explain_item(load_backbone(model), item, n_steps=n_steps)
    out = {"attribution_tokens": token_figure(tokens, title=f"Attribution of s(e(q + r), e(t+)) to the rationale's "
                                                           f"words ({item.item_id}, stage-1 model)")}
    if patches is not None:
        out["attribution_patches"] = patch_figure(patches, title=f"... and to the query image's patches ({item.item_id})")
    return out


def run_figures(run: str | Path, s: Summary) -> dict[str, go.Figure]:
    """Every method figure a demo run supports, from its summary and the selection's and stage 1's files
    (never from typed numbers): what the demo writes to ``<run>/figures`` besides its stages' own figures."""
    run = Path(run)
    ev = s.eval
    figs = {"direct_easy_vs_hard": easy_hard_by_dataset(ev["direct"])}
    if len([m for m in MODE_ORDER if m in ev]) > 1:
        figs["modes_easy_hard"] = modes_easy_hard(ev)
    if s.selection is not None and "stage0_direct" in ev:
        figs["reasoning_headroom"] = reasoning_headroom(ev["stage0_direct"], s.selection, s.gate)
    if s.gate is not None:
        choice = s.gate.threshold_choice.get("stage2", {})
        figs["gate_curve"] = gate_curve(s.gate.curve, s.gate.threshold, choice.get("curve"), ev)
        if "adaptive" in ev:
            figs["gate_invocation"] = gate_invocation(ev["adaptive"], s.gate)
        if choice.get("per_step"):
            figs["stage2_step_choice"] = step_choice(choice["per_step"], choice.get("step"))
    if s.stage2 is not None:
        figs["rl_curves"] = rl_curves(s.stage2.reward_during_rl, s.stage2.invocation_during_rl)
    sel = run / "selection"
    if (sel / "gains.jsonl").is_file() and (sel / "stage1_set.jsonl").is_file():
        read = lambda f: [json.loads(line) for line in (sel / f).read_text().splitlines() if line]  # noqa: E731
        figs["selection_by_worker"] = worker_gains(read("gains.jsonl"), read("stage1_set.jsonl"))
    arms = {a: read_metrics(run / "stage1" / a / "train") for a in ("selected", "random_worker")
            if (run / "stage1" / a / "train" / "metrics.jsonl").is_file()}
    if arms:
        figs["stage1_curves"] = stage1_curves(arms)
    return figs


def paper_figures(run: str | Path, attribution: bool = True) -> dict[str, go.Figure]:
    """:func:`run_figures` of a finished demo run, in print style; with ``attribution``, the attribution
    examples computed on the run's stage-1 model (:func:`attribution_examples`, seconds on a CPU). Raises
    FileNotFoundError naming the file when ``run`` is not a finished demo run."""
    run = Path(run)
    path = run / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a finished demo run (make demo OUT={run} writes it)")
    s = Summary.load(path)
    figs = run_figures(run, s)
    if attribution:
        figs.update(attribution_examples(run, s))
    return {name: print_style(fig) for name, fig in figs.items()}
