"""One loader per published shape (image, video, visual document, MMEB-train) and one entry point per
dataset of the registry.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from ...data import BEIR_COLUMNS, TRAIN_COLUMNS, DataError, DatasetInfo, EvalQuery, strip_placeholders
from ...model.embed import Input
from ..registry import MMEB_V2
from .files import (
    MANIFEST,
    TARGET_INSTRUCTIONS,
    MMEBSet,
    _check_columns,
    _Skipper,
    frames_visual,
    read_rows,
    visual_from,
)

log = logging.getLogger(__name__)

_VIDEO_ARCHIVE = {"CLS": "video_cls", "QA": "video_qa", "RET": "video_ret", "MRET": "video_mret"}


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
                    strict: bool = False, problems: list[str] | None = None
                    ) -> list[tuple[Input, Input, Input | None]]:
    """MMEB-train rows -> (query, positive, negative or None) triples; visuals lazy (see :func:`resolve`).

    A bad row (missing image, empty text) raises in ``strict`` mode, else is skipped and its message
    appended to ``problems`` when given."""
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
    if problems is not None:
        problems.extend(skip.problems)
    return out


LLAVAHOUND_MODES = {
    # mode: (query instruction, target instruction); the reference's prompts, as VLM2Vec-V2 trains
    "caption": ("", ""),  # the human turn and the clip -> the caption
    "video_retrieval": ("Find a video that contains the following visual content:",
                        "Understand the content of the provided video:"),  # the caption -> the clip
    "qa": ("Answer a question based on the content of a video.", ""),  # the question and the clip -> the answer
}
"""How VLM2Vec-V2 reads LLaVA-Hound's video instruction data (``llavahound_caption`` / ``llavahound_qa``)."""


def load_llavahound_rows(path: str | Path, frames_root: str | Path, name: str, mode: str = "caption",
                         strict: bool = False, problems: list[str] | None = None
                         ) -> list[tuple[Input, Input, None]]:
    """LLaVA-Hound video instruction rows (jsonl: ``id``, ``video`` = a frame folder under ``frames_root``,
    ``conversations`` = [human turn with ``<video>``, answer]) -> (query, positive, None) triples; 8 frames
    sampled per clip as for evaluation. A row whose clip has no frames, or whose turns are missing or empty,
    is skipped and named."""
    if mode not in LLAVAHOUND_MODES:
        raise ValueError(f"mode {mode!r}: expected one of {sorted(LLAVAHOUND_MODES)}")
    q_inst, t_inst = LLAVAHOUND_MODES[mode]
    rows = read_rows(path)
    _check_columns(rows, ("id", "video", "conversations"), f"{name} ({path})")
    skip, out = _Skipper(strict), []
    for i, r in enumerate(rows):
        where = f"{name} train row {i}"
        try:
            turns = r["conversations"] or []
            if len(turns) < 2 or not str(turns[0].get("value") or "").strip() or not str(turns[1].get("value")
                                                                                         or "").strip():
                raise DataError(f"{where}: conversations need a human turn and an answer, got {turns!r:.120}")
            clip = visual_from(str(r["video"]), Path(frames_root), where, video=True)
            asked, answer = turns[0]["value"].replace("<video>", "").strip(), turns[1]["value"].strip()
            if mode == "video_retrieval":
                out.append((Input(answer, None, q_inst, None, where), Input("", clip, t_inst, None, where + " (pos)"),
                            None))
            else:
                out.append((Input(asked, clip, q_inst, None, where), Input(answer, None, t_inst, None,
                                                                            where + " (pos)"), None))
        except DataError as e:
            skip(e)
    if problems is not None:
        problems.extend(skip.problems)
    return out


def load_vidore_rows(path: str | Path, name: str, strict: bool = False, problems: list[str] | None = None
                     ) -> list[tuple[Input, Input, None]]:
    """ViDoRe's training set (``vidore/colpali_train_set``: ``query``, ``image``, ``image_filename``,
    ``answer``, ...) as VLM2Vec-V2 trains on it: the page and the question -> the answer. The page is read
    from the row's image bytes (or its path beside the table)."""
    path = Path(path)
    rows = read_rows(path)
    _check_columns(rows, ("query", "image", "answer"), f"{name} ({path})")
    skip, out, base = _Skipper(strict), [], path if path.is_dir() else path.parent
    for i, r in enumerate(rows):
        where = f"{name} train row {i}"
        try:
            query, answer = str(r["query"] or "").strip(), str(r["answer"] or "").strip()
            if not query or not answer:
                raise DataError(f"{where}: empty {'query' if not query else 'answer'}")
            page = visual_from(r["image"], base, where)
            if page is None:
                raise DataError(f"{where}: no page image")
            out.append((Input(query, page, "", None, where), Input(answer, None, "", None, where + " (pos)"), None))
        except DataError as e:
            skip(e)
    if problems is not None:
        problems.extend(skip.problems)
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
