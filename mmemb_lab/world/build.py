"""Write the toy world to disk in the real MMEB schemas, so one set of loaders reads it and real MMEB.

Layout of a world folder (``worlds/<preset>-seed<k>/`` by default)::

    world.json                      what was generated: seed, sizes, per-dataset modality / meta-task / counts
    <dataset>/train/                MMEB-train schema: qry, qry_image_path, pos_text, pos_image_path,
                                    neg_text, neg_image_path  (+ analysis columns)
    <dataset>/eval/                 local tasks, MMEB-eval with the instruction split out (VLM2Vec-V2):
                                    qry_inst, qry_text, qry_img_path, tgt_inst, tgt_text[], tgt_img_path[]
    <dataset>/{queries,corpus,qrels}/  global tasks, BEIR layout: query-id, query / corpus-id, image /
                                    query-id, corpus-id, score
    <dataset>/val/                  the validation split in the same layout (local: eval schema; global:
                                    val/{queries,corpus,qrels} with its own pool), disjoint item streams
    images/..., videos/<dataset>/<split>/<id>/frame_<t>.png

Analysis-only columns (never shown to a model): ``labels`` (positive candidate indices; candidates are
shuffled, unlike MMEB where the positive comes first), ``needs_reasoning``, ``gold_steps``, ``answer``,
``item_id``. Image paths are relative to the world folder. Same seed => identical records and
byte-identical images. The folder is written under a temporary name and renamed when complete.

Used by: the demo, the evaluation harness, notebooks 00/01; ``mmemb-lab world --help``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..data import DataError, eval_split_dir, to_pil
from .scenes import Obj, Page, Scene, Video, random_page, random_video
from .tasks import DATASETS, HARD_FRACTION, Item, item_rng, make_item, relevant

log = logging.getLogger(__name__)
IMAGE_PLACEHOLDER = "<|image_1|>"


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    """Seed of every item (each item has its own stream: (seed, dataset, split, index))."""
    n_train: int = 256
    """Training pairs per dataset (MMEB-train schema)."""
    n_eval: int = 100
    """Evaluation queries per dataset (global tasks: also the pool size)."""
    n_val: int = 50
    """Validation queries per dataset, in the evaluation layout (``<dataset>/val``; global tasks with their
    own pool), from their own item streams: settings chosen by measurement are chosen on these; the
    evaluation split only reports."""
    hard_fraction: float = HARD_FRACTION
    """Share of hard (multi-hop) items; the world is meant to hold roughly 60-75% hard items."""

    def __post_init__(self):
        if not 0 <= self.hard_fraction <= 1 or self.n_eval < 1 or self.n_train < 0 or self.n_val < 0:
            raise ValueError(f"invalid world config: {self}")


WORLD_VERSION = "toy-world-v4"
"""Bumped whenever items change for the same config (v2: decoy chains, near-miss videos in the pool; v3: one
wording for easy and hard visual items; v4: a validation split, train and eval items unchanged)."""


class _Writer:
    """Saves visuals once each (PNG; videos as frame folders) and returns their relative paths."""

    def __init__(self, root: Path):
        self.root = root
        self.seen: dict[str, str] = {}

    def save(self, visual, rel: str) -> str:
        if visual is None:
            return ""
        if isinstance(visual, Obj):  # object crops are shared by every grounding item
            rel = f"images/objects/{visual.colour}_{visual.shape}"
            if rel in self.seen:
                return self.seen[rel]
        if isinstance(visual, Video):
            d = self.root / rel
            d.mkdir(parents=True, exist_ok=True)
            for t, im in enumerate(to_pil(visual)):
                im.save(d / f"frame_{t}.png", format="PNG")
            self.seen[rel] = rel
            return rel
        path = self.root / (rel + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(visual).save(path, format="PNG")
        self.seen[rel] = rel + ".png"
        return rel + ".png"


def _vis_rel(item: Item, name: str, split: str, tag: str, visual) -> str:
    kind = "videos" if isinstance(visual, Video) else "images"
    return f"{kind}/{name}/{split}/{item.item_id}{tag}"


def _analysis(item: Item) -> dict:
    return {"item_id": item.item_id, "needs_reasoning": item.needs_reasoning, "gold_steps": list(item.gold_steps),
            "answer": item.answer}


def _train_rows(name: str, cfg: WorldConfig, w: _Writer) -> dict[str, list]:
    rows: dict[str, list] = {k: [] for k in ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text",
                                              "neg_image_path", "item_id", "needs_reasoning", "gold_steps", "answer")}
    for i in range(cfg.n_train):
        it = make_item(name, cfg.seed, "train", i, cfg.hard_fraction)
        qimg = w.save(it.query_visual, _vis_rel(it, name, "train", "", it.query_visual))
        pos = it.candidates[it.labels[0]]
        neg_j = next((j for j in range(len(it.candidates)) if j not in it.labels), None)
        if neg_j is not None:
            neg = it.candidates[neg_j]
        else:  # global tasks: a fresh page / video from the same distribution as the negative
            r = item_rng(cfg.seed, name, "train", 1_000_000 + i)
            neg = ("", random_page(r) if isinstance(pos[1], Page) else random_video(r))
        body = "\n".join(x for x in (it.query_inst, it.query_text) if x)
        rows["qry"].append(f"{IMAGE_PLACEHOLDER}\n{body}" if qimg else body)
        rows["qry_image_path"].append(qimg)
        rows["pos_text"].append(pos[0])
        rows["pos_image_path"].append(w.save(pos[1], _vis_rel(it, name, "train", "_pos", pos[1])))
        rows["neg_text"].append(neg[0])
        rows["neg_image_path"].append(w.save(neg[1], _vis_rel(it, name, "train", "_neg", neg[1])))
        for k, v in _analysis(it).items():
            rows[k].append(v)
    return rows


def _local_eval_rows(name: str, cfg: WorldConfig, w: _Writer, split: str = "eval",
                     n: int | None = None) -> tuple[dict[str, list], list[Item]]:
    rows: dict[str, list] = {k: [] for k in ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text",
                                              "tgt_img_path", "labels", "item_id", "needs_reasoning",
                                              "gold_steps", "answer")}
    items = []
    for i in range(cfg.n_eval if n is None else n):
        it = make_item(name, cfg.seed, split, i, cfg.hard_fraction)
        items.append(it)
        rows["qry_inst"].append(it.query_inst)
        rows["qry_text"].append(it.query_text)
        rows["qry_img_path"].append(w.save(it.query_visual, _vis_rel(it, name, split, "", it.query_visual)))
        rows["tgt_inst"].append(it.target_inst)
        rows["tgt_text"].append([t for t, _ in it.candidates])
        rows["tgt_img_path"].append([w.save(v, _vis_rel(it, name, split, f"_c{j}", v))
                                     for j, (_, v) in enumerate(it.candidates)])
        rows["labels"].append(list(it.labels))
        for k, v in _analysis(it).items():
            rows[k].append(v)
    return rows, items


def _global_eval_rows(name: str, cfg: WorldConfig, w: _Writer, split: str = "eval",
                      n: int | None = None) -> tuple[dict[str, dict[str, list]], list[Item]]:
    items = [make_item(name, cfg.seed, split, i, cfg.hard_fraction) for i in range(cfg.n_eval if n is None else n)]
    corpus = {"corpus-id": [], "image": [], "tgt_inst": []}
    pool = []
    for it in items:  # each item's target, then its near misses (hard video retrieval)
        for j, target in enumerate((it.candidates[0][1], *it.meta.get("distractors", ()))):
            suffix = "_target" if j == 0 else f"_near{j}"
            corpus["corpus-id"].append(f"c-{it.item_id}" + ("" if j == 0 else f"-near{j}"))
            corpus["image"].append(w.save(target, _vis_rel(it, name, split, suffix, target)))
            corpus["tgt_inst"].append(it.target_inst)
            pool.append(target)
    queries = {"query-id": [], "query": [], "qry_inst": [], "item_id": [], "needs_reasoning": [],
               "gold_steps": [], "answer": []}
    qrels = {"query-id": [], "corpus-id": [], "score": []}
    for it in items:
        queries["query-id"].append(f"q-{it.item_id}")
        queries["query"].append(it.query_text)
        queries["qry_inst"].append(it.query_inst)
        for k, v in _analysis(it).items():
            queries[k].append(v)
        for cid, target in zip(corpus["corpus-id"], pool):
            if relevant(it, target):  # every pool entry that satisfies the query is relevant
                qrels["query-id"].append(f"q-{it.item_id}")
                qrels["corpus-id"].append(cid)
                qrels["score"].append(1)
    return {"queries": queries, "corpus": corpus, "qrels": qrels}, items


def _save(rows: dict[str, list], path: Path) -> None:
    from datasets import Dataset

    Dataset.from_dict(rows).save_to_disk(str(path))


def build_world(root: str | Path, cfg: WorldConfig = WorldConfig(), progress: bool = True,
                overwrite: bool = False) -> dict:
    """Generate the world into ``root`` (atomically) and return its ``world.json`` content.

    ``world.json`` is the world's manifest (code version and config). A folder that already holds this
    world is reused; one that holds another world, or files this tool did not write, is refused unless
    ``overwrite``, which moves it aside (``runs.move_aside``): nothing is ever deleted that the tool did
    not write. A world written by an older version of this code is moved aside and regenerated.
    """
    from tqdm.auto import tqdm

    from ..runs import RunMismatch, move_aside

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        try:
            info = json.loads((root / "world.json").read_text()) if (root / "world.json").exists() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            info = {"version": "unreadable world.json"}
        if info is None:
            if not overwrite:
                raise RunMismatch(f"{root} holds files this tool did not write (no world.json); "
                                  "use another --out, or --overwrite to move them aside")
            move_aside(root)
        elif info.get("version") != WORLD_VERSION:  # written by an older version of this code: regenerate
            log.info("%s holds %s; regenerating it as %s", root, info.get("version"), WORLD_VERSION)
            move_aside(root)
        elif info["config"] == cfg.__dict__:
            return info
        elif not overwrite:
            diff = {k: (info["config"].get(k), v) for k, v in cfg.__dict__.items() if info["config"].get(k) != v}
            raise RunMismatch(f"{root} holds a world with another config {diff}; use another folder, or "
                              "--overwrite to move it aside")
        else:
            move_aside(root)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")  # one per writer: concurrent builds never mix
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    w = _Writer(tmp)
    info: dict = {"version": WORLD_VERSION, "config": dict(cfg.__dict__), "datasets": {}}
    for name in tqdm(sorted(DATASETS), desc="world", disable=not progress):
        _, modality, meta_task, eval_type = DATASETS[name]
        _save(_train_rows(name, cfg, w), tmp / name / "train")
        for split, n in (("eval", cfg.n_eval), ("val", cfg.n_val)):
            if n == 0:
                continue
            where = eval_split_dir(tmp, name, eval_type, split)
            if eval_type == "local":
                rows, split_items = _local_eval_rows(name, cfg, w, split, n)
                _save(rows, where)
                n_split_cand = len(split_items[0].candidates)
            else:
                parts, split_items = _global_eval_rows(name, cfg, w, split, n)
                for part, rows in parts.items():
                    _save(rows, where / part)
                n_split_cand = len(parts["corpus"]["corpus-id"])
            if split == "eval":
                items, n_cand = split_items, n_split_cand
        info["datasets"][name] = {
            "modality": modality, "meta_task": meta_task, "eval_type": eval_type, "n_eval": len(items),
            "n_candidates": n_cand, "metric": "ndcg@5" if modality == "visdoc" else "hit@1",
            "hard_fraction": sum(it.needs_reasoning for it in items) / len(items), "n_val": cfg.n_val,
        }
    (tmp / "world.json").write_text(json.dumps(info, indent=1))
    if root.exists():  # empty, or the same world finished meanwhile by another writer
        shutil.rmtree(root)
    os.replace(tmp, root)
    log.info("wrote the toy world to %s", root)
    return info


def read_world_info(root: str | Path, flag: str = "world") -> dict:
    """A world's ``world.json``, or a ``DataError`` naming the folder or file and the way out."""
    path = Path(root) / "world.json"
    if not Path(root).is_dir():
        raise DataError(f"{flag} {root}: no such folder (make one with `mmemb-lab world --out {root}`)")
    if not path.exists():
        raise DataError(f"{flag} {root}: not a toy world (no world.json; make one with `mmemb-lab world`)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: truncated or corrupt ({e}); regenerate the world with "
                        f"`mmemb-lab world --out {root} --overwrite`") from e


def toy_registry(info: dict):
    """The world's datasets as ``registry.DatasetInfo`` (for the MMEB-style aggregation)."""
    from ..data import DatasetInfo

    return {name: DatasetInfo(name, d["modality"], d["meta_task"], d["metric"], d["eval_type"], "toy-world",
                              "") for name, d in info["datasets"].items()}


__all__ = ["WorldConfig", "build_world", "read_world_info", "toy_registry", "Page", "Scene"]
