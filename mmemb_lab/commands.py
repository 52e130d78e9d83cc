"""What each ``mmemb-lab`` command does once its arguments are parsed (``cli`` holds the parser).

Each handler checks its arguments before any model loads and raises an error of ``known_errors()`` with a
one-line message naming the file, dataset or row and the way out; imports sit inside the handlers so that
``mmemb-lab --help`` answers at once (the package's heavy modules load only for the command that runs).
"""

from __future__ import annotations

import json
from pathlib import Path


class UsageError(ValueError):
    """Arguments that cannot work, found before any model loads."""


def known_errors() -> tuple:
    """Errors that carry a one-line message naming the file, dataset or row and the way out."""
    from .data import DataError
    from .model.backbone import CheckpointError
    from .runs import RunError

    return UsageError, RunError, CheckpointError, DataError, FileExistsError, FileNotFoundError


def check_writable(folder) -> None:
    from .runs import check_writable as check

    p = Path(folder)
    while not p.exists() and p != p.parent:  # the nearest existing ancestor must take new files
        p = p.parent
    check(p)


def world(a) -> None:
    from .world.build import WorldConfig, build_world

    mix = {} if a.hard_fraction is None else {"hard_fraction": a.hard_fraction}
    cfg = WorldConfig(seed=a.seed, n_train=a.n_train, n_eval=a.n_eval, **mix)
    check_writable(Path(a.out).parent)
    info = build_world(a.out, cfg, overwrite=a.overwrite)
    print(json.dumps({k: {"n_eval": d["n_eval"], "hard_fraction": d["hard_fraction"]}
                      for k, d in info["datasets"].items()}, indent=1))


def foundation(a) -> None:
    from dataclasses import replace

    from . import distributed
    from .train.foundation import FoundationConfig, train_foundation

    cfg = FoundationConfig()
    if a.steps:
        cfg = replace(cfg, loop=replace(cfg.loop, steps=a.steps))
    cfg = replace(cfg, **{k: getattr(a, k) for k in ("answer_weight", "answer_phase", "reason_batch", "reason_phase",
                                                     "reason_form") if getattr(a, k) is not None})
    check_writable(Path(a.out).parent)
    with distributed.init_from_env():
        train_foundation(a.out, cfg, seed=a.seed, resume=not a.no_resume, overwrite=a.overwrite)
    if distributed.is_main():
        print(Path(a.out) / "foundation.json")


def _load(a):
    from .model.backbone import load_backbone, lora_config
    from .paths import foundation_dir

    return load_backbone(a.backbone or foundation_dir(), lora=lora_config() if getattr(a, "lora", False) else None)


def train(a) -> None:
    from dataclasses import replace

    from . import distributed
    from .data import open_split
    from .runs import Manifest, RunFolder, weights_digest, world_digest
    from .train.finetune import FinetuneConfig, finetune
    from .world.build import read_world_info

    info = read_world_info(a.world, "--world")  # everything about the arguments is checked before a model loads
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


def evaluate(a) -> None:
    from .eval.harness import evaluate
    from .runs import Manifest, RunFolder, weights_digest, world_digest
    from .world.build import read_world_info, toy_registry

    info = read_world_info(a.world, "--world")
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


def run(a) -> None:
    """``run RECIPE`` and ``demo`` (every stage, skipping what is done); ``<stage>`` (that stage alone)."""
    from .demo import format_summary, run_demo
    from .pipeline import Recipe

    if getattr(a, {"select": "rationales", "stage1": "selected", "stage2": "stage1"}.get(a.command, "-"), None):
        return _real_stage(a)
    if getattr(a, "recipe", None) and Path(a.recipe).is_file() and _is_real(a.recipe):
        return _chain(a)
    r = Recipe.resolve(getattr(a, "recipe", None), a.preset, a.seed, a.out, getattr(a, "set", None))
    only = {"select": "selection"}.get(a.command, a.command) if a.command not in ("run", "demo") else None
    s = run_demo(seed=r.seed, out=r.out, preset=r.preset, foundation=r.foundation, world_dir=r.world,
                 overrides=r.overrides, only=only)
    print(format_summary(s))
    print(f"wrote {Path(r.out) / 'summary.json'} and {Path(r.out) / 'figures'} in {s.wall_s:.0f} s")


def _is_real(recipe) -> bool:
    from .chain import is_real

    return is_real(recipe)


def _chain(a) -> None:
    """``run RECIPE`` for a real recipe (``kind: real``): every stage from rationales to the benchmark."""
    from . import distributed
    from .chain import load, run_chain

    if a.command != "run" or a.preset:
        raise UsageError(f"{a.recipe} is a real-data recipe: run it whole with `mmemb-lab run {a.recipe}` (no "
                         "--preset); run one stage with `select --rationales`, `stage1 --selected`, `stage2 --stage1`")
    r = load(a.recipe, a.seed, a.out, a.set)
    check_writable(r.out)
    with distributed.init_from_env():
        res = run_chain(r)
    if distributed.is_main():
        print(json.dumps({k: v for k, v in res.items() if k != "table"}, indent=1))
        print(res["table"])


def _real_stage(a) -> None:
    """``select --rationales``, ``stage1 --selected``, ``stage2 --stage1``: the method on a real training set."""
    from . import distributed
    from .method import real_stages
    from .method.rationales import select_rationales
    from .method.stage1 import Stage1Config
    from .method.stage2 import Stage2Config
    from .pipeline import Recipe, apply_overrides

    sets, out, seed = Recipe().with_overrides(a.set or []).overrides, a.out or f"runs/{a.command}", a.seed or 0
    check_writable(out)
    with distributed.init_from_env():
        if a.command == "select":
            res = select_rationales(a.rationales, _load(a), out, seed=seed, overwrite=a.overwrite)
        elif a.command == "stage1":
            cfg = apply_overrides(Stage1Config(), sets)
            res = real_stages.run_stage1(a.selected, _load(a), out, cfg, seed, overwrite=a.overwrite)
        else:
            cfg = apply_overrides(Stage2Config().rl, sets)
            res = real_stages.run_stage2(a.stage1, out, cfg, seed, overwrite=a.overwrite)
    if distributed.is_main():
        print(json.dumps(res, indent=1))


def rationales(a) -> None:
    from . import distributed
    from .method.rationales import TrainSource, run_rationales, worker_specs

    kind = next(k for k in ("train", "world", "llavahound", "vidore") if getattr(a, k))
    src = TrainSource({"train": "mmeb-train"}.get(kind, kind), getattr(a, kind), a.images, split=a.split,
                      limit=a.limit, frames=a.frames, mode=a.mode)
    specs = worker_specs(a.hf or [], a.http or [], **{k: getattr(a, k) for k in (
        "prompt", "max_new_tokens", "temperature", "batch_size") if getattr(a, k) is not None})
    check_writable(a.out)
    with distributed.init_from_env():
        reports = run_rationales(src, specs, a.out, a.seed, a.shard_size, a.overwrite)
    if distributed.is_main():
        print(json.dumps({k: vars(v) for k, v in reports.items()}, indent=1))


def gpu_check(a) -> None:
    from .gpu_check import run_gpu_check

    print(json.dumps(run_gpu_check(a.out, a.scale, a.per_gpu_batch, a.chunk, a.steps, a.n_embed, a.n_gate,
                                   a.peak_tflops), indent=1))


def results(a) -> None:
    from .results import report

    missing = [r for r in a.runs if not (Path(r) / "summary.json").is_file()]
    if missing:
        raise SystemExit(f"no summary.json in {', '.join(missing)}: run `make demo OUT=<folder>` first")
    print(report(a.runs))


def figures(a) -> None:
    from .figures import paper_figures, save_figures
    from .paths import figures_dir

    run = Path(a.run)
    out = Path(a.out) if a.out else figures_dir() / run.resolve().name
    png = not a.no_png
    paths = save_figures(paper_figures(run), out, run=run.resolve().name, png=png, png_scale=3.0, pdf=png)
    print(f"wrote {len(paths)} figure(s) from {run} to {out}: {', '.join(sorted(paths))}")


def bench(a) -> None:
    from .bench import run_bench

    print(json.dumps(run_bench(a.out), indent=1))


def datasets(a) -> None:
    from .eval.registry import dataset_rows

    rows = dataset_rows(a.benchmark)
    print(json.dumps(rows, indent=1) if a.json else "\n".join(
        f"{r['name']:<50} {r['modality']:<7} {r['meta_task']:<7} {r['metric']:<7} {r['eval_type']}" for r in rows))


def data(a) -> None:
    from .eval.mmeb import download

    manifest = download(a.to, datasets=a.datasets or None, revision=a.revision)
    print(json.dumps({"to": str(a.to), "datasets": len(manifest["datasets"])}, indent=1))


def benchmark(a) -> None:
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
        from .world.build import read_world_info, toy_registry

        registry = toy_registry(read_world_info(a.data, "--data"))
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
