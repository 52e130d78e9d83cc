"""Command line: ``mmemb-lab <command>`` == ``python -m mmemb_lab <command>``; the same under accelerate/torchrun.

1 CPU / 1 GPU:  python -m mmemb_lab train --world worlds/tiny-seed0 --out runs/ft
N GPUs:         accelerate launch -m mmemb_lab train ...   (or torchrun --nproc-per-node N -m mmemb_lab train ...)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


class UsageError(ValueError):
    """Arguments that cannot work, found before any model loads."""


def _positive(kind, zero: bool = False):
    def parse(text: str):
        v = kind(text)
        if v < 0 or (v == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else '> 0'}, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


def _known_errors() -> tuple:
    """Errors that carry a one-line message naming the file, dataset or row and the way out."""
    from .data import DataError
    from .model.backbone import CheckpointError
    from .runs import RunError

    return UsageError, RunError, CheckpointError, DataError, FileExistsError


def check_writable(folder) -> None:
    from .runs import check_writable as check

    p = Path(folder)
    while not p.exists() and p != p.parent:  # the nearest existing ancestor must take new files
        p = p.parent
    check(p)


def _world(a) -> None:
    from .world.build import WorldConfig, build_world

    mix = {} if a.hard_fraction is None else {"hard_fraction": a.hard_fraction}
    cfg = WorldConfig(seed=a.seed, n_train=a.n_train, n_eval=a.n_eval, **mix)
    check_writable(Path(a.out).parent)
    info = build_world(a.out, cfg, overwrite=a.overwrite)
    print(json.dumps({k: {"n_eval": d["n_eval"], "hard_fraction": d["hard_fraction"]}
                      for k, d in info["datasets"].items()}, indent=1))


def _foundation(a) -> None:
    from dataclasses import replace

    from . import distributed
    from .train.foundation import FoundationConfig, train_foundation

    cfg = FoundationConfig()
    if a.steps:
        cfg = replace(cfg, loop=replace(cfg.loop, steps=a.steps))
    if a.answer_weight is not None:
        cfg = replace(cfg, answer_weight=a.answer_weight)
    if a.answer_phase is not None:
        cfg = replace(cfg, answer_phase=a.answer_phase)
    if a.reason_batch is not None:
        cfg = replace(cfg, reason_batch=a.reason_batch)
    if a.reason_phase is not None:
        cfg = replace(cfg, reason_phase=a.reason_phase)
    if a.reason_form is not None:
        cfg = replace(cfg, reason_form=a.reason_form)
    check_writable(Path(a.out).parent)
    with distributed.init_from_env():
        train_foundation(a.out, cfg, seed=a.seed, resume=not a.no_resume, overwrite=a.overwrite)
    if distributed.is_main():
        print(Path(a.out) / "foundation.json")


def _load(a):
    from .model.backbone import load_backbone, lora_config
    from .paths import foundation_dir

    return load_backbone(a.backbone or foundation_dir(), lora=lora_config() if getattr(a, "lora", False) else None)


def _world_info(root) -> dict:
    """A world's ``world.json``, or a one-line error naming the folder or file and the way out."""
    path = Path(root) / "world.json"
    if not Path(root).is_dir():
        raise UsageError(f"--world {root}: no such folder (make one with `mmemb-lab world --out {root}`)")
    if not path.exists():
        raise UsageError(f"--world {root}: not a toy world (no world.json; make one with `mmemb-lab world`)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: truncated or corrupt ({e}); regenerate the world with "
                         f"`mmemb-lab world --out {root} --overwrite`") from e


def _train(a) -> None:
    from dataclasses import replace

    from . import distributed
    from .data import open_split
    from .runs import Manifest, RunFolder, weights_digest, world_digest
    from .train.finetune import FinetuneConfig, finetune

    info = _world_info(a.world)  # everything about the arguments is checked before a model loads
    datasets = a.datasets or sorted(info["datasets"])
    unknown = sorted(set(datasets) - set(info["datasets"]))
    if unknown:
        raise UsageError(f"--datasets {' '.join(unknown)}: not in {a.world} (has {', '.join(sorted(info['datasets']))})")
    n_rows = sum(open_split(Path(a.world) / d / "train", d).num_rows for d in datasets)
    if a.batch_size > n_rows:
        raise UsageError(f"--batch-size {a.batch_size} is larger than the {n_rows} training rows of {datasets}")
    check_writable(a.out)
    with distributed.init_from_env():
        cfg = FinetuneConfig(batch_size=a.batch_size)
        cfg = replace(cfg, loop=replace(cfg.loop, steps=a.steps, lr=a.lr))
        backbone = _load(a)
        manifest = Manifest.make("train", {"finetune": cfg, "datasets": datasets, "lora": a.lora}, a.seed,
                                 {"weights": weights_digest(backbone.model), "world": world_digest(a.world),
                                  "backbone": str(a.backbone or "data/foundation")})
        with RunFolder(a.out, manifest, overwrite=a.overwrite, resume=not a.no_resume):
            res = finetune(backbone, a.world, datasets, a.out, cfg, seed=a.seed, resume=not a.no_resume)
            if distributed.is_main():
                backbone.save(Path(a.out) / "model")
        if distributed.is_main():
            print(json.dumps({"steps": res.steps_done, "resumed_from": res.resumed_from, **res.last}))


def _evaluate(a) -> None:
    from .eval.harness import evaluate
    from .runs import Manifest, RunFolder, weights_digest, world_digest
    from .world.build import toy_registry

    info = _world_info(a.world)
    check_writable(a.out)
    backbone = _load(a)
    manifest = Manifest.make("evaluate", {"strict": a.strict}, None,
                             {"weights": weights_digest(backbone.model), "world": world_digest(a.world)})
    with RunFolder(a.out, manifest, overwrite=a.overwrite):
        res = evaluate(backbone, a.world, toy_registry(info), out_dir=a.out, strict=a.strict)
    print(json.dumps(res.summary(), indent=1))
    _print_skipped({k: (v.skipped, v.problems) for k, v in res.per_dataset.items()})


def _print_skipped(per: dict) -> None:
    """One line per dataset that lost rows, with its first reasons (the summary never hides them)."""
    bad = {k: v for k, v in per.items() if v[0]}
    print(f"skipped rows: {sum(n for n, _ in bad.values())} in {len(bad)} dataset(s)" if bad else "skipped rows: none")
    for k, (n, reasons) in bad.items():
        print(f"  {k}: {n} skipped; first: {' | '.join(reasons[:3])}")


def _demo(a) -> None:
    from .demo import format_summary, run_demo

    s = run_demo(seed=a.seed, out=a.out, preset=a.preset)
    print(format_summary(s))
    print(f"wrote {Path(a.out) / 'summary.json'} and {Path(a.out) / 'figures'} in {s.wall_s:.0f} s")


def _run(a) -> None:
    """``mmemb-lab run RECIPE`` (every stage, skipping what is done) or ``mmemb-lab <stage>`` (that stage)."""
    from .demo import format_summary, run_demo
    from .pipeline import Recipe

    r = Recipe.resolve(getattr(a, "recipe", None), a.preset, a.seed, a.out, a.set)
    only = {"select": "selection"}.get(a.command, a.command) if a.command != "run" else None
    s = run_demo(seed=r.seed, out=r.out, preset=r.preset, foundation=r.foundation, world_dir=r.world,
                 overrides=r.overrides, only=only)
    print(format_summary(s))
    print(f"wrote {Path(r.out) / 'summary.json'} and {Path(r.out) / 'figures'} in {s.wall_s:.0f} s")


def _gpu_check(a) -> None:
    from .gpu_check import run_gpu_check

    print(json.dumps(run_gpu_check(a.out, a.scale, a.per_gpu_batch, a.chunk, a.steps, a.n_embed, a.n_gate,
                                   a.peak_tflops), indent=1))


def _figures(a) -> None:
    from .figures import paper_figures, save_figures
    from .paths import figures_dir

    run = Path(a.run)
    out = Path(a.out) if a.out else figures_dir() / run.resolve().name
    try:
        figs = paper_figures(run)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    paths = save_figures(figs, out, run=run.resolve().name, png=not a.no_png, png_scale=3.0, pdf=not a.no_png)
    print(f"wrote {len(paths)} figure(s) from {run} to {out}: {', '.join(sorted(paths))}")


def _bench(a) -> None:
    from .bench import run_bench

    print(json.dumps(run_bench(a.out), indent=1))


def _datasets(a) -> None:
    from .eval.registry import benchmark

    if a.benchmark == "toy":
        from .world.tasks import DATASETS

        rows = [{"name": n, "modality": m, "meta_task": t, "metric": "ndcg@5" if m == "visdoc" else "hit@1",
                 "eval_type": e} for n, (_, m, t, e) in DATASETS.items()]
    else:
        rows = [{"name": d.name, "modality": d.modality, "meta_task": d.meta_task, "metric": d.metric,
                 "eval_type": d.eval_type, "hf_source": d.hf_source, "instruction": d.instruction}
                for d in benchmark(a.benchmark).values()]
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['name']:<50} {r['modality']:<7} {r['meta_task']:<7} {r['metric']:<7} {r['eval_type']}")


def _data(a) -> None:
    from .eval.mmeb import download

    manifest = download(a.to, datasets=a.datasets or None, revision=a.revision)
    print(json.dumps({"to": str(a.to), "datasets": len(manifest["datasets"])}, indent=1))


def _benchmark(a) -> None:
    from dataclasses import replace

    from . import distributed
    from .eval.harness import HarnessConfig, MMEBSource, ToySource, run_benchmark, run_oracle
    from .eval.modes import InferenceConfig, encoder_for, settings_for
    from .eval.registry import benchmark
    from .eval.report import load_peers, table_from_result, table_markdown

    inference = InferenceConfig()  # the defaults, written once there
    for flag, field, value in (("--threshold", "threshold", a.threshold), ("--max-new-tokens", "max_new_tokens",
                                                                           a.max_new_tokens)):
        if value is None:
            continue
        if field not in settings_for(a.mode, inference):
            raise UsageError(f"{flag} does not apply to --mode {a.mode}")
        inference = replace(inference, **{field: value})
    if a.mode != "direct" and a.prompt != "user":
        raise UsageError(f"--mode {a.mode} writes its rationale after the 'user' prompt only, not --prompt {a.prompt}")
    if a.benchmark == "toy":
        from .world.build import toy_registry

        registry = toy_registry(_world_info(a.data))
        source = ToySource(Path(a.data), a.split)
    else:
        if a.split != "eval":
            raise UsageError(f"--split {a.split} is a toy world's split; MMEB-V2 has no validation split")
        registry, source = benchmark(a.benchmark), MMEBSource(Path(a.data))
    full = dict(registry)
    if a.datasets:
        unknown = sorted(set(a.datasets) - set(registry))
        if unknown:
            raise SystemExit(f"not in {a.benchmark}: {unknown}")
        registry = {k: v for k, v in registry.items() if k in a.datasets}
    check_writable(a.out)
    cfg = HarnessConfig(mode=a.mode, prompt=a.prompt, strict=a.strict, batch_size=inference.batch_size,
                        latency_sample=inference.latency_sample,
                        **({"chunk_size": a.chunk_size} if a.chunk_size else {}))
    with distributed.init_from_env():
        backbone = _load(a)
        if a.mode == "oracle":
            res = run_oracle(backbone, source, registry, a.out, cfg, inference, benchmark=a.benchmark,
                             overwrite=a.overwrite)
        else:
            res = run_benchmark(backbone, source, registry, a.out, cfg,
                                encoder=encoder_for(backbone, a.mode, inference, a.prompt),
                                encoder_settings=settings_for(a.mode, inference), benchmark=a.benchmark,
                                overwrite=a.overwrite)
    if res is not None:
        print(json.dumps(res.summary(), indent=1))
        _print_skipped({k: (v.skipped, v.problems) for k, v in res.per_dataset.items()})
        if res.per_dataset:
            peers = load_peers() if a.benchmark == "mmeb-v2" else ()
            label = f"{res.backbone} ({res.mode}: upper bound, {res.prompt} prompt)" if res.upper_bound else None
            print(table_markdown([table_from_result(res, full, label)], full, peers))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmemb-lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("world", help="generate the toy world (MMEB schemas on disk)")
    s.add_argument("--out", required=True, help="folder to write")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-train", type=_positive(int, zero=True), default=256, help="training rows per dataset")
    s.add_argument("--n-eval", type=_positive(int), default=100, help="evaluation queries per dataset")
    s.add_argument("--hard-fraction", type=float, default=None, help="share of hard items (default: the world's)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a world made with other settings; the old folder is moved aside, never deleted")
    s.set_defaults(fn=_world)

    s = sub.add_parser("foundation", help="train the stage-0 foundation model (tokenizer included)")
    s.add_argument("--out", default="data/foundation")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=0, help="override the number of steps")
    s.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    s.add_argument("--overwrite", action="store_true", help="move a run made with other settings aside and start anew")
    s.add_argument("--answer-weight", type=float, default=None,
                   help="weight of skill-answer tokens the question does not contain (FoundationConfig.answer_weight)")
    s.add_argument("--answer-phase", type=int, default=None, help="step from which --answer-weight applies")
    s.add_argument("--reason-batch", type=int, default=None,
                   help="chains of thought per step from --reason-phase on (FoundationConfig.reason_batch; 0 = off)")
    s.add_argument("--reason-phase", type=int, default=None, help="step from which --reason-batch applies")
    s.add_argument("--reason-form", default=None, choices=["plain", "span"],
                   help="chains asked 'step by step' (plain) or as stage 1 asks, written in the reasoning span")
    s.set_defaults(fn=_foundation)

    for name, fn, helptext in (("train", _train, "contrastive fine-tuning on a world's training rows"),
                               ("evaluate", _evaluate, "score a backbone on a world's evaluation sets")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--world", required=True, help="world folder (mmemb-lab world --out ...)")
        s.add_argument("--backbone", default=None, help="checkpoint folder or Hub id (default: data/foundation)")
        s.add_argument("--out", required=True)
        s.add_argument("--overwrite", action="store_true",
                       help="move a run made from other inputs or settings aside (never deletes) and start anew")
        s.set_defaults(fn=fn)
    train = sub.choices["train"]
    train.add_argument("--steps", type=_positive(int), default=100)
    train.add_argument("--lr", type=_positive(float), default=2e-4)
    train.add_argument("--batch-size", type=_positive(int), default=32, help="global batch (split over processes)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--lora", action="store_true", help="LoRA on the language model instead of full tuning")
    train.add_argument("--datasets", nargs="*", help="subset of the world's datasets")
    train.add_argument("--no-resume", action="store_true")
    sub.choices["evaluate"].add_argument("--strict", action="store_true", help="stop at the first bad record")

    s = sub.add_parser("demo", help="the main job end to end (what `make demo` runs)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--preset", default="tiny", choices=["tiny", "smoke"])
    s.set_defaults(fn=_demo)

    s = sub.add_parser("run", help="a recipe's stages in order, skipping those already done with the same "
                                   "settings and inputs (configs/recipes/*.yaml)")
    s.add_argument("recipe", help="recipe file: preset, seed, out, overrides of config fields by dotted path")
    stage_help = {"select": "candidate rationales and counterfactual selection (the stage-0 evaluation must be done)",
                  "stage1": "stage 1: the selected arm, the random-worker ablation and the two baselines",
                  "stage2": "stage 2: GRPO on the gate, the adaptive evaluation and the threshold sweep"}
    for name, helptext in stage_help.items():
        s2 = sub.add_parser(name, help=helptext + "; the stages before it must be done")
        s2.add_argument("--recipe", default=None, help="recipe file (default: the tiny preset, seed 0, runs/demo)")
    for name in ("run", *stage_help):
        s2 = sub.choices[name]
        s2.add_argument("--preset", default=None, choices=["tiny", "smoke"], help="overrides the recipe's preset")
        s2.add_argument("--seed", type=int, default=None, help="overrides the recipe's seed")
        s2.add_argument("--out", default=None, help="overrides the recipe's run folder")
        s2.add_argument("--set", action="append", metavar="FIELD=VALUE",
                        help="set a config field by dotted path, e.g. --set stage2.rl.steps=40 (repeatable)")
        s2.set_defaults(fn=_run)

    s = sub.add_parser("figures", help="the method's figures from a demo run folder, for print (what `make figures` runs)")
    s.add_argument("run", help="a finished demo run folder (holds summary.json)")
    s.add_argument("--out", default=None, help="folder for the figures (default: figures/<run folder name>)")
    s.add_argument("--no-png", action="store_true", help="HTML only (no browser needed)")
    s.set_defaults(fn=_figures)

    s = sub.add_parser("gpu-check", help="stage-1 speed, memory and MFU, embedding throughput and gate latency of "
                                         "Qwen3-VL-4B (released shape, random weights) on one GPU (make gpu-check)")
    s.add_argument("--out", default="runs/gpu-check")
    s.add_argument("--scale", default="qwen3-vl-4b", choices=["qwen3-vl-4b", "tiny"],
                   help="tiny: the same measurements with the tiny spec (runs on a CPU)")
    s.add_argument("--per-gpu-batch", type=_positive(int), default=None,
                   help="stage-1 batch on this GPU (default: the paper recipe's global batch / GPUs)")
    s.add_argument("--chunk", type=int, default=None, help="GradCache chunk (default: the paper recipe's)")
    s.add_argument("--steps", type=_positive(int), default=3, help="stage-1 steps (the first warms up)")
    s.add_argument("--n-embed", type=_positive(int), default=256, help="inputs embedded in the direct mode")
    s.add_argument("--n-gate", type=_positive(int), default=16, help="queries timed one at a time at the gate")
    s.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak for MFU (default: looked up by device name)")
    s.set_defaults(fn=_gpu_check)

    s = sub.add_parser("bench", help="speed benchmarks, JSON (what `make bench` runs)")
    s.add_argument("--out", default="runs/bench")
    s.set_defaults(fn=_bench)

    s = sub.add_parser("data", help="fetch benchmark data from the Hugging Face Hub (resumable)")
    dsub = s.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("download", help="download MMEB-V2 into a local folder (layout: mmemb_lab/eval/mmeb.py)")
    d.add_argument("benchmark", choices=["mmeb-v2"])
    d.add_argument("--to", required=True, help="local folder (rerun to resume)")
    d.add_argument("--datasets", nargs="*", help="subset of the registry's datasets (default: all 78)")
    d.add_argument("--revision", default=None, help="Hub revision (default: main; the commit is recorded)")
    s.set_defaults(fn=_data)

    s = sub.add_parser("benchmark", help="score a backbone on MMEB-V2 or a toy world (cached, resumable, sharded)")
    s.add_argument("--benchmark", default="mmeb-v2", choices=["mmeb-v2", "toy"])
    s.add_argument("--data", required=True, help="MMEB-V2 folder (mmemb-lab data download) or a toy world folder")
    s.add_argument("--backbone", default=None, help="checkpoint folder or Hub id (default: data/foundation)")
    s.add_argument("--out", required=True, help="run folder; rerun with the same folder to resume")
    s.add_argument("--datasets", nargs="*", help="subset of the benchmark's datasets")
    s.add_argument("--split", default="eval", choices=["eval", "val"],
                   help="toy: score the reported eval queries, or the validation queries on which settings are chosen")
    s.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    s.add_argument("--prompt", default="user", choices=["user", "chat", "raw"],
                   help="prompt convention: user (ours), chat (system instruction), raw (VLM2Vec)")
    s.add_argument("--mode", default="direct", choices=["direct", "always", "adaptive", "oracle"],
                   help="direct: embed at once; always: write a rationale, then embed; adaptive: reason where the "
                        "gate opens; oracle: per query the better of direct and always (an upper bound; runs both)")
    s.add_argument("--threshold", type=float, default=None,
                   help="adaptive: reason where the gate's p_open exceeds T (default: InferenceConfig.threshold)")
    s.add_argument("--max-new-tokens", type=_positive(int), default=None,
                   help="always / adaptive / oracle: rationale budget in tokens (default: InferenceConfig)")
    s.add_argument("--chunk-size", type=_positive(int), default=None,
                   help="inputs per cache file, the unit of resumption and sharding (default: HarnessConfig)")
    s.add_argument("--overwrite", action="store_true",
                   help="move a run made from other weights, data or settings aside (never deletes) and start anew")
    s.set_defaults(fn=_benchmark)

    s = sub.add_parser("datasets", help="list a benchmark's datasets")
    s.add_argument("--benchmark", default="mmeb-v2", choices=["mmeb-v2", "toy"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_datasets)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "datasets", "urllib3", "filelock", "choreographer", "kaleido", "logistro"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        a.fn(a)
    except _known_errors() as e:
        if a.verbose:
            raise
        print(f"mmemb-lab {a.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
