"""Command line: ``mmemb-lab <command>`` == ``python -m mmemb_lab <command>``; the same under accelerate/torchrun.

1 CPU / 1 GPU:  python -m mmemb_lab train --world worlds/tiny-seed0 --out runs/ft
N GPUs:         accelerate launch -m mmemb_lab train ...   (or torchrun --nproc-per-node N -m mmemb_lab train ...)
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import commands
from .commands import known_errors


def _positive(kind, zero: bool = False):
    def parse(text: str):
        v = kind(text)
        if v < 0 or (v == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero else '> 0'}, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


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
    s.set_defaults(fn=commands.world)

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
    s.set_defaults(fn=commands.foundation)

    for name, fn, helptext in (("train", commands.train, "contrastive fine-tuning on a world's training rows"),
                               ("evaluate", commands.evaluate, "score a backbone on a world's evaluation sets")):
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
    s.set_defaults(fn=commands.run)

    s = sub.add_parser("run", help="a recipe's stages in order, skipping those already done with the same "
                                   "settings and inputs (configs/recipes/*.yaml)")
    s.add_argument("recipe", help="recipe file: preset, seed, out, overrides of config fields by dotted path")
    stage_help = {"select": "candidate rationales and counterfactual selection (the stage-0 evaluation must be done)",
                  "stage1": "stage 1: the selected arm, the random-worker ablation and the two baselines",
                  "stage2": "stage 2: GRPO on the gate, the adaptive evaluation and the threshold sweep"}
    for name, helptext in stage_help.items():
        s2 = sub.add_parser(name, help=helptext + "; the stages before it must be done")
        s2.add_argument("--recipe", default=None, help="recipe file (default: the tiny preset, seed 0, runs/demo)")
    real = {"select": ("--rationales", "a `rationales` --out folder, scored with --backbone as the evaluator"),
            "stage1": ("--selected", "a `select --rationales` --out folder; trains --backbone on its pairs"),
            "stage2": ("--stage1", "a `stage1 --selected` --out folder: GRPO on its model, over its pairs")}
    for name, (flag, helptext) in real.items():  # the same stage on a real training set (no recipe)
        s2 = sub.choices[name]
        s2.add_argument(flag, help=f"real data: {helptext}; --set then sets fields of this stage's config")
        if name != "stage2":
            s2.add_argument("--backbone", help="checkpoint (default: data/foundation)")
        s2.add_argument("--overwrite", action="store_true", help="real data: move a folder made otherwise aside")
    for name in ("run", *stage_help):
        s2 = sub.choices[name]
        s2.add_argument("--preset", default=None, choices=["tiny", "smoke"], help="overrides the recipe's preset")
        s2.add_argument("--seed", type=int, default=None, help="overrides the recipe's seed")
        s2.add_argument("--out", default=None, help="overrides the recipe's run folder")
        s2.add_argument("--set", action="append", metavar="FIELD=VALUE",
                        help="set a config field by dotted path, e.g. --set stage2.rl.steps=40 (repeatable)")
        s2.set_defaults(fn=commands.run)

    s = sub.add_parser("rationales", help="candidate rationales for training queries from Hugging Face VLMs and "
                                          "OpenAI-compatible servers (split over processes, resumable)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--train", help="one MMEB-train subset: its folder or table file (row ids use its name)")
    src.add_argument("--world", help="a toy world folder (its training rows)")
    src.add_argument("--llavahound", help="LLaVA-Hound's video instruction jsonl (with --frames, --mode)")
    src.add_argument("--vidore", help="ViDoRe's training set (vidore/colpali_train_set): its parquet folder or file")
    s.add_argument("--frames", default="", help="llavahound: the folder of frame folders, one per clip")
    s.add_argument("--mode", default="caption", choices=["caption", "video_retrieval", "qa"],
                   help="llavahound: which pairs to read from a conversation, as VLM2Vec-V2 does")
    s.add_argument("--images", default="", help="MMEB-train image root (default: <train>/../images)")
    s.add_argument("--split", default="original", choices=["original", "diverse_instruction"])
    s.add_argument("--hf", action="append", metavar="NAME=CHECKPOINT", help="a Hugging Face VLM worker (repeatable)")
    s.add_argument("--http", action="append", metavar="NAME=MODEL@URL", help="an OpenAI-compatible worker, e.g. "
                   "big=Qwen/Qwen2.5-VL-72B-Instruct@http://127.0.0.1:8000/v1 (repeatable)")
    s.add_argument("--prompt", default=None, help="appended to each query's instruction (default: WorkerSpec's)")
    s.add_argument("--max-new-tokens", type=_positive(int), default=None)
    s.add_argument("--temperature", type=_positive(float, zero=True), default=None)
    s.add_argument("--batch-size", type=_positive(int), default=None, help="Hugging Face workers: queries per generate")
    s.add_argument("--shard-size", type=_positive(int), default=64, help="rows per shard (the unit of resumption)")
    s.add_argument("--limit", type=_positive(int), default=None, help="only the first N usable rows (a trial)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="one folder per worker inside; rerun with the same folder to resume")
    s.add_argument("--overwrite", action="store_true", help="move a worker's folder made from other settings aside")
    s.set_defaults(fn=commands.rationales)

    s = sub.add_parser("figures", help="the method's figures from a demo run folder, for print (what `make figures` runs)")
    s.add_argument("run", help="a finished demo run folder (holds summary.json)")
    s.add_argument("--out", default=None, help="folder for the figures (default: figures/<run folder name>)")
    s.add_argument("--no-png", action="store_true", help="HTML only (no browser needed)")
    s.set_defaults(fn=commands.figures)

    s = sub.add_parser("results", help="finished demo runs' tables and targets, as markdown (the README's results)")
    s.add_argument("runs", nargs="+", help="demo run folders (each holds summary.json)")
    s.set_defaults(fn=commands.results)

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
    s.set_defaults(fn=commands.gpu_check)

    s = sub.add_parser("bench", help="speed benchmarks, JSON (what `make bench` runs)")
    s.add_argument("--out", default="runs/bench")
    s.set_defaults(fn=commands.bench)

    s = sub.add_parser("data", help="fetch benchmark data from the Hugging Face Hub (resumable)")
    dsub = s.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("download", help="download MMEB-V2 into a local folder (layout: mmemb_lab/eval/mmeb.py)")
    d.add_argument("benchmark", choices=["mmeb-v2"])
    d.add_argument("--to", required=True, help="local folder (rerun to resume)")
    d.add_argument("--datasets", nargs="*", help="subset of the registry's datasets (default: all 78)")
    d.add_argument("--revision", default=None, help="Hub revision (default: main; the commit is recorded)")
    s.set_defaults(fn=commands.data)

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
    s.set_defaults(fn=commands.benchmark)

    s = sub.add_parser("datasets", help="list a benchmark's datasets")
    s.add_argument("--benchmark", default="mmeb-v2", choices=["mmeb-v2", "toy"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=commands.datasets)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "datasets", "urllib3", "filelock", "choreographer", "kaleido", "logistro"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        a.fn(a)
    except known_errors() as e:
        if a.verbose:
            raise
        print(f"mmemb-lab {a.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
