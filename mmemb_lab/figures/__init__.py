"""Figures are values: each function takes results and returns a ``plotly.graph_objects.Figure``.

Nothing here shows or writes a figure except :func:`save_figures` (and :func:`save_figure` for one), which
writes ``<dir>/<name>.html`` and, in one browser session for all figures, a PNG when a Chromium for kaleido
exists, each stamped with the run it came from. A missing PNG is a logged warning, never an error. How the
notebooks display figures offline: ``mmemb_lab.notebook``.
Paper figures are regenerated from run outputs (summary.json, metrics.jsonl), never from typed numbers.

Modules: ``export`` (print style, saving), ``basic`` (scores, accuracy, one item), ``method`` (selection, gate,
RL, stage-1 curves), ``attribution`` (token and patch heat maps), ``paper`` (every figure of a run, for print).

Used by: the demo, every notebook. May import: ``world``, ``model``, ``data``, ``train`` (metrics files), ``eval``,
``paths``, ``summary`` (the typed run summary they draw), ``runs``, ``distributed``.
"""

from .attribution import patch_figure, shortcut_figure, token_figure
from .basic import description_accuracy, easy_hard_by_dataset, item_figure, training_curves
from .export import BROWSERS, EASY, HARD, find_browser, save_figure, save_figures
from .method import (
                     MODE_ORDER,
                     PAPER_INVOCATION,
                     WORKER_COLOURS,
                     gain_by_worker,
                     gain_scatter,
                     gate_curve,
                     gate_invocation,
                     latent_view_figure,
                     modes_easy_hard,
                     reasoning_headroom,
                     rl_curves,
                     selection_outcome,
                     stage1_curves,
                     worker_gains,
)
from .paper import OKABE_ITO, attribution_examples, paper_figures, print_style, run_figures

__all__ = ["description_accuracy", "easy_hard_by_dataset", "item_figure", "training_curves", "BROWSERS", "EASY", "HARD",
           "find_browser", "save_figure", "save_figures", "MODE_ORDER", "PAPER_INVOCATION", "WORKER_COLOURS",
           "gain_by_worker", "gain_scatter", "gate_curve", "gate_invocation", "latent_view_figure", "modes_easy_hard",
           "reasoning_headroom", "rl_curves", "selection_outcome", "stage1_curves", "worker_gains", "OKABE_ITO",
           "attribution_examples", "paper_figures", "print_style", "run_figures", "token_figure", "patch_figure", "shortcut_figure"]
