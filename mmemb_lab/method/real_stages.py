"""Stage 1 and stage 2 on a real training set, each reading its upstream from the folder before it.

Concept
    The chain on real data is ``rationales`` -> ``select --rationales`` -> ``stage1 --selected`` ->
    ``stage2 --stage1`` -> ``benchmark --mode adaptive``. Each step's folder has a manifest; a step reads where
    its inputs are from the manifest of the folder it is given, and checks their digests: the selection names
    its rationale folders, stage 1 records the selection it trained on, stage 2 reads stage 1's model and the
    same pairs. The training pairs (query, positive, negatives) are ``counterfactual.Pair`` rows built by
    ``rationales.real_pairs``, the type selection scores; stage 1 takes them where it takes toy items.

    What differs from the toy chain: there is no validation split in MMEB-train, so the gate's threshold stays
    ``InferenceConfig.threshold`` unless the benchmark is given another; there are no easy/hard labels, so the
    probe reports the invocation rate alone.

Used by: ``commands`` (``stage1 --selected``, ``stage2 --stage1``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .. import distributed
from ..model.backbone import Backbone, load_backbone
from ..runs import Manifest, RunError, RunFolder, atomic_write_text, weights_digest
from .counterfactual import Pair
from .rationales import real_pairs
from .rewards import PairTargets
from .rl import RLConfig, train_rl
from .stage1 import Stage1Config, train_stage1
from .stage2 import Stage2Config

SELECTED = "selected.jsonl"


def stage1_set(select_dir: str | Path) -> list[tuple[Pair, str | None]]:
    """(pair, r*) rows of a ``select --rationales`` folder: its pairs, rebuilt from the rationale folders its
    manifest names (their digests checked), with the rationale it kept (None: no reasoning)."""
    select_dir = Path(select_dir)
    m = Manifest.load(select_dir)
    if m is None or m.command != "select" or not (select_dir / SELECTED).exists():
        raise RunError(f"{select_dir}: not a finished `mmemb-lab select --rationales` folder")
    rat_dir = Path(m.config["rationales"])
    for key, digest in m.inputs.items():
        if key.startswith("rationales/"):
            now = Manifest.load(rat_dir / key.split("/", 1)[1])
            if now is None or now.digest() != digest:
                raise RunError(f"{rat_dir / key.split('/', 1)[1]}: changed since {select_dir} was selected from it")
    pairs = real_pairs(rat_dir, m.config["pool_negatives"], m.seed)
    chosen = {r["row_id"]: r["rationale"] for r in map(json.loads, (select_dir / SELECTED).read_text().splitlines())}
    missing = [p.id for p in pairs if p.id not in chosen]
    if missing:
        raise RunError(f"{select_dir / SELECTED}: no row for {missing[:3]} ({len(missing)} pairs)")
    return [(p, chosen[p.id]) for p in pairs]


def run_stage1(select_dir: str | Path, backbone: Backbone, out: str | Path, cfg: Stage1Config = Stage1Config(),
               seed: int = 0, resume: bool = True, overwrite: bool = False) -> dict:
    """Stage 1 on a selection's pairs; writes ``<out>/model`` and ``<out>/result.json`` (the last metrics).
    A finished folder of the same run is resumed at its last step (nothing trains again)."""
    out = Path(out)
    data = stage1_set(select_dir)
    upstream = {"select": Manifest.load(select_dir).digest(), "select_dir": str(select_dir)}
    res = train_stage1(backbone, data, out, cfg, seed=seed, resume=resume,
                       stale="archive" if overwrite else "raise", upstream=upstream)
    if res.resumed_from == res.steps_done and (out / "result.json").exists() and (out / "model").exists():
        return json.loads((out / "result.json").read_text())  # this very run, finished: nothing trained now
    result = {"steps": res.steps_done, "pairs": len(data), "with_rationale": sum(r is not None for _, r in data),
              **{k: v for k, v in res.last.items() if isinstance(v, (int, float))}}
    if distributed.is_main():
        model = backbone.model
        if hasattr(model, "merge_and_unload"):  # LoRA: the model folder holds the merged weights
            model = model.merge_and_unload()
        replace(backbone, model=model).save(out / "model")
        atomic_write_text(out / "result.json", json.dumps(result, indent=1))
    distributed.barrier()
    return result


def rl_pairs(data: list[tuple[Pair, str | None]]) -> list[PairTargets]:
    return [PairTargets(p.id, p.query(), p.positive, tuple(p.negatives), None, p.dataset) for p, _ in data]


def run_stage2(stage1_dir: str | Path, out: str | Path, cfg: RLConfig | None = None, seed: int = 0,
               probe_size: int = 64, overwrite: bool = False) -> dict:
    """GRPO on the gate of a real stage-1 model, over the pairs stage 1 trained on; writes ``<out>/model``,
    the RL history and ``<out>/result.json``."""
    stage1_dir, out = Path(stage1_dir), Path(out)
    m1 = Manifest.load(stage1_dir)
    if m1 is None or m1.command != "stage1" or "select_dir" not in m1.inputs or not (stage1_dir / "model").exists():
        raise RunError(f"{stage1_dir}: not a finished `mmemb-lab stage1 --selected` folder")
    cfg = replace(cfg or Stage2Config().rl, seed=seed)
    backbone = load_backbone(stage1_dir / "model")
    manifest = Manifest.make("stage2", cfg, seed, {"stage1": m1.digest(), "weights": weights_digest(backbone.model),
                                                   "probe_size": probe_size})
    with RunFolder(out, manifest, overwrite=overwrite):
        if (out / "result.json").exists():
            return json.loads((out / "result.json").read_text())
        pairs = rl_pairs(stage1_set(m1.inputs["select_dir"]))
        res = train_rl(backbone, pairs, cfg, out / "rl", probe=pairs[:probe_size])
        result = {"steps": res.steps_done, "pairs": len(pairs), "wall_s": res.wall_s,
                  "invocation": [{k: r[k] for k in ("step", "invocation_rate", "mean_p_open")} for r in res.invocation]}
        if distributed.is_main():
            backbone.save(out / "model")
            atomic_write_text(out / "result.json", json.dumps(result, indent=1))
        distributed.barrier()
    return result


__all__ = ["stage1_set", "run_stage1", "rl_pairs", "run_stage2"]
