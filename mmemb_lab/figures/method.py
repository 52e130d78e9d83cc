"""The method's figures: latent reasoning and counterfactual selection (notebooks 02, 03), stage 1 (04), the
gate and stage 2 (05).
"""

from __future__ import annotations

import logging

import numpy as np
import plotly.graph_objects as go

from ..summary import GateSummary, ModeScores, SelectionSummary
from .export import EASY, HARD

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# latent reasoning and counterfactual selection (notebooks 02, 03; docs/method.md, steps 1-2)

WORKER_COLOURS = {"concise": "#4C78A8", "verbose": "#72B7B2", "format_only": "#F58518", "hallucinating": "#E45756",
                  "own": "#54A24B", "none": "#BBBBBB"}


def latent_view_figure(view) -> go.Figure:
    """Prior vs posterior over the values of r for one pair, with the likelihood p(t+ | q, r) as text."""
    fig = go.Figure()
    fig.add_bar(x=view.labels, y=view.prior, name="prior p(r | q)", marker_color="#BBBBBB")
    fig.add_bar(x=view.labels, y=view.posterior, name="posterior p(r | q, t+)", marker_color=EASY,
                text=[f"p(t+|q,r)={v:.2f}" for v in view.likelihood], textposition="outside")
    fig.update_layout(title=f"{view.item.dataset}: {view.item.query_text}<br><sup>p(t+ | q) = {view.marginal:.3f}"
                            f" ({'hard' if view.item.needs_reasoning else 'easy'} item)</sup>",
                      barmode="group", yaxis_title="probability", yaxis_range=[0, 1.15], template="plotly_white")
    return fig


def gain_scatter(table, tau: float) -> go.Figure:
    """Removal gain (x) vs swap gain (y) for every (pair, worker): the swap exposes format-only benefit."""
    fig = go.Figure()
    for j, w in enumerate(table.workers):
        m = table.valid[:, j]
        fig.add_scatter(x=table.gain_removal[m, j], y=table.gain_swap[m, j], mode="markers", name=w, opacity=0.6,
                        marker_color=WORKER_COLOURS.get(w), text=[table.item_ids[i] for i in np.where(m)[0]])
    fig.add_vline(x=tau, line_dash="dot", annotation_text="tau (removal)")
    fig.add_hline(y=tau, line_dash="dot", annotation_text="tau (swap)")
    fig.update_layout(title="Counterfactual gain per pair: removal vs swap (log p(t+) under InfoNCE, nats)",
                      xaxis_title="gain vs do(r = nothing)", yaxis_title="gain vs do(r = another query's rationale)",
                      template="plotly_white")
    return fig


def gain_by_worker(table, variant: str = "swap") -> go.Figure:
    """Distribution of a counterfactual gain by worker, easy vs hard items."""
    fig = go.Figure()
    g = table.gains(variant)
    for hard, colour in ((False, EASY), (True, HARD)):
        xs, ys = [], []
        for j, w in enumerate(table.workers):
            m = table.valid[:, j] & (table.needs_reasoning == hard)
            xs += [w] * int(m.sum())
            ys += list(g[m, j])
        fig.add_box(x=xs, y=ys, name="hard" if hard else "easy", marker_color=colour, boxpoints=False)
    fig.update_layout(title=f"{variant} gain by worker (nats)", boxmode="group", yaxis_title="gain",
                      template="plotly_white")
    return fig


def selection_outcome(selection) -> go.Figure:
    """Per dataset (easy / hard): which worker was selected, or no reasoning."""
    t = selection.table
    groups = sorted({(d, bool(h)) for d, h in zip(t.datasets, t.needs_reasoning)})
    x = [f"{d} {'hard' if h else 'easy'}" for d, h in groups]
    fig = go.Figure()
    for j, w in list(enumerate(t.workers)) + [(-1, "none")]:
        y = []
        for d, h in groups:
            m = (np.array(t.datasets) == d) & (t.needs_reasoning == h)
            y.append(float(np.mean(selection.choice[m] == j)))
        fig.add_bar(x=x, y=y, name=w, marker_color=WORKER_COLOURS.get(w))
    fig.update_layout(title=f"Selection outcome ({selection.variant}, tau={selection.tau:.2f})", barmode="stack",
                      yaxis_title="share of pairs", template="plotly_white")
    return fig


# ---------------------------------------------------------------------------------------------
# stage 1 (notebook 04)

MODE_ORDER = ("stage0_direct", "baseline_direct", "baseline_always", "direct", "always", "adaptive_stage1", "adaptive",
              "oracle")


def worker_gains(gains: list[dict], chosen: list[dict]) -> go.Figure:
    """Per worker: the removal gain of its candidates on easy and hard training pairs (left), and the share
    of pairs whose selected rationale it wrote, or none (right). ``gains`` and ``chosen`` are the rows of a
    run's ``selection/gains.jsonl`` and ``selection/stage1_set.jsonl``."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.16,
                        subplot_titles=("removal gain of each candidate", "selected rationales by worker"))
    workers = list(dict.fromkeys(r["worker"] for r in gains))
    for hard, colour in ((False, EASY), (True, HARD)):
        rows = [r for r in gains if r["needs_reasoning"] == hard and r["status"] == "ok"]
        fig.add_box(x=[r["worker"] for r in rows], y=[r["gain_removal"] for r in rows], name="hard" if hard else "easy",
                    marker_color=colour, boxpoints=False, row=1, col=1)
    n = max(1, len(chosen))
    names = workers + ["none"]
    share = [sum((c["worker"] or "none") == w for c in chosen) / n for w in names]
    fig.add_bar(x=names, y=share, marker_color=[WORKER_COLOURS.get(w, "#888888") for w in names], showlegend=False,
                row=1, col=2)
    fig.update_layout(boxmode="group", title="Selection: what each worker's rationales gain, who is kept",
                      template="plotly_white")
    fig.update_yaxes(title_text="log p(t+) with r - without", row=1, col=1)
    fig.update_yaxes(title_text="share of pairs", range=[0, 1], row=1, col=2)
    return fig


def modes_easy_hard(evals: dict[str, ModeScores]) -> go.Figure:
    """Overall / easy / hard score of every inference mode (``Summary.eval``)."""
    modes = [m for m in MODE_ORDER if m in evals]
    fig = go.Figure()
    for key, colour in (("overall", "#888888"), ("easy", EASY), ("hard", HARD)):
        fig.add_bar(x=modes, y=[getattr(evals[m], key) for m in modes], name=key, marker_color=colour)
    fig.update_layout(title="Inference modes: easy vs hard items", barmode="group", yaxis_title="score (%)",
                      yaxis_range=[0, 105], template="plotly_white")
    return fig


def stage1_curves(metrics_by_arm: dict[str, list[dict]]) -> go.Figure:
    """Each loss term of stage 1 per arm against the step."""
    fig = go.Figure()
    dashes = ["solid", "dot", "dash"]
    for a, (arm, metrics) in enumerate(metrics_by_arm.items()):
        for key, colour in (("nce_reasoned", HARD), ("gen", "#54A24B"), ("nce_direct", EASY)):
            pts = [(m["step"], m[key]) for m in metrics if key in m]
            if pts:
                fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines", name=f"{arm}: {key}",
                                line={"color": colour, "dash": dashes[a % 3]})
    fig.update_layout(title="Stage 1 training curves per loss term", xaxis_title="step", yaxis_title="loss",
                      template="plotly_white")
    return fig


PAPER_INVOCATION = 0.74
"""The invocation rate at which the paper reports its best accuracy/latency trade-off (a reference line)."""


def gate_invocation(adaptive: ModeScores, gate: GateSummary) -> go.Figure:
    """Where the gate opens on the evaluation queries: per dataset (easy vs hard items) and per meta-task."""
    from plotly.subplots import make_subplots

    per = gate.invocation_per_dataset
    names = list(per)
    metas = adaptive.invocation_rate_per_meta_task or {}
    fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35], subplot_titles=("per dataset", "per meta-task"))
    for key, label, colour in (("easy", "easy items", EASY), ("hard", "hard items", HARD)):
        fig.add_bar(x=names, y=[per[n][key] for n in names], name=label, marker_color=colour, row=1, col=1)
    fig.add_bar(x=list(metas), y=list(metas.values()), name="all items", marker_color="#888888", row=1, col=2)
    fig.add_hline(y=adaptive.invocation_rate, line_dash="dot", line_color="#888888", row=1, col=1,
                  annotation_text=f"overall {adaptive.invocation_rate:.2f} (threshold {gate.threshold})")
    fig.update_yaxes(title_text="invocation rate", range=[0, 1.05])
    fig.update_layout(title="Where the gate invokes reasoning (evaluation queries)", barmode="group",
                      legend_orientation="h", template="plotly_white")
    return fig


def reasoning_headroom(stage0: ModeScores, selection: SelectionSummary, gate: GateSummary | None = None) -> go.Figure:
    """Where reasoning can help this model, per dataset, on hard items.

    Left: the stage-0 model's score on hard items directly and with the world's gold rationale in the span,
    against its score on easy items (what a fully resolved chain should bring a hard item back to). Right:
    the share of hard training pairs that selection gave a rationale, the share it could not (the evaluator
    already gives the positive p >= exp(-tau) directly), and the share of hard evaluation queries on which
    the gate opens. Where the gold rationale does not lift the evaluator, selection keeps none and a gate
    that follows the reward stays shut: the limit is the model's reading, not the rule."""
    from plotly.subplots import make_subplots

    gold = selection.gold_rationale_hard_per_dataset
    names = list(gold["direct"])
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45],
                        subplot_titles=("stage-0 score on hard items", "share of hard items given reasoning"))
    fig.add_bar(x=names, y=[gold["direct"][n] for n in names], name="direct", marker_color=HARD, row=1, col=1)
    fig.add_bar(x=names, y=[gold["gold"][n] for n in names], name="with the gold rationale",
                marker_color="#54A24B", row=1, col=1)
    fig.add_scatter(x=names, y=[stage0.per_dataset_easy.get(n) for n in names], mode="markers",
                    marker={"symbol": "line-ew-open", "size": 26, "color": EASY, "line": {"width": 3}},
                    name="direct, easy items", row=1, col=1)
    kept = selection.no_reasoning_rate_hard_per_dataset
    fig.add_bar(x=names, y=[1 - kept[n] if n in kept else None for n in names], name="selection kept a rationale",
                marker_color="#B279A2", row=1, col=2)
    solved = selection.solved_directly_rate_hard_per_dataset
    if solved:
        fig.add_bar(x=names, y=[solved.get(n) for n in names], name="solved directly (no rationale can gain tau)",
                    marker_color=EASY, opacity=0.6, row=1, col=2)
    if gate:
        per = gate.invocation_per_dataset
        fig.add_bar(x=names, y=[per[n]["hard"] if n in per else None for n in names], name="gate opens (eval)",
                    marker_color="#888888", row=1, col=2)
    fig.update_yaxes(title_text="score (%)", range=[0, 105], row=1, col=1)
    fig.update_yaxes(title_text="share of hard items", range=[0, 1.05], row=1, col=2)
    fig.update_layout(title="Where reasoning can help this model (hard items)", barmode="group",
                      legend_orientation="h", template="plotly_white")
    return fig


def gate_curve(curve: list[dict], chosen: float | None = None, val_curve: list[dict] | None = None,
               modes: dict[str, ModeScores] | None = None) -> go.Figure:
    """Threshold sweep: accuracy against invocation rate and against latency, paper optimum marked; with
    ``val_curve``, the validation split's overall score beside the evaluation's, and ``chosen`` (the threshold
    picked on validation) ringed on the evaluation curve. ``modes`` (``Summary.eval``) adds the fixed
    modes, the trained baselines, the stage-1 gate and the oracle as points (their latency is timed at batch
    size 1 in one interleaved loop, the sweep's on a per-dataset sample: the same machine, another sample)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy vs invocation rate", "accuracy vs latency"))
    pts = sorted(curve, key=lambda p: p["invocation_rate"])
    text = [f"t={p['threshold']}" for p in pts]
    for key, colour in (("overall", "#888888"), ("easy", EASY), ("hard", HARD)):
        fig.add_scatter(x=[p["invocation_rate"] for p in pts], y=[p[key] for p in pts], mode="lines+markers",
                        name=key, text=text, line={"color": colour}, row=1, col=1)
        fig.add_scatter(x=[p["latency_ms_per_query"] for p in pts], y=[p[key] for p in pts], mode="lines+markers",
                        name=key, text=text, line={"color": colour}, showlegend=False, row=1, col=2)
    if val_curve:
        vp = sorted(val_curve, key=lambda p: p["invocation_rate"])
        fig.add_scatter(x=[p["invocation_rate"] for p in vp], y=[p["overall"] for p in vp], mode="lines+markers",
                        name="overall (validation)", text=[f"t={p['threshold']}" for p in vp],
                        line={"color": "#888888", "dash": "dot"}, row=1, col=1)
    at = [p for p in pts if chosen is not None and abs(p["threshold"] - chosen) < 1e-12]
    if at:
        for col, key in ((1, "invocation_rate"), (2, "latency_ms_per_query")):
            fig.add_scatter(x=[at[0][key]], y=[at[0]["overall"]], mode="markers", name=f"chosen on validation "
                            f"(t={chosen})", showlegend=col == 1, row=1, col=col,
                            marker={"symbol": "circle-open", "size": 16, "color": "black", "line": {"width": 2}})
    for name, symbol in (("direct", "square"), ("always", "diamond"), ("baseline_direct", "square-open"),
                         ("baseline_always", "diamond-open"), ("adaptive_stage1", "triangle-up"), ("oracle", "star")):
        m = (modes or {}).get(name)
        if not m:
            continue
        inv = {"direct": 0.0, "baseline_direct": 0.0, "always": 1.0, "baseline_always": 1.0}.get(
            name, m.invocation_rate if m.invocation_rate is not None else m.get("reasoned_share"))
        style = {"mode": "markers", "legendgroup": name, "marker": {"symbol": symbol, "size": 11, "color": "black"}}
        if inv is not None:
            fig.add_scatter(x=[inv], y=[m.overall], name=name, row=1, col=1, **style)
        fig.add_scatter(x=[m.latency_ms_per_query], y=[m.overall], name=name, row=1, col=2,
                        showlegend=inv is None, **style)
    fig.add_vline(x=PAPER_INVOCATION, line_dash="dash", line_color="black", row=1, col=1,
                  annotation_text="paper's best rate (~74%, its model)", annotation_position="bottom left",
                  annotation_font_size=11)
    fig.update_xaxes(title_text="invocation rate", range=[-0.02, 1.02], row=1, col=1)
    fig.update_xaxes(title_text="latency per query (ms, batch 1)", row=1, col=2)
    fig.update_yaxes(title_text="score (%)", row=1, col=1)
    fig.update_layout(title="Adaptive gate: threshold sweep", template="plotly_white",
                      legend={"font": {"size": 11}, "tracegroupgap": 0})
    return fig


def rl_curves(history: list[dict], invocation: list[dict]) -> go.Figure:
    """Stage 2: mean reward per step, invocation rate of the sampled completions, and the gate's
    invocation rate on held-out probe queries (easy / hard) every few steps."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("reward", "invocation rate"))
    steps = [h["step"] for h in history]
    fig.add_scatter(x=steps, y=[h.get("reward") for h in history], name="reward (mean)", row=1, col=1)
    for key in [k for k in (history[0] if history else {}) if k.startswith("rewards/") and k.endswith("/mean")]:
        fig.add_scatter(x=steps, y=[h.get(key) for h in history], name=key.split("/")[1], row=1, col=1,
                        line={"dash": "dot"})
    fig.add_scatter(x=steps, y=[h.get("sampled_invocation_rate") for h in history], name="sampled completions",
                    line={"color": "#888888"}, row=1, col=2)
    for key, colour in (("invocation_rate_easy", EASY), ("invocation_rate_hard", HARD)):
        fig.add_scatter(x=[r["step"] for r in invocation], y=[r.get(key) for r in invocation], mode="lines+markers",
                        name=f"probe, {key.split('_')[-1]}", line={"color": colour}, row=1, col=2)
    fig.update_xaxes(title_text="GRPO step")
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=2)
    fig.update_layout(title="Stage 2 (GRPO): reward and invocation", template="plotly_white")
    return fig


def step_choice(per_step: list[dict], chosen: int | None = None) -> go.Figure:
    """Stage 2's early stopping on validation: for every kept GRPO step (step 0 is the stage-1 gate), the
    validation overall score at that step's own best threshold and the invocation rate there, ``chosen``
    (the step the run kept) ringed (``gate.choose_step_and_threshold``)."""
    from plotly.subplots import make_subplots

    rows = sorted(per_step, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("validation overall (its best threshold)",
                                                        "validation invocation rate"))
    for col, key in ((1, "overall"), (2, "invocation_rate")):
        fig.add_scatter(x=steps, y=[r[key] for r in rows], mode="lines+markers", name=key, showlegend=False,
                        text=[f"t={r['threshold']}" for r in rows], line={"color": "#888888"}, row=1, col=col)
        at = [r for r in rows if r["step"] == chosen]
        if at:
            fig.add_scatter(x=[chosen], y=[at[0][key]], mode="markers", name=f"chosen (step {chosen})",
                            showlegend=col == 1, row=1, col=col,
                            marker={"symbol": "circle-open", "size": 16, "color": "black", "line": {"width": 2}})
    fig.update_xaxes(title_text="GRPO step (0 = stage-1 gate)")
    fig.update_yaxes(title_text="score (%)", row=1, col=1)
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=2)
    fig.update_layout(title="Stage 2: the GRPO step chosen on validation", template="plotly_white")
    return fig
