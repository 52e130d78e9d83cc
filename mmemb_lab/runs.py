"""Run identity: what a run folder was made from, and what a rerun into it may do.

Concept
    Every command that writes a run folder (``world``, ``foundation``, ``train``, ``benchmark``, ``demo``)
    describes what determines its outputs in a :class:`Manifest`: the command, its resolved config and
    seed, the digests of its inputs (model weights, world or data) and the code version. The manifest is
    written to ``<run>/manifest.json`` before any work starts. A rerun into the same folder:

    - with an identical manifest resumes (finished outputs are reused, an interrupted job continues);
    - with any other manifest refuses, naming every field that differs, unless ``overwrite`` is given,
      which *moves the old run aside* to ``<run>.stale-<time>`` (nothing is deleted);
    - into a folder that holds files but no manifest (not written by this tool) refuses the same way:
      ``overwrite`` moves it aside too, so the tool never deletes what it did not write.

    A lock file ``<run>/.lock`` (pid, host, start time) keeps a second writer out while a run is in
    progress; a lock left behind by a process that is gone (same host) is reported and taken over.
    The folder is checked for writability before anything else, so a run fails in its first second,
    not after its first training step.

    Under ``torchrun`` / ``accelerate launch`` only rank 0 checks, locks and writes; the other ranks
    wait at a barrier (a refusal on rank 0 ends the job, as torchrun stops the other ranks).

Used by: ``mmemb-lab`` (every writing command), the demo, the harness (one manifest per mode folder).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch

from . import distributed

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK = ".lock"


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunError(RuntimeError):
    """A run folder cannot be used as asked; the message names the folder and the way out."""


class RunMismatch(RunError):
    """The folder holds a run made from other inputs or settings."""


class RunLocked(RunError):
    """Another live process is writing the folder."""


# ---------------------------------------------------------------------------------------------
# digests


@functools.cache
def code_version() -> str:
    """The package version and a digest of its source files (a code change is a different run), read once per
    process: the code a process runs is the code it imported, so a file edited on disk during a long run
    changes neither what runs nor the identity of what it writes."""
    from . import __version__

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes): what a model *is*, whatever its
    folder or source string says. Two checkpoints with one perturbed weight differ here. LoRA adapter
    weights are left out: they are what a run trains, not what it starts from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:  # adapters initialised for this run are its product, not its input
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def world_digest(root: str | Path) -> str:
    """A toy world's identity: the digest of its ``world.json`` (code version, config, per-dataset counts)."""
    path = Path(root) / "world.json"
    if not path.exists():
        raise RunError(f"{root}: not a toy world (no world.json); make one with `mmemb-lab world --out {root}`")
    return file_digest(path)


def _plain(x):
    """Config values as JSON-stable plain data (dataclasses, tuples and paths included)."""
    if is_dataclass(x) and not isinstance(x, type):
        return _plain(asdict(x))
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


# ---------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class Manifest:
    """What determines a run folder's outputs (``<run>/manifest.json``)."""

    command: str
    """The command or stage that wrote the folder (``train``, ``benchmark/direct``, ``demo``...)."""
    config: dict = field(default_factory=dict)
    """The resolved config, as plain data."""
    seed: int | None = None
    inputs: dict = field(default_factory=dict)
    """Digest per input: ``weights`` (model), ``world`` / ``data`` (data), upstream runs..."""
    code: str = ""
    """``code_version()`` of the code that wrote it."""

    @classmethod
    def make(cls, command: str, config=None, seed: int | None = None, inputs: dict | None = None) -> "Manifest":
        return cls(command, _plain(config or {}), seed, _plain(inputs or {}), code_version())

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        return cls(d.get("command", ""), d.get("config", {}), d.get("seed"), d.get("inputs", {}), d.get("code", ""))

    def save(self, folder: str | Path) -> None:
        atomic_write_text(Path(folder) / MANIFEST, json.dumps(self.to_json(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest | None":
        path = Path(folder) / MANIFEST
        if not path.exists():
            return None
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{path}: unreadable run manifest ({e}); pass --overwrite to move this run aside") from e

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: "Manifest") -> dict[str, tuple]:
        """``{dotted field: (this, other)}`` for every leaf that differs."""
        return _diff(self.to_json(), other.to_json())


def _diff(a, b, prefix: str = "") -> dict[str, tuple]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = {}
        for k in sorted(set(a) | set(b), key=str):
            out.update(_diff(a.get(k), b.get(k), f"{prefix}{k}."))
        return out
    return {} if a == b else {prefix.rstrip("."): (a, b)}


def describe(diff: dict[str, tuple], limit: int = 6) -> str:
    parts = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(diff.items())[:limit]]
    more = f" (+{len(diff) - limit} more)" if len(diff) > limit else ""
    return "; ".join(parts) + more


# ---------------------------------------------------------------------------------------------
# folders: move aside, writability, lock


def move_aside(folder: str | Path) -> Path:
    """Rename ``folder`` to ``<folder>.stale-<time>`` (never deletes); returns the new path."""
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = folder.with_name(f"{folder.name}.stale-{stamp}")
    n = 1
    while dest.exists():
        dest = folder.with_name(f"{folder.name}.stale-{stamp}-{n}")
        n += 1
    os.replace(folder, dest)
    log.warning("moved the earlier run %s aside to %s", folder, dest)
    return dest


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` and write a probe file in it, or raise ``RunError`` naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"{folder}: cannot write here ({e.strerror or e}); choose another --out") from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(folder: str | Path, command: str = "") -> Path:
    """Take ``<folder>/.lock`` or raise ``RunLocked`` naming its holder; a stale lock is taken over."""
    path = Path(folder) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": command}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                held = {}
            pid, host = held.get("pid"), held.get("host")
            if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                log.warning("%s: stale lock of pid %s (%s, started %s) whose process is gone; taking it over",
                            path, pid, held.get("command", "?"), held.get("started", "?"))
                path.unlink(missing_ok=True)
                continue
            if host == me["host"] and pid == me["pid"]:
                raise RunLocked(f"{folder}: this process already writes this run folder")
            raise RunLocked(f"{folder} is being written by pid {pid} on {host} ({held.get('command', '?')}, "
                            f"since {held.get('started', '?')}); wait for it, use another --out, or remove "
                            f"{path} if that process is gone")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return path
    raise RunLocked(f"{path}: could not take the lock")


def release_lock(folder: str | Path) -> None:
    path = Path(folder) / LOCK
    try:
        held = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def _is_empty(folder: Path) -> bool:
    return not folder.exists() or not any(p.name != LOCK for p in folder.iterdir())


def prepare(folder: str | Path, manifest: Manifest, overwrite: bool = False, resume: bool = True) -> str:
    """Check ``folder`` against ``manifest`` and record it (rank 0). Returns ``"new"``, ``"resume"`` or
    ``"replaced"`` (the old run moved aside). Raises ``RunMismatch`` when the folder holds something else
    and ``overwrite`` is not set. ``resume=False`` starts over in a folder of the *same* run."""
    folder = Path(folder)
    state = "new"
    if folder.exists() and not _is_empty(folder):
        old = Manifest.load(folder)
        if old is None:
            if not overwrite:
                raise RunMismatch(f"{folder} holds files this tool did not write (no {MANIFEST}); "
                                  "use another --out, or --overwrite to move them aside")
            release_lock(folder)  # our own lock stays out of the folder that is moved aside
            move_aside(folder)
            state = "replaced"
        elif old.differences(manifest):
            diff = old.differences(manifest)
            if not overwrite:
                raise RunMismatch(f"{folder} holds a run made from other inputs or settings ({describe(diff)}); "
                                  "use another --out, or --overwrite to move the old run aside")
            release_lock(folder)
            move_aside(folder)
            state = "replaced"
        else:
            state = "resume" if resume else "new"
    check_writable(folder)
    manifest.save(folder)
    return state


class RunFolder:
    """``with RunFolder(out, manifest, overwrite=...) as run:`` checks, locks and records a run folder.

    ``run.state`` is ``"new"``, ``"resume"`` or ``"replaced"``. The lock is released on exit, also when
    the body raises; a process killed with -9 leaves a lock that the next run reports and takes over.
    """

    def __init__(self, folder: str | Path, manifest: Manifest, overwrite: bool = False, resume: bool = True):
        self.folder, self.manifest, self.overwrite, self.resume = Path(folder), manifest, overwrite, resume
        self.state = "new"
        self._locked = False

    def __enter__(self) -> "RunFolder":
        if distributed.is_main():
            check_writable(self.folder.parent if not self.folder.exists() else self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            acquire_lock(self.folder, self.manifest.command)
            self._locked = True
            try:
                self.state = prepare(self.folder, self.manifest, self.overwrite, self.resume)
            except BaseException:
                self._release()
                raise
            if self.state == "replaced":  # the lock moved aside with the old run: take it in the new folder
                self.folder.mkdir(parents=True, exist_ok=True)
                acquire_lock(self.folder, self.manifest.command)
                self.manifest.save(self.folder)
        distributed.barrier()
        return self

    def _release(self) -> None:
        if self._locked:
            release_lock(self.folder)
            self._locked = False

    def __exit__(self, *exc) -> None:
        self._release()


__all__ = ["Manifest", "RunFolder", "RunError", "RunMismatch", "RunLocked", "code_version", "weights_digest",
           "file_digest", "world_digest", "prepare", "move_aside", "check_writable", "acquire_lock", "release_lock"]
