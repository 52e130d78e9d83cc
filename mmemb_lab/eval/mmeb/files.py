"""Files of a local MMEB-V2 copy: lazy visuals (read just before embedding), rows of any table format,
the column checks and the skip report.
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from ...data import DataError, EvalSet, natural_key, open_image, sample_frame_indices
from ...model.embed import Input

log = logging.getLogger(__name__)


MANIFEST = "mmeb_v2.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TARGET_INSTRUCTIONS = {  # candidate-side instructions of the reference prompts (video, visdoc)
    "video": "Understand the content of the provided video.",
    "visdoc": "Understand the content of the provided document image.",
}
_FRAME_NUMBER = re.compile(r"(\d+)$")


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
