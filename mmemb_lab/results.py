"""What a demo run reports, printed from its ``summary.json``: one markdown table per run (the baselines trained
for their own mode, the stage-1 model's fixed modes, both gates, the oracle) and the targets the toy world
holds the method to, each with its measured value and whether it is met.

Used by: ``mmemb-lab results RUN [RUN ...]``; the README's results tables are its output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROWS = (("baseline_direct", "baseline_direct (trained without rationales)"),
        ("baseline_always", "baseline_always (trained to reason on every pair)"),
        ("direct", "direct (stage-1 model)"),
        ("always", "always (stage-1 model)"),
        ("adaptive_stage1", "adaptive_stage1 (its own gate, threshold chosen on val)"),
        ("adaptive", "adaptive (after GRPO, step and threshold chosen on val)"),
        ("oracle", "oracle (upper bound)"))


@dataclass(frozen=True)
class Target:
    """One line a run is held to: ``value(summary) <op> bound``."""

    name: str
    value: Callable[[dict], float | None]
    op: str
    """">=" or "<="."""
    bound: float
    fmt: str = ".2f"

    def check(self, s: dict) -> tuple[float | None, bool]:
        v = self.value(s)
        if v is None:
            return None, False
        return v, v >= self.bound if self.op == ">=" else v <= self.bound


def _ev(s: dict, mode: str, key: str = "overall"):
    return s["eval"][mode][key]


def _share(s: dict, worker: str) -> float:
    return s["selection"]["selected_share_by_worker"].get(worker, 0.0)


TARGETS = (
    Target("adaptive - max(baselines)", lambda s: _ev(s, "adaptive") - max(_ev(s, "baseline_direct"),
                                                                            _ev(s, "baseline_always")),
           ">=", 5.0, "+.1f"),
    Target("adaptive / baseline_always latency",
           lambda s: _ev(s, "adaptive", "latency_ms_per_query") / _ev(s, "baseline_always", "latency_ms_per_query"),
           "<=", 0.6, ".3f"),
    Target("oracle gain captured", lambda s: s["gate"].get("oracle_gain_captured"), ">=", 0.6, ".3f"),
    Target("mixed cost ratio", lambda s: s["gate"]["latency"].get("mixed_cost_ratio"), "<=", 1.05),
    Target("selection precision", lambda s: s["selection"]["precision"], ">=", 0.9, ".3f"),
    Target("recall on opportunity", lambda s: s["selection"].get("recall_on_opportunity"), ">=", 0.8),
    Target("format_only share of selections", lambda s: _share(s, "format_only"), "<=", 0.02, ".3f"),
    Target("hallucinating share of selections", lambda s: _share(s, "hallucinating"), "<=", 0.02, ".3f"),
    Target("adaptive - adaptive_stage1", lambda s: _ev(s, "adaptive") - _ev(s, "adaptive_stage1"), ">=", -0.5,
           "+.1f"),
)


def _cell(v, fmt: str = ".1f") -> str:
    return "" if v is None else format(v, fmt)


def run_table(s: dict) -> str:
    """The markdown table of one run's modes."""
    lines = ["| mode | overall | easy | hard | ms/query | invocation | threshold |", "|---|---|---|---|---|---|---|"]
    for mode, label in ROWS:
        e = s["eval"].get(mode)
        if e is None:
            continue
        if "invocation_rate" in e:
            inv = (f"{e['invocation_rate']:.2f} (easy {_cell(e.get('invocation_rate_easy'), '.2f')}, "
                   f"hard {_cell(e.get('invocation_rate_hard'), '.2f')})")
        else:
            inv = "per query" if mode == "oracle" else ("1" if (e.get("generated_tokens_per_query") or 0) > 0 else "0")
        lines.append(f"| {label} | {_cell(e['overall'])} | {_cell(e.get('easy'))} | {_cell(e.get('hard'))} | "
                     f"{_cell(e.get('latency_ms_per_query'))} | {inv} | {e.get('threshold', '')} |")
    return "\n".join(lines)


def target_lines(s: dict) -> list[str]:
    """Each target: its value, the bound, met or NOT met."""
    out = []
    for t in TARGETS:
        v, ok = t.check(s)
        out.append(f"{t.name} = {_cell(v, t.fmt) or 'n/a'} ({t.op} {t.bound:g}): {'met' if ok else 'NOT met'}")
    return out


def report(runs: list[str | Path]) -> str:
    """Every run's table, its chosen GRPO step, its targets and the workers' step accuracy."""
    parts = []
    for run in runs:
        s = json.loads((Path(run) / "summary.json").read_text())
        step = s.get("stage2", {}).get("chosen_step")
        steps = s.get("stage2", {}).get("rl", {}).get("steps")
        head = f"Seed {s['seed']} (`{Path(run).name}`, preset {s['preset']}, summary written after {s['wall_s'] / 60:.1f} min)"
        if step is not None:
            head += f"; GRPO step chosen on val: {step} of {steps}"
        acc = s["selection"].get("worker_step_accuracy", {})
        parts.append("\n".join([head + ":", "", run_table(s), "", "Targets: " + "; ".join(target_lines(s)) + ".",
                                "Worker step accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()) + "."]))
    return "\n\n".join(parts)
