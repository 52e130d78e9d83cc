"""The download of MMEB-V2 from the Hub into the local layout, with a manifest of what was fetched."""

from __future__ import annotations

import json
import logging
import re
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Sequence

from ...runs import atomic_write_text
from ..registry import MMEB_V2
from .files import MANIFEST
from .loaders import _VIDEO_ARCHIVE

log = logging.getLogger(__name__)




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

    atomic_write_text(mpath, json.dumps(manifest, indent=1))
    return manifest
