"""Writing figures: HTML always, PNG and PDF from one browser session when a Chromium exists, each stamped
with its run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import plotly.graph_objects as go

from ..paths import figures_dir

log = logging.getLogger(__name__)


EASY, HARD = "#4C78A8", "#E45756"
"""Colours of easy and hard items in every figure."""


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
