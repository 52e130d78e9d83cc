"""The simulated prior: several "workers" write candidate rationales r_1..r_K for each query.

Concept (docs/method.md, step 1; paper: "simulated prior")
    Reasoning is a latent variable r, and p(r | q) is not known. MMEmb-R1 approximates it by sampling
    rationales from several different generators (an instruct MLLM, a thinking MLLM, a large
    proprietary model). Which of them help a given (query, target) pair is decided later, pair by pair,
    by a counterfactual test (``mmemb_lab.method.selection``).

    In the toy world the workers have *known* behaviours, so the selection can be scored against the truth:

    ============== ==================================================================================
    concise        one clause per hop, short; on multi-hop items it goes astray at one hop (that hop's
                   fact and the end are wrong) with probability ``CONCISE_WRONG_HOP`` and leaves out an
                   intermediate hop with probability ``CONCISE_SKIP_HOP``
    verbose        every hop interleaved with true but irrelevant detail (~3x longer); goes astray at one
                   hop with probability ``VERBOSE_WRONG_HOP``
    format_only    reasoning-shaped text with nothing specific to the pair (same text for every query)
    hallucinating  confident, well-formed steps whose last fact is wrong
    own            the stage-0 model's own samples (``HFWorker`` on the foundation checkpoint)
    ============== ==================================================================================

    No simulated worker is an answer key: each one's error model is drawn per item from the item's own
    random stream, and ``step_accuracy`` measures how many gold facts a rationale states (reported per
    worker as ``selection.worker_step_accuracy``).

    For real data an ``HFWorker`` wraps any Hugging Face VLM checkpoint (local path or Hub id) with a
    prompt template and sampling settings, and generates in batches. ``generate_candidates`` runs a
    worker over many rows in shards written atomically, so a killed job restarted finishes with every
    row exactly once. Bad outputs (empty, over-long, no closing span marker) are kept as rows with a
    ``status`` and counted, never crashed on.

Used by: ``mmemb_lab.method.selection`` (stage-1 data), notebooks 02 and 03, the demo.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..distributed import reduce_sum
from ..model.backbone import THINK_CLOSE, THINK_OPEN, Backbone
from ..model.embed import Input, collate
from ..model.inference import MAX_NEW_TOKENS
from ..world.scenes import POSITIONS
from ..world.tasks import Item

log = logging.getLogger(__name__)
TOY_WORKERS = ("concise", "verbose", "format_only", "hallucinating")


@dataclass(frozen=True)
class Rationale:
    """One candidate rationale with its provenance."""

    worker: str
    text: str
    """What goes inside the reasoning span ("" when the output was unusable)."""
    status: str = "ok"
    """"ok", or why the output was unusable: "empty", "overlong", "no_span"."""
    n_tokens: int = 0


# ---------------------------------------------------------------------------------------------
# toy workers: known behaviours


def _steps(item: Item) -> list[str]:
    return list(item.gold_steps) if item.gold_steps else [f"so {item.answer.rstrip('.')}."]


CONCISE_WRONG_HOP = 0.2
"""Share of multi-hop items on which the concise worker goes astray at one hop (ours: an error rate in the
range of a small instruct model's on 2-3 hop visual chains; a simulation parameter, not a measurement)."""
CONCISE_SKIP_HOP = 0.1
"""Share of multi-hop items (3+ steps) on which the concise worker leaves out an intermediate hop."""
VERBOSE_WRONG_HOP = 0.1
"""Share of multi-hop items on which the verbose worker goes astray at one hop."""


def _corrupt(step: str, rng: np.random.Generator) -> str | None:
    """``step`` with its last colour / shape / digit / letter replaced by another one; None if it has none."""
    from ..world.scenes import COLOURS, SHAPES

    words = step.rstrip(".").split(" ")
    for i in range(len(words) - 1, -1, -1):
        for vocab in (COLOURS, SHAPES, tuple("0123456789"), tuple("ABCDEFGH")):
            if words[i] in vocab:
                k = vocab.index(words[i])
                words[i] = vocab[(k + 1 + int(rng.integers(len(vocab) - 1))) % len(vocab)]
                return " ".join(words) + "."
    return None


def _astray(steps: list[str], rng: np.random.Generator) -> list[str]:
    """A chain that goes wrong at one hop k >= 1: step k states a wrong fact, and so does the last step."""
    k = int(rng.integers(1, len(steps)))
    out = list(steps)
    for j in {k, len(steps) - 1}:
        out[j] = _corrupt(out[j], rng) or out[j]
    return out


def _fallible(item: Item, rng: np.random.Generator, wrong: float, skip: float) -> list[str]:
    steps = _steps(item)
    u = rng.random()  # drawn for every item, so one item's error does not shift another's stream
    if len(steps) >= 2 and u < wrong:
        return _astray(steps, rng)
    if len(steps) >= 3 and u < wrong + skip:
        del steps[int(rng.integers(1, len(steps) - 1))]
    return steps


def concise(item: Item, rng: np.random.Generator) -> str:
    return " ".join(_fallible(item, rng, CONCISE_WRONG_HOP, CONCISE_SKIP_HOP))


def verbose(item: Item, rng: np.random.Generator) -> str:
    """Every hop, each followed by a true but irrelevant remark; astray at one hop on a share of items."""
    filler = ["let me check this carefully.", "this part matters.", "i read it once more."]
    detail = []
    scene = getattr(item.query_visual, "cells", None)
    if scene is not None:
        detail = [f"note {POSITIONS[i]} {'empty' if o is None else o.name}." for i, o in enumerate(scene)]
    out = ["let me reason step by step."]
    for s in _fallible(item, rng, VERBOSE_WRONG_HOP, 0.0):
        out.append(s)
        pool = detail or filler
        out.append(pool[int(rng.integers(len(pool)))])
    return " ".join(out)


FORMAT_ONLY_TEXT = ("let me reason step by step. first i find the starting point. then i follow each hint in "
                    "order. so i know the answer.")


def format_only(item: Item, rng: np.random.Generator) -> str:
    return FORMAT_ONLY_TEXT


def hallucinating(item: Item, rng: np.random.Generator) -> str:
    """The gold steps with the final fact replaced by a confident wrong one."""
    steps = _steps(item)
    return " ".join(steps[:-1] + [_corrupt(steps[-1], rng) or "so the answer is unclear."])


TOY_WORKER_FNS: dict[str, Callable[[Item, np.random.Generator], str]] = {
    "concise": concise, "verbose": verbose, "format_only": format_only, "hallucinating": hallucinating,
}


def toy_rationales(item: Item, seed: int = 0, workers: Sequence[str] = TOY_WORKERS, tokenizer=None
                   ) -> list[Rationale]:
    out = []
    for w in workers:
        rng = np.random.default_rng([seed, TOY_WORKERS.index(w), zlib.crc32(item.item_id.encode())])
        text = TOY_WORKER_FNS[w](item, rng)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer is not None else len(text.split())
        out.append(Rationale(w, text, "ok", n))
    return out


def states_gold_facts(text: str, item: Item) -> bool:
    """Does a rationale state every gold fact (each gold step's clause, or the answer for 1-hop text items)?"""
    return all(s.rstrip(".") in text for s in _steps(item))


def step_accuracy(text: str, item: Item) -> float:
    """Share of the item's gold facts that a rationale states (1.0 exactly when ``states_gold_facts``)."""
    steps = _steps(item)
    return sum(s.rstrip(".") in text for s in steps) / len(steps)


# ---------------------------------------------------------------------------------------------
# Hugging Face workers (real checkpoints, and the stage-0 model's own samples)

DEFAULT_PROMPT = "Think step by step about what the query asks, then stop."


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    checkpoint: str
    """Local path or Hub id of any Qwen-VL checkpoint (``backbone.load_backbone``)."""
    prompt: str = DEFAULT_PROMPT
    """Appended to the query's instruction; the assistant turn is opened with ``<think>``."""
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True
    batch_size: int = 16
    max_rationale_tokens: int = 60
    """Longer rationales are unusable ("overlong")."""
    backend: str = "hf"
    """"hf" (transformers.generate) or "vllm" where installed (GPU users)."""


def parse_output(text: str, n_tokens: int, closed: bool, max_tokens: int) -> tuple[str, str]:
    """(rationale, status) from a worker's raw continuation of ``<think>``."""
    body = text.split(THINK_CLOSE)[0].replace(THINK_OPEN, "").strip() if THINK_CLOSE in text else text.strip()
    if not closed and THINK_CLOSE not in text:
        return ("", "overlong") if n_tokens >= max_tokens else ("", "no_span")
    if not body:
        return "", "empty"
    if n_tokens > max_tokens:
        return "", "overlong"
    return body, "ok"


class HFWorker:
    """Generate rationales with a Qwen-VL checkpoint: batched, KV-cached ``generate``, span-aware parsing."""

    def __init__(self, spec: WorkerSpec, backbone: Backbone | None = None):
        self.spec = spec
        if spec.backend == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError as e:
                raise RuntimeError(f"worker {spec.name}: backend 'vllm' requested but vllm is not installed") from e
            raise NotImplementedError("vLLM rollouts: use backend='hf' in this version")  # documented limitation
        if backbone is None:
            from ..model.backbone import load_backbone

            backbone = load_backbone(spec.checkpoint)
        self.backbone = backbone

    def __call__(self, inputs: Sequence[Input], seed: int = 0) -> list[Rationale]:
        import torch

        bb, spec = self.backbone, self.spec
        close_id = bb.token_id(THINK_CLOSE)
        out: list[Rationale] = []
        was = bb.model.training
        bb.model.eval()
        for s in range(0, len(inputs), spec.batch_size):
            chunk = [Input(x.text, x.visual, "\n".join(t for t in (x.instruction, spec.prompt) if t), None, x.name)
                     for x in inputs[s:s + spec.batch_size]]
            batch = collate(bb, chunk, [THINK_OPEN] * len(chunk))
            torch.manual_seed(seed + s)
            with torch.no_grad():
                gen = bb.model.generate(**batch, max_new_tokens=spec.max_new_tokens, do_sample=spec.do_sample,
                                        temperature=spec.temperature, top_p=spec.top_p, eos_token_id=close_id,
                                        pad_token_id=bb.tokenizer.pad_token_id)
            new = gen[:, batch["input_ids"].shape[1]:]
            for row in new:
                ids = row.tolist()
                closed = close_id in ids
                if closed:
                    ids = ids[:ids.index(close_id) + 1]
                ids = [i for i in ids if i != bb.tokenizer.pad_token_id]
                text = bb.tokenizer.decode(ids, skip_special_tokens=False)
                body, status = parse_output(text, len(ids), closed, spec.max_rationale_tokens)
                out.append(Rationale(spec.name, body, status, len(ids)))
        bb.model.train(was)
        return out


# ---------------------------------------------------------------------------------------------
# sharded, resumable generation with provenance


@dataclass(frozen=True)
class GenerationReport:
    rows: int
    shards_done: int
    shards_skipped: int
    status_counts: dict = field(default_factory=dict)


def generate_candidates(worker: Callable[..., list[Rationale]], rows: Sequence[tuple[str, Input]],
                        out_dir: str | Path, provenance: dict, shard_size: int = 64, progress: bool = True,
                        seed: int = 0, rank: int = 0, world_size: int = 1) -> GenerationReport:
    """Run ``worker(inputs, seed=...)`` over (row_id, input) pairs in shards; finished shards are skipped.

    Each shard is a ``datasets`` folder written under a temporary name and renamed when complete, so a
    killed job leaves only whole shards; rerunning it finishes with every row exactly once. Shard ``k`` is
    written by rank ``k mod world_size`` with the seed ``seed + k * shard_size`` (the same in any number of
    processes); every rank waits for the others, then reads the whole set.
    Columns: row_id, worker, rationale, status, n_tokens, provenance (JSON: prompt, sampling...).
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(rows) / shard_size)
    done = skipped = 0
    prov = json.dumps(provenance, sort_keys=True)
    for k in tqdm(range(rank, n_shards, world_size), desc="rationales", disable=not progress):
        path = out / f"shard-{k:05d}"
        if path.exists():
            skipped += 1
            continue
        part = rows[k * shard_size:(k + 1) * shard_size]
        rats = worker([x for _, x in part], seed=seed + k * shard_size)
        data = {"row_id": [r for r, _ in part], "worker": [r.worker for r in rats],
                "rationale": [r.text for r in rats], "status": [r.status for r in rats],
                "n_tokens": [r.n_tokens for r in rats], "provenance": [prov] * len(part)}
        tmp = out / f".tmp-shard-{k:05d}"
        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_dict(data).save_to_disk(str(tmp))
        os.replace(tmp, path)
        done += 1
    done, skipped = int(reduce_sum(done)), int(reduce_sum(skipped))
    ds = load_candidates(out)
    counts: dict[str, int] = {}
    for s in ds["status"]:
        counts[s] = counts.get(s, 0) + 1
    return GenerationReport(len(ds), done, skipped, counts)


def load_candidates(out_dir: str | Path):
    from datasets import concatenate_datasets, load_from_disk

    shards = sorted(p for p in Path(out_dir).glob("shard-*") if p.is_dir())
    return concatenate_datasets([load_from_disk(str(p)) for p in shards]) if shards else None


def spec_provenance(spec: WorkerSpec) -> dict:
    return asdict(spec)
