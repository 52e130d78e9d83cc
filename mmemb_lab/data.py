"""From records to model inputs: toy-world items in memory and MMEB-schema datasets on disk.

Concept
    The same ``Input`` objects (``mmemb_lab.model.embed``) come out of the toy world's in-memory items (used by
    stage 0, which draws fresh items every step) and out of datasets on disk in the real MMEB schemas
    (``mmemb_lab.world.build`` writes the toy world that way; real MMEB data has the same columns), so
    the training loop and the evaluation harness never know which world they run on.

Used by: foundation (stage 0), the contrastive stage, the evaluation harness, notebooks 00/01.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .model.embed import Input
from .world.scenes import Obj, Page, Scene, Video, render_object, render_page, render_scene

log = logging.getLogger(__name__)


def to_pil(visual) -> Image.Image | list[Image.Image] | None:
    """Render a world visual: a scene/page/object to one image, a video to its frames."""
    if visual is None:
        return None
    if isinstance(visual, Scene):
        return render_scene(visual)
    if isinstance(visual, Video):
        return [render_scene(f) for f in visual.frames]
    if isinstance(visual, Page):
        return render_page(visual)
    if isinstance(visual, Obj):
        return render_object(visual)
    raise TypeError(f"not a world visual: {type(visual).__name__}")


def item_query(item, rationale: str | None = None) -> Input:
    return Input(item.query_text, to_pil(item.query_visual), item.query_inst, rationale, item.item_id)


def item_candidate(item, j: int) -> Input:
    """Candidate ``j`` of an item (only that one rendered)."""
    text, vis = item.candidates[j]
    return Input(text, to_pil(vis), item.target_inst, None, f"{item.item_id}/cand{j}")


def item_candidates(item) -> list[Input]:
    return [item_candidate(item, j) for j in range(len(item.candidates))]


def candidate_key(text: str, visual) -> str:
    """Identity of a candidate, to mask in-batch duplicates (same answer text or same object crop)."""
    return f"{text}|{visual!r}" if visual is not None else text


# ---------------------------------------------------------------------------------------------
# datasets on disk in the MMEB schemas (toy world or real MMEB, same code)



_METRIC_RE = re.compile(r"^(hit|ndcg|ndcg_linear)@[1-9][0-9]*$")


@dataclass(frozen=True)
class DatasetInfo:
    """One evaluation dataset and the rules it is scored by."""

    name: str
    """Dataset name exactly as the reference reports it (score-file name), e.g. ``"K700"``."""
    modality: str
    """``"image"``, ``"video"`` or ``"visdoc"`` for MMEB-V2; free-form for other benchmarks."""
    meta_task: str
    """Paper-table column within the modality, e.g. ``"CLS"``, ``"RET"``, ``"VDRv1"``."""
    metric: str
    """Headline metric, ``"hit@k"`` or ``"ndcg@k"`` (linear-gain NDCG)."""
    eval_type: str
    """``"local"`` (per-query candidate list) or ``"global"`` (whole deduplicated corpus)."""
    hf_source: str
    """Where the evaluation data lives (repo id, or the dataset name where unknown)."""
    instruction: str
    """Query-side instruction of the reference prompts."""

    def __post_init__(self) -> None:
        if self.eval_type not in ("local", "global"):
            raise ValueError(f"{self.name}: eval_type must be 'local' or 'global', got {self.eval_type!r}")
        if not _METRIC_RE.match(self.metric):
            raise ValueError(f"{self.name}: metric must look like 'hit@1' or 'ndcg@5', got {self.metric!r}")

    @property
    def column(self) -> str:
        """The paper-table column key, ``"<modality>/<meta_task>"`` (e.g. ``"image/CLS"``)."""
        return f"{self.modality}/{self.meta_task}"


TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
LOCAL_EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
BEIR_COLUMNS = {"queries": ("query-id", "query"), "corpus": ("corpus-id", "image"),
                "qrels": ("query-id", "corpus-id", "score")}
N_VIDEO_FRAMES = 8  # MMEB-V2: 8 frames sampled uniformly from the shipped ones
IMAGE_PLACEHOLDERS = ("<|image_1|>", "<image>")


class DataError(ValueError):
    """A bad record or file, named: dataset, row and path."""


@dataclass(frozen=True)
class EvalQuery:
    """One evaluation query: its input, its candidates' keys, and graded relevance per candidate key."""

    query: Input
    candidates: tuple[str, ...]  # keys into the dataset's candidate table
    relevance: dict = field(default_factory=dict)  # candidate key -> grade
    needs_reasoning: bool | None = None
    gold_steps: tuple[str, ...] = ()
    answer: str = ""
    item_id: str = ""


@dataclass(frozen=True)
class EvalSet:
    """A dataset ready to score: queries and the deduplicated candidate table (each embedded once)."""

    name: str
    queries: list[EvalQuery]
    candidates: dict[str, Input]
    eval_type: str
    skipped: int = 0
    problems: tuple[str, ...] = ()
    """Why rows were skipped (the first few reasons, for the summary and the score file)."""


MAX_PROBLEMS = 20  # skip reasons kept per dataset (all are counted)


def open_split(path: str | Path, dataset: str):
    """``datasets.load_from_disk`` with a ``DataError`` naming the folder when it is missing or damaged."""
    from datasets import load_from_disk

    path = Path(path)
    if not path.exists():
        raise DataError(f"{dataset}: no data at {path} (is this a world folder? make one with `mmemb-lab world`)")
    try:
        return load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - arrow/json errors of a truncated or foreign folder, named
        raise DataError(f"{dataset}: cannot read {path} ({type(e).__name__}: {e}); the files are truncated or "
                        "not a saved dataset - regenerate it (`mmemb-lab world --out ... --overwrite`)") from e


def check_columns(ds, required, where: str) -> None:
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: wrong schema, missing column(s) {missing}; has {ds.column_names}")


def load_visual(root: Path, rel: str | list, where: str):
    """Open an image (path) or a video (a folder of frames, 8 sampled uniformly); errors name the file."""
    if not rel:
        return None
    if isinstance(rel, (list, tuple)):
        return [load_visual(root, r, where) for r in rel]
    path = root / rel
    if path.is_dir():
        frames = sorted((p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")),
                        key=lambda p: natural_key(p.name))
        if not frames:
            raise DataError(f"{where}: video folder {path} has no frames")
        return [open_image(frames[i], where) for i in sample_frame_indices(len(frames))]
    return open_image(path, where)


def sample_frame_indices(n_frames: int, k: int = N_VIDEO_FRAMES) -> list[int]:
    """The reference's uniform sampling: ``linspace(0, n-1, k)`` truncated to ints; all frames if n <= k.
    The one frame-sampling rule, for toy videos and MMEB-V2 frame folders alike."""
    if n_frames <= k:
        return list(range(n_frames))
    step = (n_frames - 1) / (k - 1)  # computed as numpy.linspace does, so float rounding agrees too
    return [int(i * step) for i in range(k - 1)] + [n_frames - 1]


def natural_key(name: str) -> list:
    """Sort key that orders ``frame2`` before ``frame10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def open_image(path: Path, where: str) -> Image.Image:
    """Open one image as RGB; a missing or corrupt file raises ``DataError`` naming it."""
    if not path.exists():
        raise DataError(f"{where}: missing image file {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises several types for corrupt files
        raise DataError(f"{where}: corrupt or unreadable image {path} ({e})") from e


def strip_placeholders(text: str) -> str:
    for p in IMAGE_PLACEHOLDERS:
        text = text.replace(p, "")
    return text.strip()


def load_train(path: str | Path, root: str | Path | None = None, name: str | None = None):
    """MMEB-train rows -> list of (query, positive, negative or None) Inputs."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent.parent
    name = name or path.parent.name
    ds = open_split(path, name)
    check_columns(ds, TRAIN_COLUMNS, f"{name} ({path})")
    out = []
    for i, r in enumerate(ds):
        where = f"{name} train row {i}"
        q = Input(strip_placeholders(r["qry"]), load_visual(root, r["qry_image_path"], where), "", None, where)
        p = Input(r["pos_text"], load_visual(root, r["pos_image_path"], where), "", None, where + " (pos)")
        n = None
        if r.get("neg_text") or r.get("neg_image_path"):
            n = Input(r.get("neg_text") or "", load_visual(root, r.get("neg_image_path") or "", where), "", None,
                      where + " (neg)")
        for x in (q, p) + ((n,) if n else ()):
            if not x.text.strip() and x.visual is None:
                raise DataError(f"{x.name}: empty text and no image")
        out.append((q, p, n))
    return out


EVAL_SPLITS = ("eval", "val")
"""A toy world's query splits in the evaluation layout: ``eval`` reports, ``val`` chooses settings."""


def eval_split_dir(world_root: str | Path, name: str, eval_type: str, split: str = "eval") -> Path:
    """Where one dataset's split lives: local tasks in ``<name>/<split>/``; global tasks keep MMEB's BEIR
    parts (queries, corpus, qrels) in ``<name>/`` for ``eval`` and in ``<name>/val/`` for ``val``."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {EVAL_SPLITS}")
    base = Path(world_root) / name
    if eval_type == "local":
        return base / split
    return base if split == "eval" else base / split


def load_eval(world_root: str | Path, name: str, eval_type: str, strict: bool = False,
              split: str = "eval") -> EvalSet:
    """Load one evaluation dataset (local: MMEB-eval schema; global: BEIR queries/corpus/qrels); ``split``
    is ``eval`` (the reported queries) or ``val`` (the toy world's validation queries, :func:`eval_split_dir`).

    A bad row (query, candidate or corpus page) raises ``DataError`` in strict mode; otherwise it is
    skipped, logged, counted (``skipped``) and its reason kept (``problems``, the first few).
    """
    root = Path(world_root)
    queries: list[EvalQuery] = []
    cands: dict[str, Input] = {}
    problems: list[str] = []

    def skip(err: DataError) -> None:
        if strict:
            raise err
        log.warning("skipping %s", err)
        problems.append(str(err))

    where_split = eval_split_dir(root, name, eval_type, split)
    if eval_type == "local":
        ds = open_split(where_split, name)
        check_columns(ds, LOCAL_EVAL_COLUMNS, f"{name} ({where_split})")
        for i, r in enumerate(ds):
            where = f"{name} {split} row {i}"
            try:
                if not r["tgt_text"] and not r["tgt_img_path"]:
                    raise DataError(f"{where}: empty candidate list")
                q = Input(strip_placeholders(r["qry_text"]), load_visual(root, r["qry_img_path"], where),
                          r.get("qry_inst", ""), None, where)
                if not q.text and q.visual is None:
                    raise DataError(f"{where}: empty query (no text, no image)")
                keys = []
                n = max(len(r["tgt_text"]), len(r["tgt_img_path"]))
                for j in range(n):
                    t = r["tgt_text"][j] if j < len(r["tgt_text"]) else ""
                    p = r["tgt_img_path"][j] if j < len(r["tgt_img_path"]) else ""
                    key = f"{t}|{p}"
                    if key not in cands:
                        cands[key] = Input(t, load_visual(root, p, where), r.get("tgt_inst", ""), None, where)
                    keys.append(key)
                labels = r.get("labels") or [0]  # MMEB: the first candidate is the positive
                rel = {keys[j]: 1 for j in labels}
            except DataError as e:
                skip(e)
                continue
            queries.append(EvalQuery(q, tuple(keys), rel, r.get("needs_reasoning"), tuple(r.get("gold_steps") or ()),
                                     r.get("answer", ""), r.get("item_id", str(i))))
        return EvalSet(name, queries, cands, "local", len(problems), tuple(problems[:MAX_PROBLEMS]))
    parts = {}
    for part, cols in BEIR_COLUMNS.items():
        ds = open_split(where_split / part, name)
        check_columns(ds, cols, f"{name} ({where_split / part})")
        parts[part] = ds
    dropped_pages = set()
    for i, r in enumerate(parts["corpus"]):
        try:
            cands[r["corpus-id"]] = Input("", load_visual(root, r["image"], f"{name} corpus row {i}"),
                                          r.get("tgt_inst", ""), None, f"{name} corpus {r['corpus-id']}")
        except DataError as e:  # a bad page leaves the pool, as a bad query row leaves the queries
            skip(e)
            dropped_pages.add(r["corpus-id"])
    qrels: dict[str, dict[str, float]] = {}
    for i, r in enumerate(parts["qrels"]):
        if r["corpus-id"] in dropped_pages:
            continue
        if r["corpus-id"] not in cands:
            skip(DataError(f"{name} qrels row {i}: corpus-id {r['corpus-id']!r} is not in the corpus"))
            continue
        qrels.setdefault(r["query-id"], {})[r["corpus-id"]] = float(r["score"])
    keys = tuple(cands)
    for i, r in enumerate(parts["queries"]):
        where = f"{name} query row {i}"
        try:
            if not r["query"].strip():
                raise DataError(f"{where}: empty query text")
            rel = qrels.get(r["query-id"], {})
            if dropped_pages and not any(g > 0 for g in rel.values()):
                raise DataError(f"{where}: dropped, its relevant pages could not be read")
        except DataError as e:
            skip(e)
            continue
        queries.append(EvalQuery(Input(r["query"], None, r.get("qry_inst", ""), None, where), keys,
                                 rel, r.get("needs_reasoning"),
                                 tuple(r.get("gold_steps") or ()), r.get("answer", ""), r["query-id"]))
    return EvalSet(name, queries, cands, "global", len(problems), tuple(problems[:MAX_PROBLEMS]))


def visual_array(visual):
    """A world visual as one RGB array (video frames side by side, 4-px gaps)."""
    ims = to_pil(visual)
    ims = ims if isinstance(ims, list) else [ims]
    h = max(im.height for im in ims)
    parts = []
    for im in ims:
        a = np.asarray(im.convert("RGB"))
        parts += [np.pad(a, ((0, h - a.shape[0]), (0, 0), (0, 0)), constant_values=255),
                  np.full((h, 4, 3), 255, dtype=np.uint8)]
    return np.concatenate(parts[:-1], axis=1)
