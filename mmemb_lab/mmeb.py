"""Real MMEB-V2 data: where it comes from, how it lies on disk, and how it becomes ``data.EvalSet``.

Concept
    MMEB-V2 (docs/method.md, MMEB-V2) stores its 78 evaluation sets in three shapes, and MMEB-train in
    a fourth. Each loader here reads one shape, exactly as published, into the objects the rest of the
    workbench already speaks: an :class:`MMEBSet` (a ``data.EvalSet``: queries, a deduplicated candidate
    table, graded relevance) or MMEB-train triples of ``embed.Input``. ``scoring.score_set`` and the
    harness then score the toy world and the real benchmark with the same code.

    - **Image tasks** (``TIGER-Lab/MMEB-eval``, split ``test``), *local*: each row is one query and its own
      candidate list, **the positive first**. Two column sets exist: the merged one (``qry_text`` holds
      the instruction and a Phi-3 style ``<|image_1|>`` placeholder; ``qry_img_path``, ``tgt_text[]``,
      ``tgt_img_path[]``) and the instruction-split one VLM2Vec-V2 loads (``qry_inst, qry_text,
      qry_img_path, tgt_inst, tgt_text[], tgt_img_path[]``). Candidates are deduplicated across rows by
      (instruction, text, image path), as the reference keys its embeddings by (text, path).
    - **Video tasks**: frames are pre-extracted (one folder per clip); 8 are sampled uniformly, with the
      reference's rule (natural sort of file names, ``linspace(0, n-1, 8)`` truncated to ints; a clip
      with fewer than 8 frames keeps them all). Three annotation column sets are read:
      *local* (the instruction-split image schema above, paths naming frame folders: video QA, MRET,
      SSv2), *global classification* (``video_id``, ``pos_text``; the pool is every label, plus the
      lines of an optional ``labels.txt``) and *global retrieval* (``video_id``, ``caption`` - a string
      or a list; each caption is one query, the pool is every distinct clip).
    - **Visual documents**: BEIR layout, configs ``queries`` (``query-id``, ``query``), ``corpus``
      (``corpus-id``, ``image``: an image object, encoded bytes, a ``{"bytes", "path"}`` struct, or a
      path) and ``qrels`` (``query-id``, ``corpus-id``, ``score``: graded relevance), *global*.
    - **MMEB-train** (``TIGER-Lab/MMEB-train``, splits ``original`` / ``diverse_instruction``): ``qry``
      (instruction merged, with the placeholder), ``qry_image_path``, ``pos_text``, ``pos_image_path``,
      optional ``neg_text`` / ``neg_image_path``.

    Visuals are *lazy* (:class:`LazyVisual`): a loader checks that files and frames exist, and the
    pixels are read just before embedding (:func:`resolve`), so a 1000-page corpus or 100k candidate
    images never sit in memory at once. An image that exists but cannot be decoded is therefore
    reported by the harness at embedding time (with its dataset and row), not here.

Local layout (what :func:`download` writes, and what a hand-made copy must look like)::

    DIR/mmeb_v2.json                   manifest: repo, revision, commit and split version per dataset
    DIR/image/<dataset>/               MMEB-eval annotations: parquet file(s), *.jsonl, or a
                                       ``datasets.save_to_disk`` folder
    DIR/image/images/                  image files; ``qry_img_path`` / ``tgt_img_path`` are relative to it
    DIR/video/<dataset>/               annotations in one of the three video column sets (placed here by
                                       hand or a converter: ``download`` only fetches the Hub's files)
    DIR/video/frames/                  frame folders (``download`` unpacks them to video-tasks/frames/,
                                       which is used when frames/ is absent); local rows name a folder
                                       relative to it, global rows by ``[<archive>/]<dataset>/<video_id>``
                                       with <archive> one of video_cls, video_ret, ...
    DIR/visdoc/<dataset>/{queries,corpus,qrels}/   BEIR configs; a corpus path is relative to
                                       ``DIR/visdoc/<dataset>/``
    DIR/train/<subset>/                MMEB-train rows; images under ``DIR/train/images/``

Used by: the harness (``mmemb_lab.harness.MMEBSource``), ``mmemb-lab data download mmeb-v2`` and
``mmemb-lab benchmark --benchmark mmeb-v2``, notebook 06; tests/test_mmeb.py writes a fixture in every
schema.

Deviations from the reference (VLM2Vec) and limits, known:

- Video annotations live in per-dataset Hub repos with per-dataset columns, and the reference has one
  parser per dataset. We read the three column sets above; converting a dataset whose annotation file
  uses other columns (e.g. multiple-choice QA with an options list) into the local schema is not done
  here. ``download`` fetches the frame archives and ``video-tasks/data`` of ``TIGER-Lab/MMEB-V2``.
- ViDoRe v2 ``*_multilingual`` keep every language (the reference's ``lang=None``); the English-only
  variants are not in the registry.
- A query whose qrels are all missing is skipped and reported (the reference would stop on a KeyError).
- The reference materialises each visdoc page as ``<corpus-id>.png`` before loading; we decode the
  stored bytes directly (same pixels for PNG sources).
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from .data import (
    BEIR_COLUMNS,
    TRAIN_COLUMNS,
    DataError,
    EvalQuery,
    EvalSet,
    natural_key,
    open_image,
    sample_frame_indices,
    strip_placeholders,
)
from .embed import Input
from .registry import MMEB_V2, DatasetInfo

__all__ = [
    "LazyVisual", "MMEBSet", "resolve", "resolve_all", "sample_frame_indices", "read_rows",
    "load_image_eval", "load_video_eval", "load_visdoc_eval", "load_train_rows", "load_dataset",
    "dataset_dir", "images_folder", "video_frames_folder", "split_version", "download", "download_plan",
    "MANIFEST", "TARGET_INSTRUCTIONS", "IMAGE_EXTENSIONS",
]

log = logging.getLogger(__name__)

MANIFEST = "mmeb_v2.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TARGET_INSTRUCTIONS = {  # candidate-side instructions of the reference prompts (video, visdoc)
    "video": "Understand the content of the provided video.",
    "visdoc": "Understand the content of the provided document image.",
}
_FRAME_NUMBER = re.compile(r"(\d+)$")


# ---------------------------------------------------------------------------------------------
# lazy visuals


@dataclass(frozen=True)
class LazyVisual:
    """An image or a sampled frame sequence, read from disk (or decoded from bytes) only when needed."""

    kind: str
    """``"file"`` (one image file), ``"bytes"`` (encoded image bytes) or ``"frames"`` (sampled frame files)."""
    ref: str | bytes | tuple[str, ...]
    """The path, the bytes, or the sampled frame paths in temporal order."""
    where: str
    """Dataset and row it came from, for error messages."""

    def load(self) -> Image.Image | list[Image.Image]:
        if self.kind == "frames":
            return [_open_file(Path(p), self.where) for p in self.ref]
        if self.kind == "file":
            return _open_file(Path(self.ref), self.where)
        try:
            with Image.open(io.BytesIO(self.ref)) as im:
                im.load()
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises several types for corrupt data
            raise DataError(f"{self.where}: corrupt or unreadable image bytes ({e})") from e

    def identity(self) -> str:
        """A short stable id (paths, or a digest of the bytes), for cache fingerprints."""
        if self.kind == "bytes":
            import hashlib

            return "bytes:" + hashlib.sha1(self.ref).hexdigest()
        return f"{self.kind}:{self.ref}"

    def __repr__(self) -> str:  # bytes can be megabytes; never print them
        return f"LazyVisual({self.identity()!r})"


def _open_file(path: Path, where: str) -> Image.Image:
    return open_image(path, where)


def resolve(inp: Input) -> Input:
    """The same input with its lazy visual read (a no-op for inputs that hold PIL images already)."""
    v = inp.visual
    if isinstance(v, LazyVisual):
        return replace(inp, visual=v.load())
    if isinstance(v, (list, tuple)) and any(isinstance(x, LazyVisual) for x in v):
        out = []
        for x in v:
            y = x.load() if isinstance(x, LazyVisual) else x
            out.extend(y if isinstance(y, list) else [y])
        return replace(inp, visual=out)
    return inp


def resolve_all(inputs: Iterable[Input]) -> list[Input]:
    return [resolve(x) for x in inputs]


def frames_visual(folder: Path, where: str) -> LazyVisual:
    """Check a frames folder (exists, has frames, no gap in the frame numbers) and sample 8 of them."""
    if not folder.is_dir():
        raise DataError(f"{where}: missing video frames folder {folder}")
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
                    key=lambda p: natural_key(p.name))
    if not frames:
        raise DataError(f"{where}: video folder {folder} has no frames")
    numbers = [_FRAME_NUMBER.search(p.stem) for p in frames]
    if all(numbers):
        nums = [int(m.group(1)) for m in numbers]
        gaps = sorted(set(range(nums[0], nums[-1] + 1)) - set(nums))
        if gaps:
            raise DataError(f"{where}: missing frame(s) {gaps[:5]} in video folder {folder}")
    picked = [frames[i] for i in sample_frame_indices(len(frames))]
    return LazyVisual("frames", tuple(str(p) for p in picked), where)


def visual_from(value, base: Path, where: str, video: bool = False):
    """A column value -> None, a PIL image, or a :class:`LazyVisual` (existence checked now)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (bytes, bytearray)):
        return LazyVisual("bytes", bytes(value), where)
    if isinstance(value, dict):  # a datasets Image struct, undecoded
        if value.get("bytes"):
            return LazyVisual("bytes", bytes(value["bytes"]), where)
        return visual_from(value.get("path"), base, where, video)
    path = Path(value) if Path(value).is_absolute() else base / value
    if path.is_dir() or (video and not path.suffix):
        return frames_visual(path, where)
    if not path.exists():
        raise DataError(f"{where}: missing image file {path}")
    return LazyVisual("file", str(path), where)


# ---------------------------------------------------------------------------------------------
# tables


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def read_rows(path: str | Path, split: str | None = None) -> list[dict]:
    """Rows of a table: a ``save_to_disk`` folder, parquet file(s) or json(l) files in a folder, or one file.

    ``split`` keeps the files whose name starts with it (Hub parquet files are ``<split>-00000-of-...``)
    when any does. Image columns come back undecoded (bytes / path structs), never as decoded pixels.
    """
    path = Path(path)
    if _is_saved_dataset(path):
        from datasets import Image as ImageFeature
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict: the split asked for, else the only / first one
            ds = ds[split] if split in ds else ds[next(iter(ds))]
        for col, feat in ds.features.items():
            if isinstance(feat, ImageFeature):
                ds = ds.cast_column(col, ImageFeature(decode=False))
        return ds.to_list()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json")
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    else:
        files = []
    if split is not None and any(p.name.startswith(split) for p in files):
        files = [p for p in files if p.name.startswith(split)]
    if not files:
        raise DataError(f"{path}: no table found (expected parquet, jsonl or a save_to_disk folder)")
    rows: list[dict] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(f).to_pylist())
        elif f.suffix == ".jsonl":
            rows.extend(json.loads(line) for line in f.read_text().splitlines() if line.strip())
        else:  # a .json table is a list of rows or {"data": [...]}; other json files are metadata
            data = json.loads(f.read_text())
            rows.extend(data if isinstance(data, list) else data.get("data", []) if isinstance(data, dict) else [])
    return rows


def _check_columns(rows: list[dict], required: Sequence[str], where: str) -> None:
    if not rows:
        raise DataError(f"{where}: empty table")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise DataError(f"{where}: wrong schema, missing column(s) {missing}; has {sorted(rows[0])}")


@dataclass(frozen=True)
class MMEBSet(EvalSet):
    """An ``EvalSet`` plus what was wrong with the data and which split version it is."""

    problems: tuple[str, ...] = ()
    """One message per skipped record (or duplicate qrels row merged into its pair), naming the dataset and row."""
    version: str = ""
    """Split version of the data (``repo@commit`` where known); stored with every score."""


class _Skipper:
    """Collects bad records: raises in strict mode, else counts them with their message."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.problems: list[str] = []

    def __call__(self, err: DataError) -> None:
        if self.strict:
            raise err
        log.warning("skipping: %s", err)
        self.problems.append(str(err))


# ---------------------------------------------------------------------------------------------
# evaluation loaders


def _local_rows(rows: list[dict], name: str, media_root: Path, skip: _Skipper, video: bool = False,
                default_tgt_inst: str = "") -> tuple[list[EvalQuery], dict[str, Input]]:
    """Rows with a per-query candidate list, the positive first (image tasks; local video tasks).

    ``default_tgt_inst`` instructs the visual candidates (clips) of a row without ``tgt_inst``; text-only
    candidates keep none, as the reference gives answer options (video QA, SSv2) no instruction.
    """
    split = "qry_inst" in rows[0]
    queries: list[EvalQuery] = []
    cands: dict[str, Input] = {}
    for i, r in enumerate(rows):
        where = f"{name} row {i}"
        try:
            texts = list(r.get("tgt_text") or [])
            paths = list(r.get("tgt_img_path") or [])
            n = max(len(texts), len(paths))
            if n == 0:
                raise DataError(f"{where}: empty candidate list")
            if texts and paths and len(texts) != len(paths):
                raise DataError(f"{where}: {len(texts)} candidate texts but {len(paths)} candidate images")
            q_inst = strip_placeholders(r.get("qry_inst") or "") if split else ""
            q = Input(strip_placeholders(r.get("qry_text") or ""),
                      visual_from(r.get("qry_img_path"), media_root, where, video), q_inst, None, where)
            if not q.text and not q.instruction and q.visual is None:
                raise DataError(f"{where}: empty query (no text, no image)")
            row_inst = strip_placeholders(r.get("tgt_inst") or "")
            keys, new = [], {}
            for j in range(n):
                t = strip_placeholders(texts[j]) if j < len(texts) else ""
                p = paths[j] if j < len(paths) else ""
                t_inst = row_inst or (default_tgt_inst if p else "")
                key = f"{t_inst}|{t}|{p}"
                if key not in cands and key not in new:
                    c = Input(t, visual_from(p, media_root, f"{where} candidate {j}", video), t_inst, None,
                              f"{where} candidate {j}")
                    if not c.text and c.visual is None:
                        raise DataError(f"{where}: candidate {j} is empty (no text, no image)")
                    new[key] = c
                keys.append(key)
        except DataError as e:
            skip(e)
            continue
        cands.update(new)  # only rows that loaded completely add candidates
        queries.append(EvalQuery(q, tuple(keys), {keys[0]: 1.0}, item_id=str(r.get("qry_id", i))))
    return queries, cands


def load_image_eval(path: str | Path, image_root: str | Path, name: str, *, strict: bool = False,
                    version: str = "") -> MMEBSet:
    """One MMEB-eval image dataset (merged or instruction-split columns), local candidates, positive first."""
    rows = read_rows(path, split="test")
    _check_columns(rows, ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"), f"{name} ({path})")
    skip = _Skipper(strict)
    queries, cands = _local_rows(rows, name, Path(image_root), skip)
    return MMEBSet(name, queries, cands, "local", len(skip.problems), tuple(skip.problems), version)


def _clip_folder(frames_root: Path, info: DatasetInfo, video_id: str) -> Path:
    """``<archive>/<dataset>/<video_id>`` when that exists (the Hub archives' layout), else ``<dataset>/<video_id>``."""
    nested = frames_root / _VIDEO_ARCHIVE.get(info.meta_task, "") / info.name / video_id
    return nested if nested.is_dir() else frames_root / info.name / video_id


def video_frames_folder(root: str | Path) -> Path:
    """``DIR/video/frames``, or where ``download`` unpacked the frame archives."""
    root = Path(root)
    mine = root / "video" / "frames"
    hub = root / "video" / "video-tasks" / "frames"
    return mine if mine.is_dir() or not hub.is_dir() else hub


def load_video_eval(path: str | Path, frames_root: str | Path, info: DatasetInfo, *, strict: bool = False,
                    version: str = "") -> MMEBSet:
    """One video dataset: local rows (frame-folder paths), or global classification / retrieval rows."""
    name, path, frames_root = info.name, Path(path), Path(frames_root)
    rows = read_rows(path, split="test")
    skip = _Skipper(strict)
    tgt_inst = TARGET_INSTRUCTIONS["video"]
    if rows and "tgt_text" in rows[0]:
        _check_columns(rows, ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"), f"{name} ({path})")
        queries, cands = _local_rows(rows, name, frames_root, skip, video=True, default_tgt_inst=tgt_inst)
        queries = [replace(q, query=replace(q.query, instruction=q.query.instruction or info.instruction))
                   for q in queries]
        return MMEBSet(name, queries, cands, "local", len(skip.problems), tuple(skip.problems), version)
    _check_columns(rows, ("video_id",), f"{name} ({path})")
    queries: list[EvalQuery] = []
    cands: dict[str, Input] = {}
    if "pos_text" in rows[0]:  # classification: the video is the query, every label a candidate
        labels_file = path / "labels.txt" if path.is_dir() else path.with_name("labels.txt")
        extra = [x.strip() for x in labels_file.read_text().splitlines() if x.strip()] if labels_file.exists() else []
        for lab in extra + [str(r["pos_text"]).strip() for r in rows]:
            if lab and lab not in cands:
                cands[lab] = Input(lab, None, "", None, f"{name} label {lab!r}")
        for i, r in enumerate(rows):
            where = f"{name} row {i}"
            try:
                lab = str(r["pos_text"]).strip()
                if not lab:
                    raise DataError(f"{where}: empty label")
                vis = frames_visual(_clip_folder(frames_root, info, str(r["video_id"])), where)
            except DataError as e:
                skip(e)
                continue
            queries.append(EvalQuery(Input("", vis, info.instruction, None, where), (), {lab: 1.0},
                                     item_id=str(r["video_id"])))
    elif "caption" in rows[0]:  # retrieval: each caption is a query, every distinct clip a candidate
        good: dict[str, bool] = {}
        n_captions: dict[str, int] = {}  # a clip's captions are numbered over all its rows: unique ids
        for i, r in enumerate(rows):
            where = f"{name} row {i}"
            vid = str(r["video_id"])
            if vid not in good:
                try:
                    cands[vid] = Input("", frames_visual(_clip_folder(frames_root, info, vid), where), tgt_inst, None,
                                       f"{name} video {vid}")
                    good[vid] = True
                except DataError as e:
                    good[vid] = False
                    skip(e)
                    continue
            if not good[vid]:
                continue
            caps = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
            for c, cap in enumerate(caps):
                number = n_captions.get(vid, 0)
                n_captions[vid] = number + 1
                if not str(cap).strip():
                    skip(DataError(f"{where}: empty caption {c}"))
                    continue
                queries.append(EvalQuery(Input(str(cap), None, info.instruction, None, f"{where} caption {c}"),
                                         (), {vid: 1.0}, item_id=f"{vid}#{number}"))
    else:
        raise DataError(f"{name} ({path}): unknown video schema; columns {sorted(rows[0])} (expected tgt_text, "
                        "pos_text or caption)")
    keys = tuple(cands)
    queries = [replace(q, candidates=keys) for q in queries]
    return MMEBSet(name, queries, cands, "global", len(skip.problems), tuple(skip.problems), version)


def load_visdoc_eval(path: str | Path, info: DatasetInfo, *, strict: bool = False, version: str = "") -> MMEBSet:
    """One visual-document dataset in BEIR layout: every page a candidate of every query, graded qrels.

    A (query, page) pair listed twice keeps its highest grade, as the reference's qrels loader does; each
    duplicate row is logged, counted and named in ``problems`` (also in strict mode: the rule is defined).
    """
    name, path = info.name, Path(path)
    parts = {}
    for part, cols in BEIR_COLUMNS.items():
        rows = read_rows(path / part, split=None)
        _check_columns(rows, cols, f"{name} ({path / part})")
        parts[part] = rows
    skip = _Skipper(strict)
    cands: dict[str, Input] = {}
    tgt_inst = TARGET_INSTRUCTIONS["visdoc"]
    for i, r in enumerate(parts["corpus"]):
        where = f"{name} corpus row {i}"
        cid = str(r["corpus-id"])
        try:
            vis = visual_from(r["image"], path, where)
            if vis is None:
                raise DataError(f"{where}: corpus-id {cid!r} has no image")
        except DataError as e:
            skip(e)
            continue
        cands[cid] = Input("", vis, tgt_inst, None, f"{name} corpus {cid}")
    qrels: dict[str, dict[str, float]] = {}
    duplicates = 0
    for i, r in enumerate(parts["qrels"]):
        cid, qid = str(r["corpus-id"]), str(r["query-id"])
        if cid not in cands:
            skip(DataError(f"{name} qrels row {i}: corpus-id {cid!r} is not in the corpus"))
            continue
        grade = float(r["score"])
        if grade < 0:
            skip(DataError(f"{name} qrels row {i}: negative relevance {grade}"))
            continue
        before = qrels.setdefault(qid, {}).get(cid)
        if before is not None:
            skip.problems.append(f"{name} qrels row {i}: duplicate pair (query-id {qid!r}, corpus-id {cid!r}), "
                                 f"grade {grade:g} after {before:g}: kept {max(before, grade):g}")
            duplicates += 1
            grade = max(before, grade)
        qrels[qid][cid] = grade
    if duplicates:
        log.warning("%s: %d duplicate qrels row(s) (a query-page pair listed again); kept the highest grade of each",
                    name, duplicates)
    keys = tuple(cands)
    queries: list[EvalQuery] = []
    for i, r in enumerate(parts["queries"]):
        where = f"{name} query row {i}"
        qid, text = str(r["query-id"]), str(r["query"] or "")
        if not text.strip():
            skip(DataError(f"{where}: empty query text"))
            continue
        if not any(g > 0 for g in qrels.get(qid, {}).values()):
            skip(DataError(f"{where}: query-id {qid!r} has no relevant document in the qrels"))
            continue
        queries.append(EvalQuery(Input(text, None, info.instruction, None, where), keys, qrels[qid], item_id=qid))
    return MMEBSet(name, queries, cands, "global", len(skip.problems), tuple(skip.problems), version)


def load_train_rows(path: str | Path, image_root: str | Path, name: str, split: str = "original",
                    strict: bool = False) -> list[tuple[Input, Input, Input | None]]:
    """MMEB-train rows -> (query, positive, negative or None) triples; visuals lazy (see :func:`resolve`)."""
    rows = read_rows(path, split=split)
    _check_columns(rows, TRAIN_COLUMNS, f"{name} ({path})")
    root, skip, out = Path(image_root), _Skipper(strict), []
    for i, r in enumerate(rows):
        where = f"{name} train row {i}"
        try:
            q = Input(strip_placeholders(r["qry"] or ""), visual_from(r["qry_image_path"], root, where), "", None,
                      where)
            p = Input(strip_placeholders(r["pos_text"] or ""), visual_from(r["pos_image_path"], root, where), "",
                      None, where + " (pos)")
            n = None
            if r.get("neg_text") or r.get("neg_image_path"):
                n = Input(strip_placeholders(r.get("neg_text") or ""),
                          visual_from(r.get("neg_image_path"), root, where), "", None, where + " (neg)")
            for x in (q, p) + ((n,) if n else ()):
                if not x.text and x.visual is None:
                    raise DataError(f"{x.name}: empty text and no image")
        except DataError as e:
            skip(e)
            continue
        out.append((q, p, n))
    return out


# ---------------------------------------------------------------------------------------------
# one entry point per dataset, the manifest, and the download


def dataset_dir(root: str | Path, info: DatasetInfo) -> Path:
    """Where dataset ``info`` lives under a local MMEB-V2 folder (see the module docstring)."""
    return Path(root) / info.modality / info.name


def images_folder(root: str | Path) -> Path:
    """``DIR/image/images``, or its only sub-folder when the images archive wrapped everything in one."""
    base = Path(root) / "image" / "images"
    children = [c for c in base.iterdir() if not c.name.startswith(".")] if base.is_dir() else []
    if len(children) == 1 and children[0].is_dir() and children[0].name not in MMEB_V2:
        return children[0]
    return base


def split_version(root: str | Path, name: str) -> str:
    """The split version recorded by :func:`download`, or ``"unversioned"`` for a hand-made folder."""
    m = Path(root) / MANIFEST
    if m.exists():
        entry = json.loads(m.read_text()).get("datasets", {}).get(name)
        if entry:
            return entry["split_version"]
    return "unversioned"


def load_dataset(root: str | Path, info: DatasetInfo, *, strict: bool = False) -> MMEBSet:
    """Load one MMEB-V2 dataset from a local folder, dispatching on its modality."""
    root = Path(root)
    d, version = dataset_dir(root, info), split_version(root, info.name)
    if info.modality == "image":
        return load_image_eval(d, images_folder(root), info.name, strict=strict, version=version)
    if info.modality == "video":
        return load_video_eval(d, video_frames_folder(root), info, strict=strict, version=version)
    if info.modality == "visdoc":
        return load_visdoc_eval(d, info, strict=strict, version=version)
    raise ValueError(f"{info.name}: unknown modality {info.modality!r}")


_VIDEO_ARCHIVE = {"CLS": "video_cls", "QA": "video_qa", "RET": "video_ret", "MRET": "video_mret"}


def download_plan(datasets: Sequence[str] | None = None) -> list[dict]:
    """The ``snapshot_download`` calls :func:`download` makes: one per repo, with its allow_patterns."""
    names = list(datasets) if datasets else list(MMEB_V2)
    unknown = [n for n in names if n not in MMEB_V2]
    if unknown:
        raise KeyError(f"not MMEB-V2 datasets: {unknown}")
    infos = [MMEB_V2[n] for n in names]
    plan: list[dict] = []
    image = [i.name for i in infos if i.modality == "image"]
    if image:
        plan.append({"repo_id": "TIGER-Lab/MMEB-eval", "subdir": "image", "datasets": image,
                     "allow_patterns": [f"{n}/*" for n in image] + ["images.zip"]})
    video = [i for i in infos if i.modality == "video"]
    if video:
        groups = sorted({_VIDEO_ARCHIVE[i.meta_task] for i in video})
        plan.append({"repo_id": "TIGER-Lab/MMEB-V2", "subdir": "video", "datasets": [i.name for i in video],
                     "allow_patterns": ["video-tasks/data/*"] + [f"video-tasks/frames/{g}.tar.gz*" for g in groups]})
    for i in infos:
        if i.modality == "visdoc":
            plan.append({"repo_id": i.hf_source, "subdir": f"visdoc/{i.name}", "datasets": [i.name],
                         "allow_patterns": ["queries/*", "corpus/*", "qrels/*", "*.md"]})
    return plan


def _commit_of(repo_id: str, revision: str | None) -> str | None:
    """The commit a revision resolves to on the Hub (None when it cannot be asked)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo_id, revision=revision).sha
    except Exception as e:  # noqa: BLE001 - offline, gated, renamed: the version falls back to the revision
        log.warning("could not resolve the commit of %s (%s)", repo_id, e)
        return None


def _dest(archive: Path, names: list[str]) -> Path:
    """Beside the archive when it holds one top folder; else in a folder named after it (video_cls/...)."""
    tops = {n.strip("/").split("/")[0] for n in names if n.strip("/")}
    stem = archive.name.split(".")[0]
    return archive.parent if len(tops) == 1 and any("/" in n.strip("/") for n in names) else archive.parent / stem


def _unpack(folder: Path) -> list[str]:
    """Extract the archives ``snapshot_download`` fetched (once: a marker file remembers each)."""
    done = []
    multi: dict[Path, list[Path]] = {}
    for p in sorted(folder.rglob("*")):
        m = re.match(r"(.+\.tar\.gz)-\d+$", p.name)
        if m:
            multi.setdefault(p.with_name(m.group(1)), []).append(p)
    archives = sorted(set(folder.rglob("*.zip")) | set(folder.rglob("*.tar.gz")) | set(multi))
    for a in archives:
        marker = a.with_name(f".{a.name}.unpacked")
        if marker.exists():
            continue
        if a.suffix == ".zip":
            with zipfile.ZipFile(a) as z:
                z.extractall(a.with_suffix("") if a.name == "images.zip" else _dest(a, z.namelist()))
        else:
            if a in multi:  # split archive: concatenate its parts first
                with open(a, "wb") as out:
                    for part in multi[a]:
                        with open(part, "rb") as src:
                            shutil.copyfileobj(src, out)
            with tarfile.open(a, "r:gz") as t:
                t.extractall(_dest(a, t.getnames()), filter="data")
        marker.write_text("ok\n")
        done.append(str(a.relative_to(folder)))
    return done


def download(to_dir: str | Path, datasets: Sequence[str] | None = None, revision: str | None = None,
             unpack: bool = True) -> dict:
    """Fetch MMEB-V2 (or the named datasets) from the Hugging Face Hub into ``to_dir``; returns the manifest.

    Uses ``huggingface_hub.snapshot_download`` with ``local_dir`` and per-dataset ``allow_patterns``:
    finished files are skipped and interrupted ones resumed, so rerunning after a failure continues.
    Archives are unpacked once. The manifest (``mmeb_v2.json``) records each dataset's repo, revision and
    commit; its ``split_version`` (``repo@commit``) is stored with every score. Needs the Hub: never
    called in tests (they check the calls with a stand-in).
    """
    from huggingface_hub import snapshot_download

    to_dir = Path(to_dir)
    to_dir.mkdir(parents=True, exist_ok=True)
    mpath = to_dir / MANIFEST
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {"benchmark": "mmeb-v2", "datasets": {}}
    for call in download_plan(datasets):
        local = to_dir / call["subdir"]
        log.info("downloading %s -> %s (%d patterns)", call["repo_id"], local, len(call["allow_patterns"]))
        snapshot_download(call["repo_id"], repo_type="dataset", revision=revision, local_dir=str(local),
                          allow_patterns=call["allow_patterns"])
        commit = _commit_of(call["repo_id"], revision)
        if unpack:
            _unpack(local)
        for name in call["datasets"]:
            manifest["datasets"][name] = {
                "repo_id": call["repo_id"], "revision": revision or "main", "commit": commit,
                "split_version": f"{call['repo_id']}@{commit or revision or 'main'}", "path": call["subdir"]}
    from .train import atomic_write_text

    atomic_write_text(mpath, json.dumps(manifest, indent=1))
    return manifest
