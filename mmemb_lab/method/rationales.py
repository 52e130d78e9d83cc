"""Candidate rationales for a training set, from real workers: what ``mmemb-lab rationales`` runs.

Concept (docs/method.md, step 1)
    Selection chooses among rationales that several workers wrote for each training query. This module
    writes them for a training source (MMEB-train's layout, or a toy world's training split) with any mix
    of workers: Hugging Face VLM checkpoints (``workers.HFWorker``) and OpenAI-compatible servers
    (``http_worker.HTTPWorker``: a proprietary model or a vLLM server).

    Each worker writes its own folder, ``<out>/<worker>/``, with a manifest (``runs.Manifest``): the
    source (its path, split and the digest of its table files), the worker's settings (checkpoint or
    endpoint, prompt, sampling), the shard size and the seed. Adding a worker later leaves the others
    untouched; rerunning one with another prompt refuses and names the setting that differs.

    Rows are cut into shards, shard ``k`` written by rank ``k mod world size``, so ``torchrun
    --nproc-per-node N -m mmemb_lab rationales ...`` divides the work. A shard's sampling seed depends on
    the shard, not on the rank, so N processes write the same rationales as one. A killed job resumes:
    whole shards are kept, the rest rerun. Rows the loader cannot use (missing image, empty text) are
    skipped, and each is named in ``<out>/skipped.json``.

    ``select_rationales`` then keeps, per training pair, the candidate that passes the counterfactual test
    (``selection.select``) with any checkpoint as the evaluator: it reads the source and the workers from the
    rationale folders' manifests, never from arguments repeated beside them, and writes
    ``selected.jsonl`` (one row per pair: the chosen worker and rationale, or none) under its own manifest.
    The negatives of a pair are its own hard negative and the positives of other rows of the subset.

Used by: ``cli`` (``rationales``, ``select --rationales``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import distributed
from ..data import DataError, load_train
from ..eval.mmeb.files import resolve_all
from ..eval.mmeb.loaders import load_llavahound_rows, load_train_rows, load_vidore_rows
from ..model.backbone import Backbone, load_backbone
from ..model.embed import Input
from ..runs import Manifest, RunError, RunFolder, atomic_write_text, file_digest, weights_digest, world_digest
from .counterfactual import TAU, Pair, score_pairs, target_key
from .http_worker import HTTPWorker, HTTPWorkerSpec
from .selection import select, worker_prior
from .workers import GenerationReport, HFWorker, Rationale, WorkerSpec, generate_candidates, load_candidates

SOURCES = ("mmeb-train", "llavahound", "vidore", "world")


@dataclass(frozen=True)
class TrainSource:
    """Where the training queries come from."""

    kind: str
    """``"mmeb-train"`` (MMEB-train's layout), ``"llavahound"`` (LLaVA-Hound's video instruction jsonl),
    ``"vidore"`` (ViDoRe's training set) or ``"world"`` (a toy world)."""
    path: str
    """MMEB-train: one subset's folder or table file, or the root holding the ``datasets`` subsets; world: the
    world's root folder."""
    images: str = ""
    """MMEB-train: the folder that image paths are relative to (default: ``images`` beside the subsets)."""
    subset: str = ""
    """MMEB-train: the subset's name, used in row ids (default: the folder's name)."""
    split: str = "original"
    """MMEB-train: ``original`` or ``diverse_instruction``."""
    datasets: tuple[str, ...] = ()
    """MMEB-train: the subsets under ``path`` (none: ``path`` is one subset); world: which datasets (default: all)."""
    limit: int | None = None
    """Only the first ``limit`` usable rows (a trial run)."""
    frames: str = ""
    """llavahound: the folder holding one frame folder per clip."""
    mode: str = "caption"
    """llavahound: ``caption``, ``video_retrieval`` or ``qa`` (``eval.mmeb.LLAVAHOUND_MODES``)."""

    def __post_init__(self):
        if self.kind not in SOURCES:
            raise ValueError(f"source kind {self.kind!r}: expected one of {SOURCES}")


@dataclass(frozen=True)
class SourceRows:
    rows: list[tuple[str, Input]]
    """(row id, query) pairs; the row id names the subset and the row (``VOC2007 train row 3``)."""
    problems: list[str]
    """One message per skipped row, naming it."""
    digest: str
    """The source's identity: the digest of its table files (MMEB-train) or of ``world.json``."""


def _tables_digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                  and not any(s.startswith(".") for s in p.relative_to(path).parts))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else f.name}|{file_digest(f)}\n".encode())
    return h.hexdigest()[:16]


def source_rows(src: TrainSource) -> SourceRows:
    """The source's training queries, its skipped rows and its digest."""
    path = Path(src.path)
    if not path.exists():
        raise DataError(f"training source {path}: no such file or folder")
    problems: list[str] = []
    rows = [(q.name, q) for q, _, _ in _triples(src, problems)]
    if src.kind == "world":
        digest = world_digest(path)
    elif src.datasets:  # the subsets' tables only (the image folder is not hashed: too large to read each run)
        digest = hashlib.sha256(" ".join(f"{d}:{_tables_digest(path / d)}" for d in src.datasets).encode()
                                ).hexdigest()[:16]
    else:
        digest = _tables_digest(path)
    if src.limit is not None:
        rows = rows[:src.limit]
    if not rows:
        raise DataError(f"training source {path}: no usable row ({len(problems)} skipped: {problems[:3]})")
    return SourceRows(rows, problems, digest)


def worker_specs(hf: Sequence[str], http: Sequence[str], **common) -> list[WorkerSpec | HTTPWorkerSpec]:
    """Worker specs from the command line: ``NAME=CHECKPOINT`` (Hugging Face) and ``NAME=MODEL@URL``
    (OpenAI-compatible); ``common`` settings (prompt, max_new_tokens, temperature, batch_size) go to each
    worker that has them."""
    settable = (set(WorkerSpec.__dataclass_fields__) | set(HTTPWorkerSpec.__dataclass_fields__)) - {
        "name", "checkpoint", "base_url", "model"}
    if set(common) - settable:
        raise RunError(f"unknown worker settings {sorted(set(common) - settable)} (known: {sorted(settable)})")
    specs: list[WorkerSpec | HTTPWorkerSpec] = []
    for text, kind in [(t, "hf") for t in hf] + [(t, "http") for t in http]:
        name, sep, target = text.partition("=")
        model, at, url = target.rpartition("@") if kind == "http" else (target, "@", target)
        if not (sep and name.strip() and target.strip() and at and model.strip() and url.strip()):
            form = "NAME=CHECKPOINT" if kind == "hf" else "NAME=MODEL@URL"
            raise RunError(f"--{kind} {text!r}: expected {form}")
        cls = WorkerSpec if kind == "hf" else HTTPWorkerSpec
        fields = {f for f in cls.__dataclass_fields__}
        extra = {k: v for k, v in common.items() if k in fields}
        if kind == "hf" and extra.get("temperature") == 0:  # temperature 0 means greedy decoding
            extra.update(temperature=1.0, do_sample=False)
        specs.append(WorkerSpec(name.strip(), target.strip(), **extra) if kind == "hf"
                     else HTTPWorkerSpec(name.strip(), url.strip(), model.strip(), **extra))
    if not specs:
        raise RunError("no worker: give --hf NAME=CHECKPOINT and/or --http NAME=MODEL@URL")
    return specs


def _build(spec: WorkerSpec | HTTPWorkerSpec):
    return HTTPWorker(spec) if isinstance(spec, HTTPWorkerSpec) else HFWorker(spec)


def run_rationales(source: TrainSource, specs: Sequence[WorkerSpec | HTTPWorkerSpec], out: str | Path,
                   seed: int = 0, shard_size: int = 64, overwrite: bool = False,
                   progress: bool = True) -> dict[str, GenerationReport]:
    """Every worker over the source's queries, into ``<out>/<worker>/``; returns each worker's report.

    Call it from every rank of a distributed job (it splits the shards); the reports are complete on all.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"worker names must be given and distinct, got {names}")
    data = source_rows(source)
    out = Path(out)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "skipped.json", json.dumps(data.problems, indent=1))
    reports = {}
    for spec in specs:
        manifest = Manifest.make("rationales", {"source": source, "worker": spec, "shard_size": shard_size}, seed,
                                 {"data": data.digest})
        with RunFolder(out / spec.name, manifest, overwrite=overwrite):
            built: dict = {}

            def call(inputs, seed):
                if not built:  # loaded only when a shard is left to write: a finished folder costs no model load
                    built["worker"] = _build(spec)
                return built["worker"](resolve_all(inputs), seed=seed)
            reports[spec.name] = generate_candidates(
                call, data.rows, out / spec.name, manifest.to_json(), shard_size=shard_size, seed=seed,
                rank=distributed.rank(), world_size=distributed.world_size(),
                progress=progress and distributed.is_main())
    return reports


def _worker_folders(rationales_dir: Path) -> list[tuple[str, Manifest]]:
    found = sorted((d.name, Manifest.load(d)) for d in rationales_dir.iterdir() if d.is_dir()) \
        if rationales_dir.is_dir() else []
    found = [(n, m) for n, m in found if m is not None and m.command == "rationales"]
    if not found:
        raise RunError(f"{rationales_dir}: no worker folder written by `mmemb-lab rationales`")
    sources = {json.dumps(m.config["source"], sort_keys=True) for _, m in found}
    if len(sources) > 1 or len({m.inputs["data"] for _, m in found}) > 1:
        raise RunError(f"{rationales_dir}: the workers were run on different sources or data; select needs one")
    return found


def real_pairs(rationales_dir: str | Path, pool_negatives: int = 15, seed: int = 0) -> list[Pair]:
    """The training pairs of a ``rationales`` folder: each row's query, positive and negatives (its own hard
    negative, then positives of other rows of the subset) with one candidate per worker (missing: "absent")."""
    rationales_dir = Path(rationales_dir)
    folders = _worker_folders(rationales_dir)
    raw = folders[0][1].config["source"]
    src = TrainSource(**{**raw, "datasets": tuple(raw.get("datasets") or ())})
    data = source_rows(src)
    if data.digest != folders[0][1].inputs["data"]:
        raise RunError(f"{src.path}: the data changed since its rationales were written ({rationales_dir})")
    triples = {q.name: (q, p, n) for q, p, n in _triples(src)}
    cands = {}
    for name, _ in folders:
        ds = load_candidates(rationales_dir / name)
        cands[name] = dict(zip(ds["row_id"], zip(ds["rationale"], ds["status"], ds["n_tokens"]))) if ds else {}
    rng = np.random.default_rng([seed, 5])
    ids = [r for r, _ in data.rows]
    pairs = []
    for i, rid in enumerate(ids):
        q, p, n = (resolve_all([x])[0] if x is not None else None for x in triples[rid])
        others = [j for j in rng.permutation(len(ids)) if j != i][:pool_negatives]
        negs = ([n] if n is not None else []) + [resolve_all([triples[ids[j]][1]])[0] for j in others]
        negs = [x for x in negs if target_key(x) != target_key(p)]
        rats = [Rationale(w, *cands[w].get(rid, ("", "absent", 0))) for w, _ in folders]
        pairs.append(Pair(None, p, negs, rats, query_input=q, pair_id=rid,
                          dataset_name=rid.rsplit(" train row ", 1)[0]))
    return pairs


def _triples(src: TrainSource, problems: list[str] | None = None):
    """(query, positive, negative or None) of every usable row; skipped rows' messages go to ``problems``."""
    path = Path(src.path)
    if src.kind == "llavahound":
        if not src.frames:
            raise DataError(f"{path}: a llavahound source needs its frames folder (--frames)")
        name = src.subset or (path.stem if src.mode == "caption" else f"{path.stem}-{src.mode}")
        return load_llavahound_rows(path, src.frames, name, src.mode, problems=problems)
    if src.kind == "vidore":
        return load_vidore_rows(path, src.subset or path.stem, problems=problems)
    if src.kind == "mmeb-train" and src.datasets:
        images = Path(src.images) if src.images else path / "images"
        return [t for d in src.datasets for t in load_train_rows(path / d, images, d, split=src.split,
                                                                 problems=problems)]
    if src.kind == "mmeb-train":
        subset = src.subset or (path.stem if path.is_file() else path.name)
        return load_train_rows(path, Path(src.images) if src.images else path.parent / "images", subset,
                               split=src.split, problems=problems)
    return [t for name in src.datasets or sorted(json.loads((path / "world.json").read_text())["datasets"])
            for t in load_train(path / name / "train", path, name)]


def select_rationales(rationales_dir: str | Path, evaluator: Backbone | str, out: str | Path,
                      variant: str = "swap", tau: float = TAU, pool_negatives: int = 15, seed: int = 0,
                      overwrite: bool = False) -> dict:
    """Counterfactual selection over a ``rationales`` folder with ``evaluator`` (a backbone or a checkpoint);
    writes ``<out>/selected.jsonl`` and returns the summary (kept share, share per worker)."""
    rationales_dir = Path(rationales_dir)
    folders = _worker_folders(rationales_dir)
    bb = load_backbone(evaluator) if isinstance(evaluator, str) else evaluator
    manifest = Manifest.make("select", {"rationales": str(rationales_dir), "variant": variant, "tau": tau,
                                        "pool_negatives": pool_negatives}, seed,
                             {"evaluator": weights_digest(bb.model),
                              **{f"rationales/{n}": m.digest() for n, m in folders}})
    out = Path(out)
    with RunFolder(out, manifest, overwrite=overwrite):
        if (out / "summary.json").exists():
            return json.loads((out / "summary.json").read_text())
        pairs = real_pairs(rationales_dir, pool_negatives, seed)
        table = score_pairs(bb, pairs)
        sel = select(table, variant, tau, prior=worker_prior(table))
        gains = table.gains(variant)
        rows = [{"row_id": p.id, "dataset": p.dataset, "worker": None if c < 0 else table.workers[c],
                 "rationale": sel.rationale(i), "gain": None if c < 0 else float(gains[i, c]),
                 "logp_direct": float(table.logp_direct[i])} for i, (p, c) in enumerate(zip(pairs, sel.choice))]
        summary = {"pairs": len(pairs), "kept": float(np.mean(sel.selected())),
                   "share_by_worker": sel.share_by_worker(),
                   "usable_by_worker": {w: float(np.mean(table.valid[:, j])) for j, w in enumerate(table.workers)}}
        if distributed.is_main():
            atomic_write_text(out / "selected.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


__all__ = ["TrainSource", "SourceRows", "source_rows", "worker_specs", "run_rationales", "real_pairs",
           "select_rationales", "SOURCES"]
