"""The notebooks' shared setup: figures that draw with no internet, and logs that show our own messages.

Every notebook's setup cell calls :func:`setup_notebook` once, so the renderer is chosen in one place.

Why not plotly's ``notebook_connected``: it loads plotly.js from a CDN when the page is viewed, so with
no internet every figure is blank ("Plotly is not defined") while the kernel raises nothing and an
nbclient run of the notebook passes. The default here, ``plotly_mimetype+notebook``, gives each figure
two forms: the plotly mimetype bundle, drawn by the ``jupyterlab-plotly`` extension that ships with
plotly (JupyterLab, VS Code), and HTML with plotly.js embedded once per session (classic notebook,
nbviewer). Neither fetches anything. ``tests/test_browser.py`` proves it in a headless Chromium.

Used by: every notebook (setup cell); the CLI may call :func:`quiet_third_party_logs`.
"""

from __future__ import annotations

import logging

OFFLINE_RENDERER = "plotly_mimetype+notebook"
"""A plotly renderer that needs no network when a figure is viewed (see the module docstring)."""

NOISY_LOGGERS = ("kaleido", "choreographer", "logistro", "httpx", "httpcore", "urllib3", "filelock", "datasets",
                 "huggingface_hub", "asyncio", "PIL")
"""Third-party loggers that chat at INFO (kaleido logs every browser tab it opens, httpx every request)."""


def quiet_third_party_logs(level: int = logging.WARNING, names=NOISY_LOGGERS) -> None:
    """Raise the level of third-party loggers to ``level``; ``mmemb_lab``'s own loggers keep theirs."""
    for name in names:
        logging.getLogger(name).setLevel(level)


def setup_notebook(renderer: str = OFFLINE_RENDERER, quiet: bool = True) -> None:
    """Set plotly's default renderer to one that works offline and (``quiet``) quiet third-party INFO logs."""
    import plotly.io as pio

    pio.renderers.default = renderer
    if quiet:
        quiet_third_party_logs()
