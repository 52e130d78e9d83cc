"""The cached, sharded embedding of one list of inputs: the unit of resumption and of sharding of the harness.

Inputs are embedded in chunks of ``cfg.chunk_size`` (``<cache>/<kind>-<start>.pt``, each written atomically,
with what the encoder reported per input: tokens generated, rationale, whether it reasoned). Under
``torchrun`` each rank embeds a contiguous block of chunks and rank 0 reads them all back through the files.
A cache is tagged with the fingerprint of what it was computed from (inputs, prompt, weights, mode settings)
and dropped when that changes. The latency of a mode is timed once per cache.

Used by: ``harness`` only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .. import distributed
from ..data import DataError
from ..model.embed import Input
from ..runs import RunError, atomic_torch_save, atomic_write_text
from .mmeb import LazyVisual, MMEBSet, resolve
from .modes import QueryEncoder, as_encoded, latency_ms

if TYPE_CHECKING:  # the harness imports this module: its config is named for the annotations only
    from .harness import HarnessConfig

log = logging.getLogger(__name__)


def shard(n_chunks: int, rank: int, world: int) -> range:
    """The contiguous block of chunk indices rank ``rank`` of ``world`` embeds (blocks differ by <= 1)."""
    return range(n_chunks * rank // world, n_chunks * (rank + 1) // world)


def visual_id(v) -> str:
    if v is None:
        return ""
    if isinstance(v, LazyVisual):
        return v.identity()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(visual_id(x) for x in v) + "]"
    return f"pil:{v.size}:{hashlib.md5(v.tobytes()).hexdigest()}"


def fingerprint(inputs: Sequence[Input], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for x in inputs:
        h.update(json.dumps([x.name, x.text, x.instruction, x.rationale, visual_id(x.visual)]).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Embedded:
    emb: torch.Tensor  # (n, dim); rows of bad inputs are zero
    bad: dict[int, str]  # input index -> message
    generated: list  # per input: tokens generated, or None
    seconds: float  # encoder wall time summed over chunks (whenever they were computed)
    n_encoded: int  # inputs that went through the encoder (over all chunks)
    computed_now: int  # inputs encoded in this run
    rationales: list  # per input: the rationale embedded after ("" where none), or None (not reported)
    reasoned: list  # per input: whether it reasoned, or None (not reported)


def per_input(ok: list, values, cast, n: int) -> list:
    """Values reported for the readable inputs ``ok`` (chunk positions, in order), spread over the chunk."""
    out = [None] * n
    for (j, _), v in zip(ok, values if values is not None else []):
        out[j] = None if v is None else cast(v)
    return out


def embed_cached(kind: str, inputs: Sequence[Input], encode: QueryEncoder, cache: Path, cfg: HarnessConfig,
                  ) -> Embedded | None:
    """Embed ``inputs`` chunk by chunk into ``cache`` (this rank's block); rank 0 returns all, others None."""
    starts = list(range(0, len(inputs), cfg.chunk_size))
    computed = 0
    cache.mkdir(parents=True, exist_ok=True)
    for ci in shard(len(starts), distributed.rank(), distributed.world_size()):
        s = starts[ci]
        f = cache / f"{kind}-{s:08d}.pt"
        if f.exists():
            continue
        chunk = inputs[s:s + cfg.chunk_size]
        ok, bad = [], {}
        for j, x in enumerate(chunk):
            try:
                ok.append((j, resolve(x)))
            except DataError as e:
                if cfg.strict:
                    raise
                log.warning("skipping: %s", e)
                bad[s + j] = str(e)
        n_before = len(getattr(encode, "generated_tokens", None) or [])
        t = time.perf_counter()
        out = as_encoded(encode([x for _, x in ok])) if ok else None
        seconds = time.perf_counter() - t
        tokens, rationales, reasoned = (None, None, None) if out is None else \
            (out.generated_tokens, out.rationales, out.reasoned)
        log_ = getattr(encode, "generated_tokens", None)  # or an encoder that appends one count per input
        if tokens is None and isinstance(log_, list) and len(log_) - n_before == len(ok):
            tokens = log_[n_before:]
        full = None
        if out is not None:
            full = torch.zeros(len(chunk), out.embeddings.shape[-1])
            full[[j for j, _ in ok]] = out.embeddings.detach().float().cpu()
        atomic_torch_save({"emb": full, "bad": bad, "generated": per_input(ok, tokens, int, len(chunk)),
                           "rationales": per_input(ok, rationales, str, len(chunk)),
                           "reasoned": per_input(ok, reasoned, bool, len(chunk)),
                           "seconds": seconds, "n_encoded": len(ok)}, f)
        computed += len(ok)
    distributed.barrier()
    if not distributed.is_main():
        return None
    parts = []
    for s in starts:
        f = cache / f"{kind}-{s:08d}.pt"
        if not f.exists():
            raise RuntimeError(f"{f} is missing after every rank embedded its shard: ranks must share {cache}")
        parts.append(torch.load(f, weights_only=True))
    return concat(parts, computed)


def concat(parts: list[dict], computed: int) -> Embedded:
    """One :class:`Embedded` from cached chunks in input order."""
    dim = next((p["emb"].shape[-1] for p in parts if p["emb"] is not None), 1)
    emb = torch.cat([p["emb"] if p["emb"] is not None else torch.zeros(len(p["generated"]), dim) for p in parts]) \
        if parts else torch.zeros(0, dim)

    def every(key):  # chunks cached before a field existed report nothing for it
        return [v for p in parts for v in p.get(key, [None] * len(p["generated"]))]
    return Embedded(emb, {i: m for p in parts for i, m in p["bad"].items()}, every("generated"),
                     sum(p["seconds"] for p in parts), sum(p["n_encoded"] for p in parts), computed,
                     every("rationales"), every("reasoned"))


def load_cached(kind: str, cache: Path, n: int) -> Embedded:
    """The cached ``kind`` embeddings of a finished run (whatever its chunk size), or ``RunError`` naming
    what is missing."""
    files = sorted(cache.glob(f"{kind}-*.pt"))  # zero-padded starts: name order is input order
    parts = [torch.load(f, weights_only=True) for f in files]
    starts = [int(f.stem.split("-")[1]) for f in files]
    sizes = [len(p["generated"]) for p in parts]
    if sum(sizes) != n or starts != [sum(sizes[:i]) for i in range(len(sizes))]:
        raise RunError(f"{cache}: the cached {kind} embeddings do not cover the {n} inputs of this dataset "
                       f"(chunks at {starts[:8]}); rerun that mode with --overwrite")
    return concat(parts, 0)


def prepare_cache(cache: Path, kind: str, fingerprint: str) -> None:
    """Rank 0 drops ``kind`` chunks computed from other inputs or settings (and, for queries, the timed
    latency), then records the fingerprint."""
    meta = cache / f"{kind}.json"
    if meta.exists() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
        return
    for f in cache.glob(f"{kind}-*.pt"):
        f.unlink()
    if kind == "qry":
        (cache / LATENCY).unlink(missing_ok=True)
    atomic_write_text(meta, json.dumps({"fingerprint": fingerprint}))


LATENCY = "latency.json"


def cached_latency(encode: QueryEncoder, es: MMEBSet, cache: Path, cfg: HarnessConfig) -> float | None:
    """ms per query at batch size 1 on the first ``cfg.latency_sample`` queries, timed once per cache."""
    f = cache / LATENCY
    if f.exists():
        return json.loads(f.read_text())["ms_per_query"]
    sample = [resolve(x.query) for x in es.queries[:cfg.latency_sample]]
    latency = latency_ms(encode, sample) if sample else None
    atomic_write_text(f, json.dumps({"ms_per_query": latency}))
    return latency
