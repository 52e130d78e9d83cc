"""Stages with contracts, and recipes that chain them.

Concept
    The method is a chain of stages (stage-0 evaluation, selection, stage 1, stage 2), each writing one
    folder of a run. A stage folder carries a manifest (``runs.Manifest``): the stage's own slice of the
    config, the seed, and the digests of what it reads (the foundation's weights file, the manifests of its
    upstream stages). Its ``result.json`` is written last, so it marks the stage done. :func:`run_stage`
    then does one of three things:

    - the folder's manifest equals the one asked for and ``result.json`` exists: the stage is skipped and
      its result read back;
    - the manifest is equal but the stage is unfinished: it resumes (its own checkpoints and caches);
    - the folder was made from other settings or inputs: it is moved aside whole (``<folder>.stale-<time>``,
      never deleted), the differences are logged, and the stage runs afresh.

    Because a stage's manifest holds its upstream's digests, a change to one stage's setting reruns that
    stage and every stage after it, and nothing before it.

    A recipe (``configs/recipes/*.yaml``) names a preset, a seed, an output folder and overrides of any
    config field by its dotted path (``stage2.rl.steps: 40``); ``mmemb-lab run RECIPE`` runs it, and
    ``mmemb-lab stage1 --recipe RECIPE`` runs one stage of it (its upstream must be done).

Used by: ``demo`` (its stages), ``cli`` (``run``, ``select``, ``stage1``, ``stage2``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import plotly.graph_objects as go
import plotly.io as pio
import yaml

from .runs import Manifest, RunError, RunFolder, atomic_write_text, describe

log = logging.getLogger(__name__)

STAGES = ("stage0", "selection", "stage1", "stage2")
"""The demo's stages in order (the toy world and the foundation are inputs, made or reused before them)."""
RESULT = "result.json"


class StageNotDone(RunError):
    """A stage was asked to run alone while a stage it reads from is missing or made from other settings."""


@dataclass(frozen=True)
class StageOutput:
    """What a finished stage hands downstream: its folder, its manifest and its numbers."""

    name: str
    folder: Path
    manifest: Manifest
    result: dict
    ran: bool
    """False when the stage was skipped (its folder already held this very stage, finished)."""

    @property
    def digest(self) -> str:
        """What a downstream stage records as this input."""
        return self.manifest.digest()


def stage_state(folder: str | Path, manifest: Manifest) -> str:
    """``"done"`` (same manifest, result written), ``"partial"`` (same manifest, unfinished), ``"stale"``
    (another manifest) or ``"missing"``."""
    folder = Path(folder)
    old = Manifest.load(folder) if folder.exists() else None
    if old is None:
        return "stale" if folder.exists() and any(folder.iterdir()) else "missing"
    if old.differences(manifest):
        return "stale"
    return "done" if (folder / RESULT).exists() else "partial"


def run_stage(name: str, folder: str | Path, config: Any, seed: int | None, inputs: dict,
              body: Callable[[Path], dict], may_run: bool = True) -> StageOutput:
    """Run stage ``name`` into ``folder`` (or skip or resume it, see the module docstring).

    ``body(folder)`` does the work and returns the stage's result (plain data, written as ``result.json``).
    With ``may_run=False`` a stage that is not done raises :class:`StageNotDone` instead of running."""
    folder = Path(folder)
    manifest = Manifest.make(name, config, seed, inputs)
    state = stage_state(folder, manifest)
    if state == "done":
        log.info("%s: done in %s (same settings and inputs), skipped", name, folder)
        return StageOutput(name, folder, manifest, json.loads((folder / RESULT).read_text()), ran=False)
    if not may_run:
        why = {"missing": "has not run", "partial": "is unfinished",
               "stale": "was made from other settings or inputs"}[state]
        raise StageNotDone(f"stage {name} in {folder} {why}: run it first (mmemb-lab {_command(name)} or "
                           "mmemb-lab run, with the same recipe)")
    if state == "stale":
        old = Manifest.load(folder)
        diff = describe(old.differences(manifest)) if old else "files this tool did not write"
        log.warning("%s: %s was made from other settings or inputs (%s); moving it aside and running anew",
                    name, folder, diff)
    with RunFolder(folder, manifest, overwrite=True):
        result = body(folder)
        atomic_write_text(folder / RESULT, json.dumps(result, indent=1))
    return StageOutput(name, folder, manifest, result, ran=True)


def _command(stage: str) -> str:
    return {"selection": "select", "stage0": "run"}.get(stage, stage)


# figures a stage draws from objects it does not keep (they are saved beside its result) -----------------

def save_stage_figures(folder: str | Path, figs: dict[str, go.Figure]) -> None:
    """Keep figures that only a stage's in-memory objects can draw (plotly JSON under ``folder/figures``)."""
    out = Path(folder) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in figs.items():
        atomic_write_text(out / f"{name}.json", pio.to_json(fig))


def load_stage_figures(folder: str | Path) -> dict[str, go.Figure]:
    return {p.stem: pio.from_json(p.read_text()) for p in sorted((Path(folder) / "figures").glob("*.json"))}


# recipes ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """A preset, a seed, an output folder and overrides of config fields by dotted path."""

    preset: str = "tiny"
    seed: int = 0
    out: str = "runs/demo"
    overrides: dict = dataclasses.field(default_factory=dict)
    foundation: str | None = None
    """Stage-0 checkpoint folder (default: the committed ``data/foundation``)."""
    world: str | None = None
    """Toy world folder (default: ``worlds/<preset>-seed<seed>``)."""

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RunError(f"{path}: not a readable recipe ({e})") from e
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) - known:
            extra = sorted(set(raw) - known) if isinstance(raw, dict) else raw
            raise RunError(f"{path}: unknown recipe keys {extra} (known: {sorted(known)})")
        return cls(**{**raw, "overrides": dict(raw.get("overrides") or {})})

    @classmethod
    def resolve(cls, path: str | Path | None, preset: str | None = None, seed: int | None = None,
                out: str | None = None, sets: list[str] | None = None) -> "Recipe":
        """A recipe file (or the defaults), then the command line's preset, seed, out and ``--set`` on top."""
        r = cls.load(path) if path else cls()
        given = {"preset": preset, "seed": seed, "out": out}
        r = dataclasses.replace(r, **{k: v for k, v in given.items() if v is not None})
        return r.with_overrides(sets or [])

    def with_overrides(self, pairs: list[str]) -> "Recipe":
        """``["stage2.rl.steps=40", ...]`` (values read as YAML) added to the recipe's overrides."""
        extra = {}
        for p in pairs:
            key, sep, value = p.partition("=")
            if not sep:
                raise RunError(f"--set {p!r}: expected FIELD=VALUE, e.g. stage2.rl.steps=40")
            extra[key.strip()] = yaml.safe_load(value)
        return dataclasses.replace(self, overrides={**self.overrides, **extra})


def apply_overrides(cfg, overrides: dict):
    """``cfg`` (nested frozen dataclasses) with each dotted field set; an unknown field or a value of the
    wrong kind raises, naming the field."""
    for key, value in overrides.items():
        cfg = _set(cfg, key.split("."), value, key)
    return cfg


def _set(obj, parts: list[str], value, key: str):
    if not dataclasses.is_dataclass(obj):
        raise RunError(f"override {key}: {type(obj).__name__} has no fields")
    names = {f.name for f in dataclasses.fields(obj)}
    if parts[0] not in names:
        raise RunError(f"override {key}: {type(obj).__name__} has no field {parts[0]!r} (fields: {sorted(names)})")
    current = getattr(obj, parts[0])
    if len(parts) > 1:
        return dataclasses.replace(obj, **{parts[0]: _set(current, parts[1:], value, key)})
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and not isinstance(value, type(current)):
        raise RunError(f"override {key}: expected {type(current).__name__}, got {value!r}")
    return dataclasses.replace(obj, **{parts[0]: value})


__all__ = ["STAGES", "StageOutput", "StageNotDone", "run_stage", "stage_state", "save_stage_figures",
           "load_stage_figures", "Recipe", "apply_overrides"]
