"""A run's summary as typed objects: what the demo writes to ``summary.json`` and what figures and notebooks read.

Each block is a frozen dataclass whose fields are the numbers a reader reaches for (a mode's overall, easy and
hard scores, the gate's threshold and curve, selection's precision); whatever else a block holds stays in its
``extra`` dict under its summary.json name, so ``Summary.load(p).to_json()`` is the file's content, key for key
(tests/test_summary.py). ``summary.json`` stays the serialisation; ``Summary.load`` reads a run folder or a file.

Used by: the demo (``demo.run_demo`` returns one), ``figures.paper_figures``, notebooks 04-07, ``format_summary``.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from .runs import atomic_write_text


@dataclass(frozen=True)
class Block:
    """A summary.json block: typed fields, the rest in ``extra``. An optional field (default None) is written
    when set or when the file it was read from had it, so a block writes back the keys it was read with."""

    extra: dict = field(default_factory=dict, kw_only=True)
    """Everything else the block holds, under its summary.json names."""
    order: tuple[str, ...] = field(default=(), kw_only=True, repr=False, compare=False)
    """The keys' order in the file it was read from, kept when written back."""

    @classmethod
    def from_json(cls, d: dict):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in fields(cls)} - {"extra", "order"}
        missing = [f.name for f in fields(cls) if f.name in names and f.name not in d
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ValueError(f"{cls.__name__}: summary block lacks {missing} (has {sorted(d)})")
        kw = {k: _parse(hints[k], d[k]) for k in names if k in d}
        return cls(**kw, extra={k: v for k, v in d.items() if k not in names}, order=tuple(d))

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            if f.name in ("extra", "order"):
                continue
            v = getattr(self, f.name)
            if v is None and f.default is None and f.name not in self.order:
                continue
            out[f.name] = _plain(v)
        out |= self.extra
        return {k: out[k] for k in self.order if k in out} | {k: v for k, v in out.items() if k not in self.order}

    def __getitem__(self, key: str):
        """``block["name"]``: a field or an ``extra`` entry, by its summary.json name."""
        if key in self.extra:
            return self.extra[key]
        if key in {f.name for f in fields(self)} - {"extra", "order"}:
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default


def _parse(hint, value):
    """A summary.json value as the field's type: nested blocks and dicts of blocks are built, the rest kept."""
    if value is None:
        return None
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for arg in (typing.get_args(hint) if union else (hint,)):
        if isinstance(arg, type) and issubclass(arg, Block):
            return arg.from_json(value)
        if typing.get_origin(arg) is dict:
            inner = typing.get_args(arg)[1]
            if isinstance(inner, type) and issubclass(inner, Block):
                return {k: inner.from_json(v) for k, v in value.items()}
    return value


def _plain(v):
    if isinstance(v, Block):
        return v.to_json()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class ModeScores(Block):
    """One mode's evaluation (``eval.<mode>``): scores in percent, latency in ms per query."""

    overall: float
    easy: float | None
    hard: float | None
    per_dataset: dict[str, float]
    per_dataset_easy: dict[str, float | None]
    per_dataset_hard: dict[str, float | None]
    latency_ms_per_query: float | None
    invocation_rate: float | None = None
    """Share of queries that reasoned (adaptive modes)."""
    invocation_rate_per_meta_task: dict[str, float] | None = None
    threshold: float | None = None
    """The gate's threshold (adaptive modes), chosen on validation."""


@dataclass(frozen=True)
class FoundationSummary(Block):
    path: str
    fingerprint: dict | str | None
    description_accuracy: dict[str, float]
    skill_accuracy: dict[str, float]


@dataclass(frozen=True)
class SelectionSummary(Block):
    tau: float
    precision: float | None
    """Share of selected rationales that state the gold facts."""
    recall_on_opportunity: float | None
    selected_share_by_worker: dict[str, float]
    worker_step_accuracy: dict[str, float]
    no_reasoning_rate_hard_per_dataset: dict[str, float]
    gold_rationale_hard_per_dataset: dict[str, dict[str, float]]
    """Stage-0 scores on hard eval items, {"direct": per dataset, "gold": per dataset with the gold rationale}."""
    solved_directly_rate_hard_per_dataset: dict[str, float] | None = None


@dataclass(frozen=True)
class Stage1Summary(Block):
    steps: int
    train_wall_s: float
    rationale_sensitivity: float
    """How much the embedding moves when the rationale is swapped for another item's (``method.diagnostics``)."""
    rationale_step_accuracy: list[float]


@dataclass(frozen=True)
class GateSummary(Block):
    threshold: float
    curve: list[dict]
    """The threshold sweep on eval: one point per threshold (overall, easy, hard, invocation, latency)."""
    threshold_choice: dict
    """Per gate ("stage2", "stage1"): the threshold chosen on validation and the validation curve."""
    latency: dict
    invocation_per_dataset: dict[str, dict]
    """Per dataset: the gate's opening rate on easy and on hard items ({"easy": r, "hard": r})."""
    oracle_gain_captured: float | None = None


@dataclass(frozen=True)
class Stage2Summary(Block):
    rl: dict
    """The RL config that ran, and the number of queries."""
    reward_during_rl: list[dict]
    invocation_during_rl: list[dict]


@dataclass(frozen=True, kw_only=True)
class Summary(Block):
    """Everything a demo run measured (``<run>/summary.json``), in the file's order."""

    preset: str
    seed: int
    world: dict
    foundation: FoundationSummary
    eval: dict[str, ModeScores]
    """Per mode: stage0_direct, direct, always, oracle, baseline_direct, baseline_always, adaptive_stage1, adaptive."""
    selection: SelectionSummary | None = None
    stage1: Stage1Summary | None = None
    gate: GateSummary | None = None
    stage2: Stage2Summary | None = None
    backbone: dict
    wall_s: float

    @classmethod
    def load(cls, path: str | Path) -> Summary:
        """From ``summary.json`` or the run folder holding it."""
        p = Path(path)
        p = p / "summary.json" if p.is_dir() else p
        try:
            return cls.from_json(json.loads(p.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{p}: not a demo summary ({e})") from e

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=1))
