"""Figures are values: each function takes results and returns a ``plotly.graph_objects.Figure``.

Nothing here shows or writes a figure except :func:`save_figures` (and :func:`save_figure` for one), which
writes ``<dir>/<name>.html`` and, in one browser session for all figures, a PNG when a Chromium for kaleido
exists, each stamped with the run it came from. A missing PNG is a logged warning, never an error. How the
notebooks display figures offline: ``mmemb_lab.notebook``.
Paper figures are regenerated from run outputs (summary.json, metrics.jsonl), never from typed numbers.

Used by: the demo, every notebook.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from .paths import figures_dir

log = logging.getLogger(__name__)
EASY, HARD = "#4C78A8", "#E45756"


def easy_hard_by_dataset(eval_summary: dict, title: str = "Direct embedding: easy vs hard items") -> go.Figure:
    """Grouped bars per dataset: score on easy items vs hard items (where a direct embedder fails)."""
    names = list(eval_summary["per_dataset"])
    fig = go.Figure()
    for key, label, colour in (("per_dataset_easy", "easy", EASY),
                               ("per_dataset_hard", "hard (multi-hop)", HARD)):
        fig.add_bar(x=names, y=[eval_summary[key].get(n) for n in names], name=label, marker_color=colour)
    fig.add_hline(y=eval_summary["easy"], line_dash="dot", line_color=EASY,
                  annotation_text=f"easy mean {eval_summary['easy']:.1f}")
    fig.add_hline(y=eval_summary["hard"], line_dash="dot", line_color=HARD,
                  annotation_text=f"hard mean {eval_summary['hard']:.1f}", annotation_position="bottom right")
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


def _stamped(fig: go.Figure, run: str | None) -> go.Figure:
    """``fig`` with a small "run: ..." note under the plot (a copy; the caller's figure is left alone)."""
    if not run:
        return fig
    fig = go.Figure(fig)
    fig.add_annotation(text=f"run: {run}", xref="paper", yref="paper", x=1, y=-0.18, showarrow=False,
                       font_size=9, font_color="grey", xanchor="right")
    return fig


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
"""Executables kaleido can drive, looked up on PATH in this order (``BROWSER_PATH`` overrides)."""


def find_browser() -> str | None:
    """The Chromium/Chrome kaleido will use for static images, or None (then figures are HTML only)."""
    import os

    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"] if Path(os.environ["BROWSER_PATH"]).is_file() else None
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def save_figures(figs: dict[str, go.Figure], directory: str | Path | None = None, run: str | None = None,
                 timeout_s: float = 180.0, png: bool = True, png_scale: float = 1.0,
                 pdf: bool = False) -> dict[str, Path]:
    """Write ``<directory>/<name>.html`` for every figure, then every ``<name>.png`` (and with ``pdf``, every
    ``<name>.pdf``) in ONE browser session.

    Each figure is stamped with ``run``. The HTML files are the record and are always written (one
    ``plotly.min.js`` per folder, so they open offline). The PNGs are optional: kaleido starts one
    Chromium for all of them, with plotly.js from the installed plotly and MathJax off (its default is a
    CDN, which offline stalls every image), and the whole export is bounded by ``timeout_s``. No browser,
    a timeout or an error is a logged WARNING that names what is missing, never an exception; a PNG left
    from an earlier run is removed first, so a PNG on disk always matches its HTML.

    Returns the HTML path per name. ``directory`` defaults to ``paths.figures_dir()``. ``png=False`` writes
    the HTML files only; ``png_scale`` multiplies the PNGs' pixel size (3 for print). The PDFs are vector
    files for a paper (they need the PNG export's browser; ``png=False`` writes neither).
    """
    out = Path(directory) if directory is not None else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    stamped = {name: _stamped(fig, run) for name, fig in figs.items()}
    paths = {}
    for name, fig in stamped.items():
        path = out / f"{name}.html"
        tmp = path.with_name(path.name + ".tmp")
        fig.write_html(tmp, include_plotlyjs="directory")  # one plotly.min.js per folder, works offline
        tmp.replace(path)
        paths[name] = path
        for ext in ("png", "pdf"):
            (out / f"{name}.{ext}").unlink(missing_ok=True)
    if stamped and png:
        _write_static(stamped, out, timeout_s, png_scale, ("png", "pdf") if pdf else ("png",))
    return paths


def _write_static(figs: dict[str, go.Figure], out: Path, timeout_s: float, scale: float = 1.0,
                  formats: tuple[str, ...] = ("png",)) -> None:
    """Every figure as ``out/<name>.<format>`` from one kaleido session, or a WARNING saying why not."""
    import asyncio
    import tempfile
    import threading
    import time

    browser = find_browser()
    if browser is None:
        log.warning("no PNGs in %s: no Chromium/Chrome found for kaleido (tried %s; set BROWSER_PATH or install "
                    "chromium); the HTML files are written", out, ", ".join(BROWSERS))
        return
    try:
        import kaleido
    except ImportError:
        log.warning("no PNGs in %s: kaleido is not installed; the HTML files are written", out)
        return
    t0 = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=".png-", dir=out))  # kaleido claims a file before drawing it
    specs = [{"fig": fig, "path": staging / f"{name}.{fmt}",
              "opts": {"format": fmt, **({"scale": scale} if fmt == "png" else {})}}
             for fmt in formats for name, fig in figs.items()]

    async def export():
        async with kaleido.Kaleido(path=browser, n=1, timeout=timeout_s, mathjax=False) as k:
            left = max(1.0, timeout_s - (time.perf_counter() - t0))  # cancelled inside, the browser still closes
            return await asyncio.wait_for(k.write_fig_from_object(specs, cancel_on_error=False), left)

    result: list = []

    def work():
        try:
            result.append(asyncio.run(export()))
        except BaseException as e:  # noqa: BLE001 - reported below, never raised
            result.append(e)

    # a thread of our own, so a caller's running event loop (a notebook) is no obstacle, and a browser that
    # hangs while starting or closing (out of asyncio's reach) costs at most the grace period, not the run
    worker = threading.Thread(target=work, name="kaleido-export", daemon=True)
    worker.start()
    worker.join(timeout_s + 15)
    try:
        outcome = None if worker.is_alive() else result[0]
        if outcome is None or isinstance(outcome, (TimeoutError, asyncio.TimeoutError)):
            log.warning("PNG export in %s timed out after %.0f s (browser %s)", out, timeout_s, browser)
        elif isinstance(outcome, BaseException):
            log.warning("PNG export in %s failed (browser %s): %s: %s", out, browser, type(outcome).__name__, outcome)
        else:
            for e in outcome:
                log.warning("a PNG in %s failed: %s: %s", out, type(e).__name__, e)
        missing = []
        for spec in specs:
            src = spec["path"]
            if src.is_file() and src.stat().st_size > 0:
                src.replace(out / src.name)
            else:
                missing.append(src.name)
        if missing:
            log.warning("no %s in %s (the HTML files are written)", ", ".join(missing), out)
        log.info("%d of %d %s file(s) written to %s in %.1f s (one browser session)", len(specs) - len(missing),
                 len(specs), "/".join(f.upper() for f in formats), out, time.perf_counter() - t0)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_figure(fig: go.Figure, name: str, run: str | None = None, directory: str | Path | None = None,
                timeout_s: float = 90.0) -> Path:
    """Write ``<dir>/<name>.html`` (+ ``.png`` when kaleido finds a browser), stamped with ``run``.

    One figure; for several, :func:`save_figures` starts the browser once for all of them."""
    return save_figures({name: fig}, directory, run=run, timeout_s=timeout_s)[name]


def _visual_array(visual):
    """A world visual as one RGB array (video frames side by side, 4-px gaps)."""
    import numpy as np

    from .data import to_pil

    ims = to_pil(visual)
    ims = ims if isinstance(ims, list) else [ims]
    h = max(im.height for im in ims)
    parts = []
    for im in ims:
        a = np.asarray(im.convert("RGB"))
        parts += [np.pad(a, ((0, h - a.shape[0]), (0, 0), (0, 0)), constant_values=255),
                  np.full((h, 4, 3), 255, dtype=np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


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
    fig.add_trace(go.Image(z=_visual_array(visual)), row=1, col=1)
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


def modes_easy_hard(evals: dict) -> go.Figure:
    """Overall / easy / hard score of every inference mode (from summary.json's ``eval``)."""
    modes = [m for m in MODE_ORDER if m in evals]
    fig = go.Figure()
    for key, colour in (("overall", "#888888"), ("easy", EASY), ("hard", HARD)):
        fig.add_bar(x=modes, y=[evals[m][key] for m in modes], name=key, marker_color=colour)
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


def gate_invocation(adaptive: dict, gate: dict) -> go.Figure:
    """Where the gate opens on the evaluation queries: per dataset (easy vs hard items) and per meta-task."""
    from plotly.subplots import make_subplots

    per = gate["invocation_per_dataset"]
    names = list(per)
    metas = adaptive.get("invocation_rate_per_meta_task", {})
    fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35], subplot_titles=("per dataset", "per meta-task"))
    for key, label, colour in (("easy", "easy items", EASY), ("hard", "hard items", HARD)):
        fig.add_bar(x=names, y=[per[n][key] for n in names], name=label, marker_color=colour, row=1, col=1)
    fig.add_bar(x=list(metas), y=list(metas.values()), name="all items", marker_color="#888888", row=1, col=2)
    fig.add_hline(y=adaptive["invocation_rate"], line_dash="dot", line_color="#888888", row=1, col=1,
                  annotation_text=f"overall {adaptive['invocation_rate']:.2f} (threshold {gate['threshold']})")
    fig.update_yaxes(title_text="invocation rate", range=[0, 1.05])
    fig.update_layout(title="Where the gate invokes reasoning (evaluation queries)", barmode="group",
                      legend_orientation="h", template="plotly_white")
    return fig


def reasoning_headroom(stage0: dict, selection: dict, gate: dict | None = None) -> go.Figure:
    """Where reasoning can help this model, per dataset, on hard items.

    Left: the stage-0 model's score on hard items directly and with the world's gold rationale in the span,
    against its score on easy items (what a fully resolved chain should bring a hard item back to). Right:
    the share of hard training pairs that selection gave a rationale, the share it could not (the evaluator
    already gives the positive p >= exp(-tau) directly), and the share of hard evaluation queries on which
    the gate opens. Where the gold rationale does not lift the evaluator, selection keeps none and a gate
    that follows the reward stays shut: the limit is the model's reading, not the rule."""
    from plotly.subplots import make_subplots

    gold = selection["gold_rationale_hard_per_dataset"]
    names = list(gold["direct"])
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45],
                        subplot_titles=("stage-0 score on hard items", "share of hard items given reasoning"))
    fig.add_bar(x=names, y=[gold["direct"][n] for n in names], name="direct", marker_color=HARD, row=1, col=1)
    fig.add_bar(x=names, y=[gold["gold"][n] for n in names], name="with the gold rationale",
                marker_color="#54A24B", row=1, col=1)
    fig.add_scatter(x=names, y=[stage0["per_dataset_easy"].get(n) for n in names], mode="markers",
                    marker={"symbol": "line-ew-open", "size": 26, "color": EASY, "line": {"width": 3}},
                    name="direct, easy items", row=1, col=1)
    kept = selection["no_reasoning_rate_hard_per_dataset"]
    fig.add_bar(x=names, y=[1 - kept[n] if n in kept else None for n in names], name="selection kept a rationale",
                marker_color="#B279A2", row=1, col=2)
    solved = selection.get("solved_directly_rate_hard_per_dataset")
    if solved:
        fig.add_bar(x=names, y=[solved.get(n) for n in names], name="solved directly (no rationale can gain tau)",
                    marker_color=EASY, opacity=0.6, row=1, col=2)
    if gate:
        per = gate["invocation_per_dataset"]
        fig.add_bar(x=names, y=[per[n]["hard"] if n in per else None for n in names], name="gate opens (eval)",
                    marker_color="#888888", row=1, col=2)
    fig.update_yaxes(title_text="score (%)", range=[0, 105], row=1, col=1)
    fig.update_yaxes(title_text="share of hard items", range=[0, 1.05], row=1, col=2)
    fig.update_layout(title="Where reasoning can help this model (hard items)", barmode="group",
                      legend_orientation="h", template="plotly_white")
    return fig


def gate_curve(curve: list[dict], chosen: float | None = None, val_curve: list[dict] | None = None,
               modes: dict | None = None) -> go.Figure:
    """Threshold sweep: accuracy against invocation rate and against latency, paper optimum marked; with
    ``val_curve``, the validation split's overall score beside the evaluation's, and ``chosen`` (the threshold
    picked on validation) ringed on the evaluation curve. ``modes`` (summary.json's ``eval``) adds the fixed
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
            name, m.get("invocation_rate", m.get("reasoned_share", m.get("reasoning_share"))))
        style = {"mode": "markers", "legendgroup": name, "marker": {"symbol": symbol, "size": 11, "color": "black"}}
        if inv is not None:
            fig.add_scatter(x=[inv], y=[m["overall"]], name=name, row=1, col=1, **style)
        fig.add_scatter(x=[m["latency_ms_per_query"]], y=[m["overall"]], name=name, row=1, col=2,
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


# ---------------------------------------------------------------------------------------------
# paper figures: the method's figures rebuilt from one run folder, styled for print


def print_style(fig: go.Figure) -> go.Figure:
    """A copy of ``fig`` for a paper: white template, larger type, a fixed 7 x 4.4 inch box (at 100 dpi)."""
    out = go.Figure(fig)
    two_panels = "xaxis2" in out.layout and out.layout.xaxis2.domain is not None
    out.update_layout(template="simple_white", font={"family": "Arial, Helvetica, sans-serif", "size": 15},
                      width=1000 if two_panels else 700, height=500 if two_panels else 440, margin={"l": 70, "r": 20, "t": 60, "b": 90}, colorway=OKABE_ITO)
    return out


OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
"""Colour-blind-safe palette (Okabe and Ito) for traces that set no colour of their own in print."""


def attribution_examples(run: Path, summary: dict, n_steps: int = 32) -> dict[str, go.Figure]:
    """Which words of a gold rationale and which patches of the query image the match rests on, for the first
    hard ``toy_qa`` evaluation item of the run's world, on the run's stage-1 model (``mmemb_lab.attribution``);
    empty when the run has no stage-1 model."""
    from .attribution import explain_item, patch_figure, token_figure
    from .backbone import load_backbone
    from .world.tasks import make_item

    model = run / "stage1" / "selected" / "model"
    if not (model / "mmemb_backbone.json").is_file():
        return {}
    cfg = summary["world"]["config"]
    item = next(it for it in (make_item("toy_qa", cfg["seed"], "eval", i, cfg["hard_fraction"]) for i in range(10_000))
                if it.needs_reasoning)
    tokens, patches = explain_item(load_backbone(model), item, n_steps=n_steps)
    out = {"attribution_tokens": token_figure(tokens, title=f"Attribution of s(e(q + r), e(t+)) to the rationale's "
                                                           f"words ({item.item_id}, stage-1 model)")}
    if patches is not None:
        out["attribution_patches"] = patch_figure(patches, title=f"... and to the query image's patches ({item.item_id})")
    return out


def paper_figures(run: str | Path, attribution: bool = True) -> dict[str, go.Figure]:
    """Every method figure a demo run supports, rebuilt from ``<run>/summary.json``, the selection's and
    stage 1's files (never from typed numbers), in print style; with ``attribution``, the attribution
    examples computed on the run's stage-1 model (:func:`attribution_examples`, seconds on a CPU). Raises
    FileNotFoundError naming the file when ``run`` is not a finished demo run."""
    import json

    from .train import read_metrics

    run = Path(run)
    path = run / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a finished demo run (make demo OUT={run} writes it)")
    s = json.loads(path.read_text())
    ev = s["eval"]
    figs = {"direct_easy_vs_hard": easy_hard_by_dataset(ev["direct"])}
    if len([m for m in MODE_ORDER if m in ev]) > 1:
        figs["modes_easy_hard"] = modes_easy_hard(ev)
    if "selection" in s and "stage0_direct" in ev:
        figs["reasoning_headroom"] = reasoning_headroom(ev["stage0_direct"], s["selection"], s.get("gate"))
    if "gate" in s:
        choice = s["gate"].get("threshold_choice", {}).get("stage2", {})
        figs["gate_curve"] = gate_curve(s["gate"]["curve"], s["gate"]["threshold"], choice.get("curve"), ev)
        if "adaptive" in ev:
            figs["gate_invocation"] = gate_invocation(ev["adaptive"], s["gate"])
    if "stage2" in s:
        figs["rl_curves"] = rl_curves(s["stage2"]["reward_during_rl"], s["stage2"]["invocation_during_rl"])
    sel = run / "selection"
    if (sel / "gains.jsonl").is_file() and (sel / "stage1_set.jsonl").is_file():
        read = lambda f: [json.loads(line) for line in (sel / f).read_text().splitlines() if line]  # noqa: E731
        figs["selection_by_worker"] = worker_gains(read("gains.jsonl"), read("stage1_set.jsonl"))
    arms = {a: read_metrics(run / "stage1" / a / "train") for a in ("selected", "random_worker")
            if (run / "stage1" / a / "train" / "metrics.jsonl").is_file()}
    if arms:
        figs["stage1_curves"] = stage1_curves(arms)
    if attribution:
        figs.update(attribution_examples(run, s))
    return {name: print_style(fig) for name, fig in figs.items()}
