"""Every notebook runs top to bottom under the tiny preset (its own assertions check what it teaches),
and is committed without outputs."""

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_are_numbered_uniquely():
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert numbers[:2] == ["00", "01"] and len(set(numbers)) == len(numbers)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, request):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("MMEMB_WORLDS")
    os.environ["MMEMB_WORLDS"] = str(tmp_path / "worlds")  # generated worlds stay out of the checkout
    os.environ["MMEMB_RUNS"] = str(tmp_path / "runs")
    os.environ["MMEMB_FIGURES"] = str(tmp_path / "figures")  # notebook 07's exports too
    if path.name.startswith("07_"):  # the paper figures of a finished run: the session's smoke run
        os.environ["MMEMB_RUN"] = str(request.getfixturevalue("smoke_run")[0] / "run")
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("MMEMB_WORLDS", None)
        os.environ.pop("MMEMB_RUNS", None)
        os.environ.pop("MMEMB_FIGURES", None)
        os.environ.pop("MMEMB_RUN", None)
