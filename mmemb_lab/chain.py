"""The method on real data from one recipe: rationales -> select -> stage 1 -> stage 2 -> the benchmark.

Concept
    A real recipe (``configs/recipes/paper.yaml``: ``kind: real``) names the backbone, the training source
    (MMEB-train's layout), the workers, the evaluator, each stage's settings and the benchmark's data.
    ``mmemb-lab run RECIPE`` runs its stages in order into ``<out>/<stage>/``; each stage folder has its
    manifest and reads its upstream from the folder before it (``method.rationales``,
    ``method.real_stages``). A stage whose folder already holds the same run is reused (rationale shards
    skipped, stage 1 resumed at its last step, stage 2's and the selection's results read back, the
    benchmark's caches hit); a changed setting moves that stage's folder aside (never deleted) and reruns
    it and the stages after it, since their manifests hold its digest. ``--set stage2.steps=40`` sets any
    key of the recipe by its dotted path, as for the toy recipes.

Used by: ``commands`` (``run`` with a real recipe).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import distributed
from .eval.harness import HarnessConfig, MMEBSource, run_benchmark
from .eval.modes import InferenceConfig, encoder_for, settings_for
from .eval.registry import benchmark as registry_of
from .eval.report import table_from_result, table_markdown
from .method import real_stages
from .method.rationales import TrainSource, run_rationales, select_rationales, worker_specs
from .method.stage1 import Stage1Config
from .method.stage2 import Stage2Config
from .model.backbone import load_backbone, lora_config
from .pipeline import apply_overrides
from .runs import RunError, atomic_write_text

log = logging.getLogger(__name__)
STAGES = ("rationales", "select", "stage1", "stage2", "benchmark")


@dataclass(frozen=True)
class RealRecipe:
    """A recipe for real data; every dict is a set of overrides of that stage's config (dotted keys allowed)."""

    train: dict
    """The training source: ``TrainSource`` fields (kind ``mmeb-train`` unless given)."""
    benchmark: dict
    """``data`` (an MMEB-V2 folder), optional ``datasets``, ``threshold``, ``max_new_tokens``, ``chunk_size``."""
    backbone: str = "Qwen/Qwen3-VL-4B-Instruct"
    lora: bool = True
    evaluator: str | None = None
    """The selection's evaluator checkpoint (default: ``backbone``)."""
    workers: dict = field(default_factory=dict)
    """``hf`` (``NAME=CHECKPOINT`` list), ``http`` (``NAME=MODEL@URL`` list), and worker settings (prompt,
    max_new_tokens, temperature, batch_size) given to each."""
    shard_size: int = 64
    select: dict = field(default_factory=dict)
    """``variant``, ``tau``, ``pool_negatives``."""
    stage1: dict = field(default_factory=dict)
    """Fields of ``Stage1Config``."""
    stage2: dict = field(default_factory=dict)
    """Fields of ``RLConfig`` (stage 2's GRPO)."""
    seed: int = 0
    out: str = "runs/paper"
    kind: str = "real"

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "RealRecipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        missing = sorted({"train", "benchmark"} - set(raw))
        if unknown or missing:
            raise RunError(f"{where}: unknown keys {unknown} / missing keys {missing} (known: {sorted(known)})")
        return cls(**raw)

    def with_sets(self, pairs: list[str]) -> "RealRecipe":
        """``["stage2.steps=40", "benchmark.data=/x"]``: each key by its dotted path, values read as YAML."""
        raw = dataclasses.asdict(self)
        for p in pairs:
            key, sep, value = p.partition("=")
            if not sep:
                raise RunError(f"--set {p!r}: expected KEY=VALUE, e.g. stage2.steps=40")
            *parents, last = key.strip().split(".")
            node = raw
            for k in parents:
                if not isinstance(node.get(k, {}), dict):
                    raise RunError(f"--set {key}: {k} is not a section")
                node = node.setdefault(k, {})
            node[last] = yaml.safe_load(value)
        return RealRecipe.from_dict(raw, "--set")


def is_real(path: str | Path) -> bool:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return isinstance(raw, dict) and raw.get("kind") == "real"


def load(path: str | Path, seed: int | None = None, out: str | None = None, sets: list[str] | None = None
         ) -> RealRecipe:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RunError(f"{path}: not a readable recipe ({e})") from e
    r = RealRecipe.from_dict(raw, str(path))
    r = dataclasses.replace(r, **{k: v for k, v in {"seed": seed, "out": out}.items() if v is not None})
    return r.with_sets(sets or [])


def dotted(d: dict, prefix: str = "") -> dict:
    """``{"loop": {"steps": 2}}`` -> ``{"loop.steps": 2}`` (what ``pipeline.apply_overrides`` takes)."""
    out = {}
    for k, v in d.items():
        out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _source(r: RealRecipe) -> TrainSource:
    t = {"kind": "mmeb-train", **r.train}
    return TrainSource(**{**t, "datasets": tuple(t.get("datasets") or ())})


def run_chain(r: RealRecipe, progress: bool = True) -> dict:
    """Every stage of ``r`` in order (each reused when done); returns each stage's result and the score table."""
    out, seed = Path(r.out), r.seed
    w = dict(r.workers)
    specs = worker_specs(w.pop("hf", None) or [], w.pop("http", None) or [], **w)
    # every setting is checked before the first model loads
    stage1_cfg = apply_overrides(Stage1Config(), dotted(r.stage1))
    rl_cfg = apply_overrides(Stage2Config().rl, dotted(r.stage2))
    unknown = sorted(set(r.select) - {"variant", "tau", "pool_negatives"})
    if unknown:
        raise RunError(f"select: unknown keys {unknown} (known: variant, tau, pool_negatives)")
    if not Path(r.benchmark.get("data", "")).is_dir():
        raise RunError(f"benchmark.data {r.benchmark.get('data')!r}: no such folder (an MMEB-V2 copy: "
                       "mmemb-lab data download mmeb-v2 --to DIR)")
    results: dict = {}
    reports = run_rationales(_source(r), specs, out / "rationales", seed, r.shard_size, overwrite=True,
                             progress=progress)
    results["rationales"] = {k: dataclasses.asdict(v) for k, v in reports.items()}
    results["select"] = select_rationales(out / "rationales", load_backbone(r.evaluator or r.backbone),
                                          out / "select", seed=seed, overwrite=True, **r.select)
    backbone = load_backbone(r.backbone, lora=lora_config() if r.lora else None)
    results["stage1"] = real_stages.run_stage1(out / "select", backbone, out / "stage1", stage1_cfg, seed,
                                               overwrite=True)
    del backbone
    results["stage2"] = real_stages.run_stage2(out / "stage1", out / "stage2", rl_cfg, seed, overwrite=True)
    results["benchmark"], table = _benchmark(r, out / "stage2" / "model", out / "benchmark", progress)
    if distributed.is_main():
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
        atomic_write_text(out / "table.md", table)
    return {**results, "table": table}


def _benchmark(r: RealRecipe, model: Path, out: Path, progress: bool) -> tuple[dict, str]:
    b = dict(r.benchmark)
    unknown = sorted(set(b) - {"data", "datasets", "threshold", "max_new_tokens", "chunk_size"})
    if unknown or "data" not in b:
        raise RunError(f"benchmark: needs data; unknown keys {unknown}")
    inference = InferenceConfig(**{k: b[k] for k in ("threshold", "max_new_tokens") if b.get(k) is not None})
    full = registry_of("mmeb-v2")
    registry = {k: v for k, v in full.items() if not b.get("datasets") or k in b["datasets"]}
    cfg = HarnessConfig(mode="adaptive", batch_size=inference.batch_size, latency_sample=inference.latency_sample,
                        **({"chunk_size": b["chunk_size"]} if b.get("chunk_size") else {}))
    bb = load_backbone(model)
    res = run_benchmark(bb, MMEBSource(Path(b["data"])), registry, out, cfg,
                        encoder=encoder_for(bb, "adaptive", inference, "user"),
                        encoder_settings=settings_for("adaptive", inference), benchmark="mmeb-v2",
                        progress=progress, overwrite=True)
    if res is None:  # ranks other than 0
        return {}, ""
    return res.summary(), table_markdown([table_from_result(res, full, f"MMEmb-R1 ({r.backbone}, adaptive)")], full)


__all__ = ["RealRecipe", "STAGES", "dotted", "is_real", "load", "run_chain"]
