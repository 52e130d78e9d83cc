"""The benchmark harness: every dataset of a registry, scored by MMEB-V2's rules, at scale and resumable.

Concept
    ``evaluate.evaluate`` scores a toy world in one pass. A real MMEB-V2 run is 78 datasets, hours of
    GPU time and ~1M candidate embeddings, so this harness adds what such a run needs, around the same
    scoring code (``evaluate.score_set``: cosine ranking, Hit@k and linear NDCG@k):

    - **Embeddings are cached per dataset**, in chunks (``out/cache/<mode>/<dataset>/{cand,qry}-<start>.pt``,
      each written atomically). A dataset whose ``<dataset>_score.json`` exists is finished and skipped on
      restart; an interrupted one resumes from its cached chunks. A cache is dropped when what it was
      computed from changed (inputs, prompt, backbone).
    - **Global pools are embedded once**: the candidate table of a dataset is deduplicated by the loader
      and every query ranks against the same candidate embeddings (``harness_bench`` measures the saving).
    - **Sharding**: under ``torchrun`` / ``accelerate launch`` each rank embeds a contiguous block of
      chunks into the cache; rank 0 gathers them *through the cache files* (so ranks must share ``out/``)
      and scores. In one process every helper of ``mmemb_lab.distributed`` is a no-op.
    - **Modes**: queries go through a ``QueryEncoder`` (``direct`` by default; reasoning modes plug in
      the same way); candidates are always embedded directly. An encoder reports generated tokens per
      query by returning :class:`Encoded`, or by appending one count per input to a list attribute
      ``generated_tokens``. Latency is timed per query at batch size 1 on a sample.
    - **Recorded with every score**: mode, prompt convention, the backbone's video mode (frames as a
      sequence of images, or a storyboard), and the split version of the data.
    - **Bad data** (a missing frame, an unreadable image, a qrels row pointing at no document, an empty
      candidate list...) is reported with its dataset and row, skipped and counted by default
      (``skipped`` and ``problems`` in the score file), or stops the run in strict mode.

    Prompt conventions (a setting, since they move scores by points; ../shared/notes/mmeb-v2.md):
    ``"user"`` - the workbench's own template, instruction in the user turn (what ``embed`` trains
    with); ``"chat"`` - Qwen3-VL-Embedding style, instruction in the system turn; ``"raw"`` - VLM2Vec
    style, vision tokens then instruction and text with no chat roles. All end with ``<|emb|>``.

Used by: ``mmemb-lab benchmark``, notebook 06, ``make bench`` (``harness_bench``).

Deviations from the reference (VLM2Vec), known:

- ``raw`` and ``chat`` end with our pooling token ``<|emb|>``; VLM2Vec pools the last token of its raw
  prompt and Qwen3-VL-Embedding the last token of the generation prompt. The exact whitespace of
  VLM2Vec's raw prompt is not reproduced.
- Frame sequences go to the model as images (or a storyboard), not through a video processor:
  torchvision is unavailable on CPU. The choice is recorded as ``video_mode``.
- A query with an unreadable candidate is dropped from a local task (the reference would stop); an
  unreadable page leaves a global pool (queries left without a relevant page are dropped).
- Latency is measured on the first ``latency_sample`` queries of each dataset, not on all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from . import distributed
from .backbone import EMB_TOKEN, Backbone, reasoning_span
from .data import DataError, load_eval
from .embed import Input, collate, hidden_states, pool, prompt_text
from .evaluate import score_set
from .metrics import aggregate
from .mmeb import LazyVisual, MMEBSet, dataset_dir, load_dataset, resolve, split_version
from .registry import DatasetInfo
from .train import atomic_torch_save, atomic_write_text

__all__ = ["PROMPTS", "HarnessConfig", "Encoded", "QueryEncoder", "render_prompt", "collate_prompted",
           "embed_prompted", "direct_encoder", "ToySource", "MMEBSource", "shard", "DatasetResult",
           "BenchmarkResult", "run_benchmark", "load_results", "harness_bench"]

log = logging.getLogger(__name__)
PROMPTS = ("user", "chat", "raw")


@dataclass(frozen=True)
class HarnessConfig:
    mode: str = "direct"
    """Name of the query mode (a folder of its own under ``out/`` and ``out/cache/``)."""
    prompt: str = "user"
    """Prompt convention: ``"user"`` (ours), ``"chat"`` (system instruction) or ``"raw"`` (VLM2Vec)."""
    strict: bool = False
    """Stop at the first bad record instead of skipping and counting it."""
    batch_size: int = 32
    """Inputs per forward pass of the direct encoder."""
    chunk_size: int = 256
    """Inputs per cache file: the unit of resumption and of sharding."""
    latency_sample: int = 8
    """Queries per dataset timed one at a time (0: no latency measurement)."""
    max_problems: int = 100
    """Problem messages kept per dataset in its score file (all are counted)."""

    def __post_init__(self):
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")
        if self.batch_size < 1 or self.chunk_size < 1 or self.latency_sample < 0:
            raise ValueError(f"invalid harness config: {self}")
        if not self.mode or "/" in self.mode:
            raise ValueError(f"mode must be a plain name, got {self.mode!r}")


@dataclass(frozen=True)
class Encoded:
    """What a query encoder may return instead of a bare tensor."""

    embeddings: torch.Tensor
    """(n, dim) unit-norm embeddings."""
    generated_tokens: Sequence[int] | None = None
    """Tokens generated before embedding, per input (reasoning modes); None when nothing is generated."""


QueryEncoder = Callable[[Sequence[Input]], "torch.Tensor | Encoded"]


# ---------------------------------------------------------------------------------------------
# prompt conventions


def _vision(n_tokens: Sequence[int]) -> str:
    # The vision blocks exactly as embed.prompt_text writes them (one source of truth for their format).
    head = prompt_text(Input(), n_tokens, assistant="")
    return head[len("<|im_start|>user\n"):head.index("<|im_end|>")]


def render_prompt(prompt: str, inp: Input, n_tokens: Sequence[int]) -> str:
    """The text of one input under a prompt convention (``n_tokens[i]``: image-pad tokens of image i)."""
    if prompt == "user":
        return prompt_text(inp, n_tokens)
    span = "" if inp.rationale is None else reasoning_span(inp.rationale)
    if prompt == "chat":
        system = f"<|im_start|>system\n{inp.instruction}<|im_end|>\n" if inp.instruction else ""
        return (f"{system}<|im_start|>user\n{_vision(n_tokens)}{inp.text}<|im_end|>\n<|im_start|>assistant\n"
                f"{span}{EMB_TOKEN}")
    if prompt == "raw":
        body = "\n".join(x for x in (inp.instruction, inp.text) if x)
        return f"{_vision(n_tokens)}{body}{span}{EMB_TOKEN}"
    raise ValueError(f"unknown prompt convention {prompt!r}; known: {PROMPTS}")


def collate_prompted(backbone: Backbone, inputs: Sequence[Input], prompt: str = "user") -> dict:
    """``embed.collate`` (same pixels), with the text rebuilt under another prompt convention."""
    batch = collate(backbone, inputs)
    if prompt == "user":
        return batch
    per_image = ((batch["image_grid_thw"].prod(-1) // backbone.merge ** 2).tolist()
                 if "image_grid_thw" in batch else [])
    texts, k = [], 0
    for inp in inputs:
        n = len(inp.images())
        if n > 1 and backbone.video_mode == "storyboard":
            n = 1  # collate tiled the frames into one image
        texts.append(render_prompt(prompt, inp, per_image[k:k + n]))
        k += n
    enc = backbone.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    batch["input_ids"], batch["attention_mask"] = enc["input_ids"], enc["attention_mask"]
    batch["mm_token_type_ids"] = (enc["input_ids"] == backbone.token_id("<|image_pad|>")).int()
    return batch


@torch.no_grad()
def embed_prompted(backbone: Backbone, inputs: Sequence[Input], prompt: str = "user",
                   batch_size: int = 32) -> torch.Tensor:
    """Direct embeddings under a prompt convention; (n, hidden), unit norm, on the CPU.

    ``"user"`` computes exactly what ``embed.embed`` does; batches follow the model onto its device
    (a GPU run moves the model, see ``mmemb-lab benchmark``).
    """
    was = backbone.model.training
    backbone.model.eval()
    device = next(backbone.model.parameters()).device
    out = []
    for s in range(0, len(inputs), batch_size):
        batch = {k: v.to(device) for k, v in collate_prompted(backbone, inputs[s:s + batch_size], prompt).items()}
        out.append(pool(hidden_states(backbone, batch)).cpu())
    backbone.model.train(was)
    return torch.cat(out) if out else torch.zeros(0, backbone.model.config.text_config.hidden_size)


def direct_encoder(backbone: Backbone, prompt: str = "user", batch_size: int = 32) -> QueryEncoder:
    """The ``direct`` mode: embed without reasoning."""
    return lambda inputs: embed_prompted(backbone, list(inputs), prompt, batch_size)


# ---------------------------------------------------------------------------------------------
# data sources: where a benchmark's datasets come from


@dataclass(frozen=True)
class ToySource:
    """A toy world folder (``mmemb_lab.world.build``), read by ``data.load_eval``."""

    root: Path

    def available(self, info: DatasetInfo) -> bool:
        return (Path(self.root) / info.name).is_dir()

    def version(self, info: DatasetInfo) -> str:
        w = json.loads((Path(self.root) / "world.json").read_text())
        c = w["config"]
        return f"{w['version']}/seed{c['seed']}-n{c['n_eval']}-hard{c['hard_fraction']}"

    def load(self, info: DatasetInfo, strict: bool = False) -> MMEBSet:
        es = load_eval(self.root, info.name, info.eval_type, strict=strict)
        problems = ((f"{info.name}: {es.skipped} record(s) skipped by data.load_eval (see the log)",)
                    if es.skipped else ())
        return MMEBSet(es.name, es.queries, es.candidates, es.eval_type, es.skipped, problems, self.version(info))


@dataclass(frozen=True)
class MMEBSource:
    """A local MMEB-V2 folder (layout in ``mmemb_lab.mmeb``)."""

    root: Path

    def available(self, info: DatasetInfo) -> bool:
        return dataset_dir(self.root, info).exists()

    def version(self, info: DatasetInfo) -> str:
        return split_version(self.root, info.name)

    def load(self, info: DatasetInfo, strict: bool = False) -> MMEBSet:
        return load_dataset(self.root, info, strict=strict)


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class DatasetResult:
    """One dataset's score and everything needed to compare it with someone else's (the score file)."""

    name: str
    modality: str
    meta_task: str
    metric: str
    score: float
    """Headline metric in percent."""
    at_k: dict
    """``hit@k`` and ``ndcg_linear@k`` for k in 1, 5, 10, in percent."""
    n_queries: int
    n_candidates: int
    skipped: int
    """Records skipped (bad data), all counted; ``problems`` keeps the first messages."""
    problems: tuple[str, ...]
    split_version: str
    mode: str
    prompt: str
    video_mode: str
    latency_ms_per_query: float | None
    """Mean wall time to embed one query alone (batch size 1), ms."""
    batched_ms_per_query: float | None
    """Wall time per query when embedded in batches, ms."""
    generated_tokens_per_query: float | None
    """Mean tokens generated per query (None: the encoder does not generate)."""
    easy: float | None = None
    """Score on items that need no reasoning (toy world only), percent."""
    hard: float | None = None
    """Score on items that need reasoning (toy world only), percent."""
    resumed: bool = False
    """True when read back from an existing score file instead of computed in this run."""

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("resumed")
        d.update({"dataset": self.name, **self.at_k})
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DatasetResult":
        names = {f for f in cls.__dataclass_fields__ if f != "resumed"}
        kw = {k: v for k, v in d.items() if k in names}
        kw["problems"] = tuple(kw.get("problems", ()))
        return cls(**kw, resumed=True)


@dataclass(frozen=True)
class BenchmarkResult:
    benchmark: str
    mode: str
    prompt: str
    video_mode: str
    backbone: str
    per_dataset: dict[str, DatasetResult]
    overall: float
    """Unweighted mean over the scored datasets (NaN when none was scored)."""
    per_modality: dict[str, float]
    per_meta_task: dict[str, float]
    n_datasets: int
    missing: tuple[str, ...]
    """Registry datasets without a score (not found, or no usable query)."""
    skipped_records: int
    """Bad records skipped over all datasets."""
    embedded: dict = field(default_factory=dict)
    """Inputs embedded in THIS run: {"queries": n, "candidates": n} (0 and 0 for a fully resumed run)."""

    def summary(self) -> dict:
        def mean(key):
            vals = [getattr(r, key) for r in self.per_dataset.values() if getattr(r, key) is not None]
            return float(np.mean(vals)) if vals else None

        return {"benchmark": self.benchmark, "mode": self.mode, "prompt": self.prompt, "video_mode": self.video_mode,
                "backbone": self.backbone, "overall": self.overall, "n_datasets": self.n_datasets,
                "missing": list(self.missing), "per_modality": self.per_modality,
                "per_meta_task": self.per_meta_task, "per_dataset": {k: v.score for k, v in self.per_dataset.items()},
                "split_versions": {k: v.split_version for k, v in self.per_dataset.items()},
                "skipped_records": self.skipped_records, "easy": mean("easy"), "hard": mean("hard"),
                "latency_ms_per_query": mean("latency_ms_per_query"),
                "batched_ms_per_query": mean("batched_ms_per_query"),
                "generated_tokens_per_query": mean("generated_tokens_per_query"), "embedded": self.embedded}


def load_results(out_dir: str | Path, registry: Mapping[str, DatasetInfo], mode: str = "direct",
                 ) -> dict[str, DatasetResult]:
    """The finished datasets of a run folder (its score files), in registry order."""
    d = Path(out_dir) / mode
    return {n: DatasetResult.from_json(json.loads((d / f"{n}_score.json").read_text()))
            for n in registry if (d / f"{n}_score.json").exists()}


# ---------------------------------------------------------------------------------------------
# the cached, sharded embedding of one list of inputs


def shard(n_chunks: int, rank: int, world: int) -> range:
    """The contiguous block of chunk indices rank ``rank`` of ``world`` embeds (blocks differ by <= 1)."""
    return range(n_chunks * rank // world, n_chunks * (rank + 1) // world)


def _visual_id(v) -> str:
    if v is None:
        return ""
    if isinstance(v, LazyVisual):
        return v.identity()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_visual_id(x) for x in v) + "]"
    return f"pil:{v.size}:{hashlib.md5(v.tobytes()).hexdigest()}"


def _fingerprint(inputs: Sequence[Input], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for x in inputs:
        h.update(json.dumps([x.name, x.text, x.instruction, x.rationale, _visual_id(x.visual)]).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class _Embedded:
    emb: torch.Tensor  # (n, dim); rows of bad inputs are zero
    bad: dict[int, str]  # input index -> message
    generated: list  # per input: tokens generated, or None
    seconds: float  # encoder wall time summed over chunks (whenever they were computed)
    n_encoded: int  # inputs that went through the encoder (over all chunks)
    computed_now: int  # inputs encoded in this run


def _embed_cached(kind: str, inputs: Sequence[Input], encode: QueryEncoder, cache: Path, cfg: HarnessConfig,
                  ) -> _Embedded | None:
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
        out = encode([x for _, x in ok]) if ok else None
        seconds = time.perf_counter() - t
        emb = out.embeddings if isinstance(out, Encoded) else out
        tokens = out.generated_tokens if isinstance(out, Encoded) else None
        log_ = getattr(encode, "generated_tokens", None)  # or an encoder that appends one count per input
        if tokens is None and isinstance(log_, list) and len(log_) - n_before == len(ok):
            tokens = log_[n_before:]
        gen = [None] * len(chunk)
        for (j, _), g in zip(ok, tokens if tokens is not None else []):
            gen[j] = int(g)
        full = None
        if emb is not None:
            full = torch.zeros(len(chunk), emb.shape[-1])
            full[[j for j, _ in ok]] = emb.detach().float().cpu()
        atomic_torch_save({"emb": full, "bad": bad, "generated": gen, "seconds": seconds, "n_encoded": len(ok)}, f)
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
    dim = next((p["emb"].shape[-1] for p in parts if p["emb"] is not None), 1)
    emb = torch.cat([p["emb"] if p["emb"] is not None else torch.zeros(len(p["generated"]), dim) for p in parts]) \
        if parts else torch.zeros(0, dim)
    return _Embedded(emb, {i: m for p in parts for i, m in p["bad"].items()},
                     [g for p in parts for g in p["generated"]], sum(p["seconds"] for p in parts),
                     sum(p["n_encoded"] for p in parts), computed)


def _prepare_cache(cache: Path, kind: str, fingerprint: str) -> None:
    """Rank 0 drops ``kind`` chunks computed from other inputs or settings, then records the fingerprint."""
    meta = cache / f"{kind}.json"
    if meta.exists() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
        return
    for f in cache.glob(f"{kind}-*.pt"):
        f.unlink()
    atomic_write_text(meta, json.dumps({"fingerprint": fingerprint}))


def _latency(encode: QueryEncoder, inputs: Sequence[Input]) -> float | None:
    if not inputs:
        return None
    encode(list(inputs[:1]))  # warm-up
    t = time.perf_counter()
    for x in inputs:
        encode([x])
    return 1000 * (time.perf_counter() - t) / len(inputs)


# ---------------------------------------------------------------------------------------------
# the run


def _drop_bad(es: MMEBSet, q_bad: dict[int, str], c_bad: dict[int, str]) -> tuple[MMEBSet, list[int], list[int]]:
    """Remove unreadable queries and candidates; returns the set and the kept query / candidate indices."""
    keys = list(es.candidates)
    bad_keys = {keys[i] for i in c_bad}
    problems = list(es.problems) + [q_bad[i] for i in sorted(q_bad)] + [c_bad[i] for i in sorted(c_bad)]
    kept_c = [i for i, k in enumerate(keys) if k not in bad_keys]
    kept_q, queries = [], []
    for qi, q in enumerate(es.queries):
        if qi in q_bad:
            continue
        if es.eval_type == "local" and bad_keys.intersection(q.candidates):
            problems.append(f"{q.query.name}: dropped, one of its candidates could not be read")
            continue
        if bad_keys:
            rel = {k: g for k, g in q.relevance.items() if k not in bad_keys}
            if es.eval_type == "global" and not any(g > 0 for g in rel.values()):
                problems.append(f"{q.query.name}: dropped, its relevant candidates could not be read")
                continue
            q = replace(q, candidates=tuple(k for k in q.candidates if k not in bad_keys), relevance=rel)
        kept_q.append(qi)
        queries.append(q)
    cands = {keys[i]: es.candidates[keys[i]] for i in kept_c}
    es2 = replace(es, queries=queries, candidates=cands, skipped=len(problems), problems=tuple(problems))
    return es2, kept_q, kept_c


def _check_run(path: Path, settings: dict) -> None:
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{path.parent} holds a run with other settings {diff}: use another --out folder")
    elif distributed.is_main():
        atomic_write_text(path, json.dumps(settings, indent=1))


def run_benchmark(backbone: Backbone, source, registry: Mapping[str, DatasetInfo], out_dir: str | Path,
                  cfg: HarnessConfig = HarnessConfig(), encoder: QueryEncoder | None = None,
                  candidate_encoder: QueryEncoder | None = None, benchmark: str = "",
                  progress: bool = True) -> BenchmarkResult | None:
    """Score every dataset of ``registry`` found in ``source``; resumable; returns the result on rank 0.

    ``source``: :class:`ToySource` or :class:`MMEBSource` (anything with ``available``, ``version``,
    ``load``). ``encoder`` embeds queries (default: direct, under ``cfg.prompt``); ``candidate_encoder``
    embeds candidates (default: direct). Writes ``out/<mode>/{<dataset>_score.json, <dataset>_pred.jsonl,
    run.json, results.json}`` and the cache under ``out/cache/<mode>/``.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    res_dir, cache_root = out_dir / cfg.mode, out_dir / "cache" / cfg.mode
    encode = encoder or direct_encoder(backbone, cfg.prompt, cfg.batch_size)
    cand_encode = candidate_encoder or direct_encoder(backbone, cfg.prompt, cfg.batch_size)
    settings = {"benchmark": benchmark, "mode": cfg.mode, "prompt": cfg.prompt, "video_mode": backbone.video_mode,
                "backbone": str(backbone.source)}
    _check_run(res_dir / "run.json", settings)
    per: dict[str, DatasetResult] = {}
    embedded = {"queries": 0, "candidates": 0}
    main = distributed.is_main()
    for name, info in tqdm(registry.items(), desc=f"{benchmark or 'benchmark'} {cfg.mode}",
                           disable=not (progress and main)):
        score_file = res_dir / f"{name}_score.json"
        if score_file.exists():
            per[name] = DatasetResult.from_json(json.loads(score_file.read_text()))
            continue
        if not source.available(info):
            log.warning("%s: not found in %s", name, getattr(source, "root", source))
            continue
        es = source.load(info, strict=cfg.strict)
        if not es.queries:
            log.warning("%s: no usable queries (%d skipped)", name, es.skipped)
            continue
        cache = cache_root / name
        cands, queries = list(es.candidates.values()), [q.query for q in es.queries]
        if main:
            common = {**settings, "chunk_size": cfg.chunk_size}
            _prepare_cache(cache, "cand", _fingerprint(cands, {**common, "mode": "candidates"}))
            _prepare_cache(cache, "qry", _fingerprint(queries, common))
        distributed.barrier()
        c = _embed_cached("cand", cands, cand_encode, cache, cfg)
        q = _embed_cached("qry", queries, encode, cache, cfg)
        if main:
            embedded["candidates"] += c.computed_now
            embedded["queries"] += q.computed_now
            r = _score_and_write(info, es, q, c, encode, cache, res_dir, cfg, backbone.video_mode)
            if r is not None:
                per[name] = r
        distributed.barrier()
    if not main:
        return None
    scores = {k: v.score for k, v in per.items()}
    agg = aggregate(scores, registry) if scores else None
    result = BenchmarkResult(
        benchmark, cfg.mode, cfg.prompt, backbone.video_mode, str(backbone.source), per,
        agg.overall if agg else float("nan"), dict(agg.per_modality) if agg else {},
        dict(agg.per_meta_task) if agg else {}, len(per), tuple(n for n in registry if n not in per),
        sum(r.skipped for r in per.values()), embedded)
    atomic_write_text(res_dir / "results.json", json.dumps(result.summary(), indent=1))
    return result


def _score_and_write(info: DatasetInfo, es: MMEBSet, q: _Embedded, c: _Embedded, encode: QueryEncoder,
                     cache: Path, res_dir: Path, cfg: HarnessConfig, video_mode: str) -> DatasetResult | None:
    es2, kept_q, kept_c = _drop_bad(es, q.bad, c.bad)
    if not es2.queries:
        log.warning("%s: no usable queries left after dropping unreadable data: %s", info.name, es2.problems[:5])
        return None
    lat_file = cache / "latency.json"
    if lat_file.exists():
        latency = json.loads(lat_file.read_text())["ms_per_query"]
    else:
        sample = [resolve(x.query) for x in es2.queries[:cfg.latency_sample]]
        latency = _latency(encode, sample) if cfg.latency_sample else None
        atomic_write_text(lat_file, json.dumps({"ms_per_query": latency}))
    s = score_set(es2, q.emb[kept_q], c.emb[kept_c], info.metric)
    gen = [q.generated[i] for i in kept_q if q.generated[i] is not None]
    known = any(h is not None for h in (x.needs_reasoning for x in es2.queries))
    r = DatasetResult(
        info.name, info.modality, info.meta_task, info.metric, s.score, dict(s.at_k), len(es2.queries),
        len(es2.candidates), es2.skipped, es2.problems[:cfg.max_problems], es.version, cfg.mode, cfg.prompt,
        video_mode, latency, 1000 * q.seconds / max(1, q.n_encoded), float(np.mean(gen)) if gen else None,
        s.split(False) if known else None, s.split(True) if known else None)
    lines = [json.dumps({"query": x.item_id, "top1": t, "score": float(v), "needs_reasoning": x.needs_reasoning,
                         "generated_tokens": q.generated[i]})
             for x, t, v, i in zip(es2.queries, s.top1, s.per_query, kept_q)]
    atomic_write_text(res_dir / f"{info.name}_pred.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(res_dir / f"{info.name}_score.json", json.dumps(r.to_json(), indent=1))  # written last: done
    return r


# ---------------------------------------------------------------------------------------------
# make bench


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def harness_bench(backbone: Backbone, n_eval: int = 16, seed: int = 0, repeats: int = 3) -> dict:
    """Evaluation throughput on a small toy world, and the saving from embedding a global pool once.

    Every number is measured in this call: a fresh harness run (queries/s over all datasets), the same
    run resumed (nothing recomputed), and on the global ``toy_doc`` pool the time to embed the pool
    once plus every query, against re-embedding the pool for each query (best of ``repeats`` each).
    """
    import tempfile

    from .world.build import WorldConfig, build_world, toy_registry

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "world"
        info = build_world(root, WorldConfig(seed=seed, n_train=0, n_eval=n_eval), progress=False)
        registry, source = toy_registry(info), ToySource(root)
        cfg = HarnessConfig(latency_sample=0)
        t = time.perf_counter()
        res = run_benchmark(backbone, source, registry, Path(tmp) / "run", cfg, benchmark="toy", progress=False)
        wall = time.perf_counter() - t
        t = time.perf_counter()
        again = run_benchmark(backbone, source, registry, Path(tmp) / "run", cfg, benchmark="toy", progress=False)
        resumed = time.perf_counter() - t
        es = source.load(registry["toy_doc"])
        pool_inputs, queries = list(es.candidates.values()), [x.query for x in es.queries]
        enc = direct_encoder(backbone)
        enc(queries[:2])  # warm-up
        once = _best_of(lambda: (enc(pool_inputs), enc(queries)), repeats)
        per_query = _best_of(lambda: [(enc(pool_inputs), enc([x])) for x in queries], repeats)
    n_q = sum(r.n_queries for r in res.per_dataset.values())
    return {"world": {"seed": seed, "n_eval": n_eval, "datasets": len(registry)},
            "queries": n_q, "wall_s": wall, "queries_per_s": n_q / wall, "resumed_wall_s": resumed,
            "resumed_embedded": again.embedded,
            "global_pool": {"dataset": "toy_doc", "pool": len(pool_inputs), "queries": len(queries),
                            "once_s": once, "per_query_s": per_query, "saving_ratio": per_query / once}}

