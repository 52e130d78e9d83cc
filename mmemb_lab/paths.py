"""Where things live, resolved in one place (environment variables override each default).

``MMEMB_HOME``     the project root (default: the checkout holding this package, else the working directory)
``MMEMB_DATA``     small committed files, e.g. the stage-0 foundation checkpoint (default ``<home>/data``)
``MMEMB_WORLDS``   generated toy worlds (default ``<home>/worlds``, git-ignored)
``MMEMB_RUNS``     run outputs (default ``<home>/runs``, git-ignored)
``MMEMB_FIGURES``  saved figures (default ``<home>/figures``)
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    if os.environ.get("MMEMB_HOME"):
        return Path(os.environ["MMEMB_HOME"])
    pkg_parent = Path(__file__).resolve().parent.parent
    return pkg_parent if (pkg_parent / "pyproject.toml").exists() else Path.cwd()


def _dir(var: str, default: str) -> Path:
    return Path(os.environ[var]) if os.environ.get(var) else home() / default


def data_dir() -> Path:
    return _dir("MMEMB_DATA", "data")


def worlds_dir() -> Path:
    return _dir("MMEMB_WORLDS", "worlds")


def runs_dir() -> Path:
    return _dir("MMEMB_RUNS", "runs")


def figures_dir() -> Path:
    return _dir("MMEMB_FIGURES", "figures")


def foundation_dir() -> Path:
    return data_dir() / "foundation"
