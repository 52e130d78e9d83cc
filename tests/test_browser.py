"""The notebooks' figures and widgets draw in a real browser with no internet.

nbclient (tests/test_notebooks.py) runs the code but renders nothing: a figure that loads plotly.js from a
CDN passes there and is blank for a user offline. Here JupyterLab from this venv serves copies of the
notebooks on 127.0.0.1, a headless Chromium (Debian's, driven by playwright) opens each one with every
request off this host blocked, runs all cells through JupyterLab's own "Run All Cells" command and checks
what a user would see: no error output, every plotly figure drawn as SVG, and in notebook 03 the explorer
widget answering a new pick. A full-page screenshot of each notebook goes to ``<runs>/browser/``.

Skips when Chromium or playwright is missing, unless MMEMB_REQUIRE_BROWSER=1 (CI), which makes that a
failure. ``make browser-test`` runs this file alone. Never ``playwright install``: it downloads a browser.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from mmemb_lab.paths import runs_dir

NOTEBOOK_DIR = Path(__file__).parent.parent / "notebooks"
# every notebook, and how many plotly figures each shows at least under the tiny preset (all of them also run
# under nbclient in tests/test_notebooks.py)
FIGURES = {"00_quickstart.ipynb": 1, "01_toy_world_and_embeddings.ipynb": 4, "02_latent_reasoning.ipynb": 2,
           "03_counterfactual_gains.ipynb": 3, "04_stage1_training.ipynb": 1, "05_adaptive_gate.ipynb": 2,
           "06_evaluation.ipynb": 2, "07_paper_figures.ipynb": 6}
RUN_TIMEOUT_S = 900  # one notebook, as in test_notebooks.py
REQUIRE = os.environ.get("MMEMB_REQUIRE_BROWSER") == "1"


def _missing(why: str):
    if REQUIRE:
        pytest.fail(f"{why} (MMEMB_REQUIRE_BROWSER=1 makes the browser test mandatory)")
    pytest.skip(why)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _missing("no chromium on PATH (Debian: apt-get install chromium)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, smoke_run):
    """A JupyterLab server on 127.0.0.1 serving copies of the notebooks (a run must not write outputs into
    the committed ones), with the kernel environment of test_notebooks.py: worlds and runs in a temp folder."""
    _chromium()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("playwright is not installed (pip install -r requirements-cpu.txt)")
    root = tmp_path_factory.mktemp("lab")
    for name in FIGURES:
        shutil.copy(NOTEBOOK_DIR / name, root / name)
    settings = root / ".settings"
    # every cell attached to the page (a windowed notebook leaves offscreen figures undrawn), and no news
    # or update checks (they reach for the internet)
    for plugin, values in (("notebook-extension/tracker", {"windowingMode": "none"}),
                           ("apputils-extension/notification", {"fetchNews": "false", "checkForUpdates": False})):
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMEMB_WORLDS": str(root / ".worlds"), "MMEMB_RUNS": str(root / ".runs"),
           "MMEMB_FIGURES": str(root / ".figures"), "MMEMB_RUN": str(smoke_run[0] / "run"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"),
           "JUPYTER_CONFIG_DIR": str(root / ".config"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime")}
    port, token = _free_port(), os.urandom(12).hex()
    log_path = root / ".lab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--ServerApp.allow_root=True", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
           "--LabApp.extension_manager=readonly",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"jupyter lab exited ({server.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"jupyter lab did not answer within 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"], headless=True)
        try:
            yield b
        finally:
            b.close()


# --- what the page is asked, through the app JupyterLab exposes as window.jupyterapp -------------------------
# Each script takes the notebook's name and finds its panel by path (not "the current widget", which a
# restored layout or a dialog can change).

_PANEL = ("const panel = Array.from(window.jupyterapp.shell.widgets('main'))"
          ".find(w => w.context && w.context.path === name);")
_OPENED = "(name) => { if (!window.jupyterapp) return false; " + _PANEL + " return !!(panel && panel.sessionContext); }"
_OPEN = "async (name) => { " + _PANEL + """
  window.jupyterapp.shell.activateById(panel.id);
  await panel.context.ready;
  await panel.sessionContext.ready;
  return panel.content.widgets.length;
}"""
_RUN_ALL = "(name) => { " + _PANEL + """
  window.__runAll = undefined;
  window.jupyterapp.commands.execute('notebook:run-all-cells').then(
    ok => { window.__runAll = {ok: ok}; }, err => { window.__runAll = {error: String(err)}; });
}"""
_DONE = "(name) => { " + _PANEL + """
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  if (kernel && ['dead', 'autorestarting', 'restarting'].includes(kernel.status)) return true;  // fails below
  return window.__runAll !== undefined && !!kernel && kernel.status === 'idle';
}"""
_KERNEL = "(name) => { " + _PANEL + """
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return kernel ? kernel.status : 'none';
}"""
_CELLS = "(name) => { " + _PANEL + """
  return panel.content.widgets.map((cell, i) => ({
    index: i, type: cell.model.type,
    count: cell.model.type === 'code' ? cell.model.executionCount : null,
    outputs: cell.model.type === 'code' ? cell.model.outputs.toJSON().map(o => ({
      type: o.output_type, ename: o.ename || null, evalue: o.evalue || null,
      plotly: JSON.stringify(o.data || {}).includes('plotly-graph-div')
              || Object.keys(o.data || {}).includes('application/vnd.plotly.v1+json'),
    })) : [],
    plots: Array.from(cell.node.querySelectorAll('.js-plotly-plot')).map(div => {
      const svg = div.querySelector('.main-svg');
      const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
      return {svg: div.querySelectorAll('.main-svg').length, width: box.width, height: box.height,
              marks: div.querySelectorAll('.main-svg path, .main-svg image, .main-svg rect').length};
    }),
  }));
}"""
_HEIGHT = "(name) => { " + _PANEL + """
  window.jupyterapp.shell.collapseLeft();
  const scrollers = [panel.content.node, ...panel.node.querySelectorAll('.jp-WindowedPanel-outer')];
  let extra = 0;
  for (const s of scrollers) { extra = Math.max(extra, s.scrollHeight - s.clientHeight); s.scrollTop = 0; }
  return extra;
}"""
_SHUTDOWN = "async (name) => { " + _PANEL + " if (panel) await panel.sessionContext.shutdown(); }"


def _run_notebook(browser, lab, name):
    """Open ``name`` in JupyterLab, run all cells, return (page, cells, blocked requests, console errors)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    base, token = lab
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    blocked, console = [], []

    def offline(route):  # the user's machine has no internet: only this server answers
        host = urlparse(route.request.url).hostname
        if host in ("127.0.0.1", "localhost") or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort("namenotresolved")

    context.route("**/*", offline)
    page = context.new_page()
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(str(e)))
    page.goto(f"{base}/lab/tree/{name}?reset&token={token}")  # reset: no layout restored from another notebook
    page.wait_for_function(_OPENED, arg=name, timeout=120_000)
    assert page.evaluate(_OPEN, name) > 0
    page.evaluate(_RUN_ALL, name)
    try:
        page.wait_for_function(_DONE, arg=name, timeout=RUN_TIMEOUT_S * 1000, polling=1000)
    except PlaywrightTimeout:
        cells = page.evaluate(_CELLS, name)
        pending = [c["index"] for c in cells if c["type"] == "code" and c["count"] is None]
        pytest.fail(f"{name}: not done after {RUN_TIMEOUT_S} s (kernel {page.evaluate(_KERNEL, name)}, cells not run: "
                    f"{pending}); screenshot {_screenshot(page, name)}")
    page.wait_for_timeout(1500)  # let the last outputs draw
    cells = page.evaluate(_CELLS, name)
    assert page.evaluate(_KERNEL, name) == "idle", f"{name}: kernel {page.evaluate(_KERNEL, name)}"
    return page, cells, blocked, console


def _screenshot(page, name):
    """The whole notebook in one PNG: JupyterLab scrolls inside the page, so the window grows to fit it."""
    extra = page.evaluate(_HEIGHT, name)
    page.set_viewport_size({"width": 1400, "height": min(1000 + max(extra, 0) + 40, 30_000)})
    page.wait_for_timeout(1500)  # plotly figures follow the resize
    out = runs_dir() / "browser"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{Path(name).stem}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _explorer_state(page):
    html = page.locator(".jp-OutputArea-output .widget-html-content", has_text="query").first
    return html.inner_text()


def _pick_another_pair(page):
    """Notebook 03's explorer: choose another pair; the query and the gains table must change with it."""
    select = page.locator(".jp-OutputArea-output .widget-dropdown select").first
    select.wait_for(timeout=30_000)
    before = _explorer_state(page)
    options = select.locator("option").all_inner_texts()
    assert len(options) > 1, options
    select.select_option(index=len(options) // 2)
    page.wait_for_function("(old) => { const e = Array.from(document.querySelectorAll("
                           "'.jp-OutputArea-output .widget-html-content')).find(n => n.innerText.includes('query'));"
                           " return e && e.innerText !== old; }", arg=before, timeout=30_000)
    after = _explorer_state(page)

    def query_and_gains(text):
        lines = text.splitlines()
        query = next(line for line in lines if line.startswith("query"))
        gains = [line for line in lines if any(w in line for w in ("concise", "verbose", "format_only", "own"))]
        return query, gains

    (q0, g0), (q1, g1) = query_and_gains(before), query_and_gains(after)
    assert q0 != q1, (q0, q1)
    assert g0 and g1 and g0 != g1, (g0, g1)


@pytest.mark.parametrize("name", list(FIGURES))
def test_notebook_draws_offline_in_jupyterlab(browser, lab, name):
    page, cells, blocked, console = _run_notebook(browser, lab, name)
    try:
        _screenshot(page, name)  # first, so that a failing notebook leaves its picture too
        code = [c for c in cells if c["type"] == "code"]
        assert all(c["count"] is not None for c in code), [c["index"] for c in code if c["count"] is None]
        errors = [(c["index"], o["ename"], o["evalue"]) for c in code for o in c["outputs"] if o["type"] == "error"]
        assert not errors, errors
        with_figure = [c for c in code if any(o["plotly"] for o in c["outputs"])]
        assert sum(o["plotly"] for c in code for o in c["outputs"]) >= FIGURES[name], "fewer figures than expected"
        for c in with_figure:  # a figure that loads plotly.js from the internet stays an empty div here
            assert c["plots"], f"cell {c['index']}: a plotly output but no drawn plot (blocked: {blocked[:3]}, " \
                               f"console: {console[:3]})"
            for p in c["plots"]:
                assert p["svg"] >= 1 and p["width"] > 0 and p["height"] > 0 and p["marks"] > 0, (c["index"], p)
        if name.startswith("03_"):
            _pick_another_pair(page)
            _screenshot(page, name)
    finally:
        page.evaluate(_SHUTDOWN, name)
        page.context.close()


def test_every_notebook_is_opened_in_the_browser():
    """A new notebook must join FIGURES: nbclient cannot see what a browser draws (a figure whose script is
    loaded from a CDN stays blank offline, and only a browser shows it)."""
    assert set(FIGURES) == {p.name for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")}
