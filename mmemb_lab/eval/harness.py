"""The benchmark harness: every dataset of a registry, scored by MMEB-V2's rules, at scale and resumable.

Concept
    One runner for every source (a toy world, a local MMEB-V2 download) and every mode. A real MMEB-V2
    run is 78 datasets, hours of GPU time and ~1M candidate embeddings, so it has what such a run needs,
    around one scoring function (``scoring.score_set``: cosine ranking, Hit@k and linear NDCG@k) and one
    result type per level (``scoring.DatasetResult``, ``scoring.BenchmarkResult``); :func:`evaluate` runs it
    on a toy world in one call:

    - **Embeddings are cached per dataset** (``embedding_cache``), in chunks (``out/cache/<mode>/<dataset>/{cand,qry}-<start>.pt``,
      each written atomically). A dataset whose ``<dataset>_score.json`` exists is finished and skipped on
      restart; an interrupted one resumes from its cached chunks. A cache is dropped when what it was
      computed from changed (inputs, prompt, backbone).
    - **Global pools are embedded once**: the candidate table of a dataset is deduplicated by the loader
      and every query ranks against the same candidate embeddings (``bench.harness_bench`` measures the saving).
    - **Sharding**: under ``torchrun`` / ``accelerate launch`` each rank embeds a contiguous block of
      chunks into the cache; rank 0 gathers them *through the cache files* (so ranks must share ``out/``)
      and scores. In one process every helper of ``mmemb_lab.distributed`` is a no-op.
    - **Modes** (``mmemb_lab.eval.modes``): queries go through a ``QueryEncoder`` - ``direct``, ``always`` or
      ``adaptive`` (``modes.encoder_for``) or one of your own; candidates are always embedded directly.
      An encoder reports, per query, the tokens it generated, the rationale it embedded after and whether
      it reasoned by returning ``modes.Encoded`` (or the token counts alone by appending one per input to
      a list attribute ``generated_tokens``); they are cached with the chunk and written per query to
      ``<dataset>_pred.jsonl``. Latency is timed per query at batch size 1 on a sample
      (``modes.latency_ms``). The ``oracle`` (:func:`run_oracle`) takes per query the better of the
      cached direct and always runs: an upper bound, labelled so in ``results.json``.
    - **Recorded with every score**: mode, prompt convention, the backbone's video mode (frames as a
      sequence of images, or a storyboard), and the split version of the data.
    - **Bad data** (a missing frame, an unreadable image, a qrels row pointing at no document, an empty
      candidate list...) is reported with its dataset and row, skipped and counted by default
      (``skipped`` and ``problems`` in the score file), or stops the run in strict mode.

    Prompt conventions (``modes.PROMPTS``, a setting since they move scores by points): ``"user"`` (ours,
    instruction in the user turn), ``"chat"`` (Qwen3-VL-Embedding style, instruction in the system turn),
    ``"raw"`` (VLM2Vec style, no chat roles); all end with ``<|emb|>``. The reasoning modes use ``"user"``.

Used by: ``mmemb-lab benchmark`` and ``evaluate``, the demo (every evaluation of stages 0 and 1), stage 1's
arms, notebooks 01 and 06, ``make bench`` (``bench.harness_bench``).

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

import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..data import DatasetInfo, load_eval
from ..model.backbone import Backbone
from ..runs import Manifest, RunFolder, atomic_write_text, file_digest, weights_digest, world_digest
from .embedding_cache import Embedded, cached_latency, embed_cached, fingerprint, load_cached, prepare_cache
from .mmeb import MMEBSet, dataset_dir, load_dataset, split_version
from .modes import (
    ENCODER_MODES,
    PROMPTS,
    Encoded,
    InferenceConfig,
    QueryEncoder,
    collate_prompted,
    direct_encoder,
    embed_prompted,
    encoder_for,
    render_prompt,
    settings_for,
)
from .scoring import (
    BenchmarkResult,
    DatasetResult,
    aggregate_results,
    mixed_cost,
    oracle_picks,
    prediction_ids,
    read_dataset,
    score_set,
    write_dataset,
)

# PROMPTS, Encoded, QueryEncoder, render_prompt, collate_prompted, embed_prompted and direct_encoder live in
# mmemb_lab.eval.modes (one definition each); they stay importable from here.
__all__ = ["PROMPTS", "HarnessConfig", "Encoded", "QueryEncoder", "render_prompt", "collate_prompted",
           "embed_prompted", "direct_encoder", "ToySource", "MMEBSource", "DatasetResult",
           "BenchmarkResult", "run_benchmark", "evaluate", "run_oracle", "load_results"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HarnessConfig:
    mode: str = "direct"
    """Name of the query mode (a folder of its own under ``out/`` and ``out/cache/``)."""
    prompt: str = "user"
    """Prompt convention: ``"user"`` (ours), ``"chat"`` (system instruction) or ``"raw"`` (VLM2Vec)."""
    strict: bool = False
    """Stop at the first bad record instead of skipping and counting it."""
    batch_size: int = InferenceConfig.batch_size
    """Inputs per forward pass of the default encoders (queries and candidates, direct)."""
    chunk_size: int = 256
    """Inputs per cache file: the unit of resumption and of sharding."""
    latency_sample: int = InferenceConfig.latency_sample
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


# ---------------------------------------------------------------------------------------------
# data sources: where a benchmark's datasets come from


@dataclass(frozen=True)
class ToySource:
    """A toy world folder (``mmemb_lab.world.build``), read by ``data.load_eval``: its ``eval`` split, or the
    ``val`` split on which settings are chosen."""

    root: Path
    split: str = "eval"

    def available(self, info: DatasetInfo) -> bool:
        return (Path(self.root) / info.name).is_dir()

    def version(self, info: DatasetInfo) -> str:
        w = json.loads((Path(self.root) / "world.json").read_text())
        c = w["config"]
        n = c["n_eval"] if self.split == "eval" else c.get("n_val")
        return f"{w['version']}/{self.split}/seed{c['seed']}-n{n}-hard{c['hard_fraction']}"

    def load(self, info: DatasetInfo, strict: bool = False) -> MMEBSet:
        es = load_eval(self.root, info.name, info.eval_type, strict=strict, split=self.split)
        return MMEBSet(es.name, es.queries, es.candidates, es.eval_type, es.skipped, es.problems, self.version(info))

    def fingerprint(self) -> str:
        """The world's identity: a digest of its ``world.json`` (version, config, per-dataset counts), and
        the split."""
        return world_digest(self.root) + ("" if self.split == "eval" else f"/{self.split}")


@dataclass(frozen=True)
class MMEBSource:
    """A local MMEB-V2 folder (layout in ``mmemb_lab.eval.mmeb``)."""

    root: Path

    def available(self, info: DatasetInfo) -> bool:
        return dataset_dir(self.root, info).exists()

    def version(self, info: DatasetInfo) -> str:
        return split_version(self.root, info.name)

    def load(self, info: DatasetInfo, strict: bool = False) -> MMEBSet:
        return load_dataset(self.root, info, strict=strict)

    def fingerprint(self) -> str:
        """The download's identity: a digest of its manifest (repo, revision, commit and split per dataset)."""
        m = Path(self.root) / "mmeb_v2.json"
        return file_digest(m) if m.exists() else "no-manifest"


# ---------------------------------------------------------------------------------------------
# results


def load_results(out_dir: str | Path, registry: Mapping[str, DatasetInfo], mode: str = "direct",
                 ) -> dict[str, DatasetResult]:
    """The finished datasets of a run folder (its score files), in registry order."""
    d = Path(out_dir) / mode
    return {n: read_dataset(d, n) for n in registry if (d / f"{n}_score.json").exists()}


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


def run_benchmark(backbone: Backbone, source, registry: Mapping[str, DatasetInfo], out_dir: str | Path,
                  cfg: HarnessConfig = HarnessConfig(), encoder: QueryEncoder | None = None,
                  candidate_encoder: QueryEncoder | None = None, benchmark: str = "",
                  progress: bool = True, encoder_settings: dict | None = None,
                  overwrite: bool = False) -> BenchmarkResult | None:
    """Score every dataset of ``registry`` found in ``source``; resumable; returns the result on rank 0.

    ``source``: :class:`ToySource` or :class:`MMEBSource` (anything with ``available``, ``version``,
    ``load``). ``encoder`` embeds queries (default: ``modes.encoder_for(cfg.mode)`` at the default
    ``InferenceConfig``, direct for a mode name of your own); ``candidate_encoder`` embeds candidates
    (default: direct); ``encoder_settings`` (threshold, generation budget: ``modes.settings_for``) are part
    of the run's identity. Writes ``out/<mode>/{<dataset>_score.json, <dataset>_pred.jsonl, manifest.json,
    results.json}`` and the cache under ``out/cache/<mode>/``. A folder made from other weights, data or
    settings refuses (``overwrite`` moves it aside; ``runs.RunFolder``). The oracle is :func:`run_oracle`.
    """
    if cfg.mode == "oracle":
        raise ValueError("the oracle is combined from the direct and always runs: use run_oracle")
    if encoder is None and cfg.mode in ENCODER_MODES:
        inference = InferenceConfig(batch_size=cfg.batch_size, latency_sample=cfg.latency_sample)
        encoder = encoder_for(backbone, cfg.mode, inference, cfg.prompt)
        encoder_settings = settings_for(cfg.mode, inference) if encoder_settings is None else encoder_settings
    out_dir = Path(out_dir)
    res_dir, cache_root = out_dir / cfg.mode, out_dir / "cache" / cfg.mode
    encode = encoder or direct_encoder(backbone, cfg.prompt, cfg.batch_size)
    cand_encode = candidate_encoder or direct_encoder(backbone, cfg.prompt, cfg.batch_size)
    settings, manifest = _identity(backbone, source, benchmark, cfg, encoder_settings)
    with RunFolder(res_dir, manifest, overwrite=overwrite):
        return _run(backbone, source, registry, cfg, encode, cand_encode, settings, res_dir, cache_root, benchmark,
                    progress)


def evaluate(backbone: Backbone, world_root: str | Path, registry: Mapping[str, DatasetInfo], mode: str = "direct",
             encoder: QueryEncoder | None = None, out_dir: str | Path | None = None, strict: bool = False,
             latency_sample: int = InferenceConfig.latency_sample, progress: bool = True, split: str = "eval",
             overwrite: bool = False) -> BenchmarkResult:
    """:func:`run_benchmark` on a toy world in one call: the demo's, the notebooks' and ``mmemb-lab evaluate``'s.

    Each dataset is one chunk, so the encoder sees every query of a dataset in one call (as a user calling
    it on a list would); without ``out_dir`` the files and cache go to a temporary folder."""

    cfg = HarnessConfig(mode=mode, strict=strict, chunk_size=_ONE_CHUNK, latency_sample=latency_sample)
    source = ToySource(Path(world_root), split)
    if out_dir is not None:
        return run_benchmark(backbone, source, registry, out_dir, cfg, encoder, benchmark="toy", progress=progress,
                             overwrite=overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        return run_benchmark(backbone, source, registry, tmp, cfg, encoder, benchmark="toy", progress=progress)


_ONE_CHUNK = 1 << 30


def _identity(backbone: Backbone, source, benchmark: str, cfg: HarnessConfig, encoder_settings: dict | None,
              ) -> tuple[dict, Manifest]:
    """What determines a mode's scores: a run folder made from other weights, data or settings is never reused."""
    weights = weights_digest(backbone.model)
    settings = {"benchmark": benchmark, "mode": cfg.mode, "prompt": cfg.prompt, "video_mode": backbone.video_mode,
                "weights": weights, "data": source.fingerprint() if hasattr(source, "fingerprint") else "",
                "encoder": dict(encoder_settings or {})}
    manifest = Manifest.make(f"benchmark/{cfg.mode}", settings,
                             inputs={"weights": weights, "data": settings["data"], "source": str(backbone.source)})
    return settings, manifest


def _run(backbone, source, registry, cfg, encode, cand_encode, settings, res_dir, cache_root, benchmark, progress):
    per: dict[str, DatasetResult] = {}
    embedded = {"queries": 0, "candidates": 0}
    main = distributed.is_main()
    for name, info in tqdm(registry.items(), desc=f"{benchmark or 'benchmark'} {cfg.mode}",
                           disable=not (progress and main)):
        score_file = res_dir / f"{name}_score.json"
        if score_file.exists():
            per[name] = read_dataset(res_dir, name)
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
            prepare_cache(cache, "cand", fingerprint(cands, {**common, "mode": "candidates"}))
            prepare_cache(cache, "qry", fingerprint(queries, common))
        distributed.barrier()
        c = embed_cached("cand", cands, cand_encode, cache, cfg)
        q = embed_cached("qry", queries, encode, cache, cfg)
        if main:
            embedded["candidates"] += c.computed_now
            embedded["queries"] += q.computed_now
            r = _score_and_write(info, es, q, c, lambda es2: cached_latency(encode, es2, cache, cfg), res_dir, cfg,
                                 backbone.video_mode)
            if r is not None:
                per[name] = r
        distributed.barrier()
    if not main:
        return None
    return _finish(backbone, registry, cfg, benchmark, per, embedded, res_dir)


def _finish(backbone: Backbone, registry: Mapping[str, DatasetInfo], cfg: HarnessConfig, benchmark: str,
            per: dict[str, DatasetResult], embedded: dict, res_dir: Path, upper_bound: bool = False) -> BenchmarkResult:
    """Aggregate by MMEB-V2's rules and write ``results.json``."""
    result = aggregate_results(per, registry, cfg.mode, benchmark, cfg.prompt, backbone.video_mode,
                               str(backbone.source), embedded, upper_bound)
    atomic_write_text(res_dir / "results.json", json.dumps(result.summary(), indent=1))
    return result


def run_oracle(backbone: Backbone, source, registry: Mapping[str, DatasetInfo], out_dir: str | Path,
               cfg: HarnessConfig = HarnessConfig(mode="oracle"), inference: InferenceConfig = InferenceConfig(),
               benchmark: str = "", progress: bool = True, overwrite: bool = False) -> BenchmarkResult | None:
    """The ``oracle`` mode: per query, the better of ``direct`` and ``always``; an upper bound for any gate.

    The two modes run first into ``out/direct`` and ``out/always`` (finished ones are reused, interrupted
    ones resume, see :func:`run_benchmark`); the oracle is then combined from their cached embeddings, so it
    embeds nothing itself. Per query it keeps the always embedding where that query's score is strictly
    higher (ties go to direct: reasoning must pay for its cost), and the combined embeddings are scored like
    any mode's, so every metric, top-1 and warning is the oracle's own. Latency, batched time and tokens are
    charged per query to the mode it picks (``scoring.oracle_picks``, ``scoring.mixed_cost``). ``results.json`` says
    ``upper_bound: true``: it picks with the answers known, so it is a ceiling, not a method.
    """
    out_dir = Path(out_dir)
    runs = {}
    for mode in ("direct", "always"):
        runs[mode] = run_benchmark(backbone, source, registry, out_dir, replace(cfg, mode=mode),
                                   encoder=encoder_for(backbone, mode, inference, cfg.prompt),
                                   encoder_settings=settings_for(mode, inference), benchmark=benchmark,
                                   progress=progress, overwrite=overwrite)
    cfg = replace(cfg, mode="oracle")
    res_dir = out_dir / "oracle"
    _, manifest = _identity(backbone, source, benchmark, cfg, settings_for("oracle", inference))
    with RunFolder(res_dir, manifest, overwrite=overwrite):
        if not distributed.is_main():
            return None
        per: dict[str, DatasetResult] = {}
        for name, info in registry.items():
            score_file = res_dir / f"{name}_score.json"
            if score_file.exists():
                per[name] = read_dataset(res_dir, name)
                continue
            if name not in runs["direct"].per_dataset or name not in runs["always"].per_dataset:
                continue  # not found or no usable query: missing in both modes, as here
            es = source.load(info, strict=cfg.strict)
            cached = {m: out_dir / "cache" / m / name for m in runs}
            c = load_cached("cand", cached["direct"], len(es.candidates))
            qd, qa = (load_cached("qry", cached[m], len(es.queries)) for m in ("direct", "always"))
            r = _score_oracle(info, es, qd, qa, c, runs["direct"].per_dataset[name].latency_ms_per_query,
                              runs["always"].per_dataset[name].latency_ms_per_query, res_dir, cfg,
                              backbone.video_mode)
            if r is not None:
                per[name] = r
        return _finish(backbone, registry, cfg, benchmark, per, {"queries": 0, "candidates": 0}, res_dir,
                       upper_bound=True)


def _score_oracle(info: DatasetInfo, es: MMEBSet, qd: Embedded, qa: Embedded, c: Embedded,
                  lat_direct: float | None, lat_always: float | None, res_dir: Path, cfg: HarnessConfig,
                  video_mode: str) -> DatasetResult | None:
    """One dataset of the oracle from the direct and always query embeddings and the candidates'."""
    bad = {**qd.bad, **qa.bad}
    es2, kept_q, kept_c = _drop_bad(es, bad, c.bad)
    if not es2.queries:
        log.warning("%s: no usable queries left after dropping unreadable data: %s", info.name, es2.problems[:5])
        return None
    cand = c.emb[kept_c]
    direct = score_set(es2, qd.emb[kept_q], cand, info.metric).per_query
    always = score_set(es2, qa.emb[kept_q], cand, info.metric).per_query
    use = np.zeros(len(es.queries), dtype=bool)
    use[kept_q] = oracle_picks(direct, always)  # (n_queries,) reason here
    share = float(use[kept_q].mean())
    kept = set(kept_q)

    def pick(i, if_always, if_direct):
        return None if i not in kept else (if_always if use[i] else if_direct)
    q = Embedded(torch.where(torch.as_tensor(use)[:, None], qa.emb, qd.emb), bad,
                  [pick(i, qa.generated[i], 0) for i in range(len(use))],
                  mixed_cost(qd.seconds, qa.seconds, share), qd.n_encoded, 0,
                  [pick(i, qa.rationales[i], "") for i in range(len(use))], [pick(i, bool(u), False)
                                                                                for i, u in enumerate(use)])
    latency = None if lat_direct is None or lat_always is None else mixed_cost(lat_direct, lat_always, share)
    return _score_and_write(info, es, q, c, lambda _: latency, res_dir, cfg, video_mode)


def _score_and_write(info: DatasetInfo, es: MMEBSet, q: Embedded, c: Embedded,
                     latency_of: Callable[[MMEBSet], float | None], res_dir: Path, cfg: HarnessConfig,
                     video_mode: str) -> DatasetResult | None:
    """Score one dataset from its query and candidate embeddings; write its predictions, then its score file.

    ``latency_of(es2)``: ms per query of the mode, given the set left after dropping unreadable data."""
    es2, kept_q, kept_c = _drop_bad(es, q.bad, c.bad)
    if not es2.queries:
        log.warning("%s: no usable queries left after dropping unreadable data: %s", info.name, es2.problems[:5])
        return None
    latency = latency_of(es2)
    s = score_set(es2, q.emb[kept_q], c.emb[kept_c], info.metric)
    gen = [q.generated[i] for i in kept_q if q.generated[i] is not None]
    reasoned = [q.reasoned[i] for i in kept_q if q.reasoned[i] is not None]
    r = replace(s, modality=info.modality, meta_task=info.meta_task, problems=es2.problems[:cfg.max_problems],
                split_version=es.version, mode=cfg.mode, prompt=cfg.prompt, video_mode=video_mode,
                latency_ms_per_query=latency, batched_ms_per_query=1000 * q.seconds / max(1, q.n_encoded),
                generated_tokens_per_query=float(np.mean(gen)) if gen else None,
                reasoned_share=float(np.mean(reasoned)) if reasoned else None)
    ids = prediction_ids([x.item_id for x in es.queries])
    write_dataset(res_dir, r, [ids[i] for i in kept_q], [q.generated[i] for i in kept_q],
                  [q.reasoned[i] for i in kept_q], [q.rationales[i] for i in kept_q])
    return r
