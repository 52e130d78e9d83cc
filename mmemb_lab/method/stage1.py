"""Stage 1: joint contrastive + rationale-generation training on the selected latent reasoning.

Concept (docs/method.md, step 3)
    With r* the rationale selected for the pair (or none):

        L = InfoNCE(e(q + r*), t+) + lambda_gen * NextToken(r* | q) + lambda_dir * InfoNCE(e(q), t+)

    - the first term makes the embedding *after reasoning* match the target - and, because r* was
      selected by a counterfactual test on its content, it rewards reading what r* says;
    - the generation term teaches the model to write the selected rationales itself. Its labels cover
      the reasoning span (``<think>``, r*, ``</think>``) and, for pairs whose latent is "no reasoning",
      the decision to embed at once (``<|emb|>`` as the first assistant token) - never the prompt,
      the image or padding. (Ours: the paper's outline does not say how r = none is supervised.)
    - the direct term keeps the no-reasoning path strong (a prototype trained only on reasoning lost its
      direct path: docs/research-log.md, Prototypes).

    One forward over ``prompt + [<think> r* </think>] <|emb|>`` yields both the next-token loss and
    e(q + r*); a second forward gives e(q); targets (positive + mined negatives) a third. Only the query
    side reasons in the toy world (targets are plain captions, crops, scenes, pages, videos).

Ablations (``Stage1Config.rationales``): "selected" (ours), "random_worker" (a random worker's
rationale for every pair, no selection), "always" (the best candidate by gain for every pair, even
below tau); ``lambda_dir = 0`` and ``lambda_gen = 0`` switch the other terms off.
Defaults (weights, temperature, steps) are ours, documented here and in the run's config.json.

Used by: the demo, through :func:`run_arm` (``eval.direct/always/oracle``, ``stage1``), and notebook 04.
``mmemb-lab train`` does not run stage 1: it runs the contrastive fine-tuning of ``mmemb_lab.train.finetune``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed
from ..data import item_query
from ..eval.harness import _ONE_CHUNK, HarnessConfig, ToySource, run_benchmark, run_oracle
from ..eval.modes import InferenceConfig, encoder_for, settings_for
from ..model.backbone import EMB_TOKEN, THINK_OPEN, Backbone, reasoning_span
from ..model.embed import Input, base_model, collate, pool
from ..model.inference import LATENCY_SAMPLE, MAX_NEW_TOKENS
from ..runs import Manifest, RunFolder, atomic_write_text, weights_digest
from ..train.contrastive import TEMPERATURE, grad_cache_step, info_nce
from ..train.foundation import load_foundation, positive_and_negatives
from ..train.loop import LoopConfig, LoopResult, read_metrics, run_loop
from ..world.build import toy_registry
from ..world.tasks import Item, make_item
from .counterfactual import Pair, target_key
from .diagnostics import rationale_diagnostics

log = logging.getLogger(__name__)


RATIONALE_SOURCES = ("selected", "random_worker", "always", "none")
"""Where a stage-1 arm's rationales come from: the selection (ours), a random worker's candidate (the
ablation), the best candidate by gain whatever its sign on every pair (the always-reasoning baseline), or
none at all (the discriminative, direct-only baseline)."""


@dataclass(frozen=True)
class Stage1Config:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=300, lr=2e-4, warmup=20, ckpt_every=50))
    """Optimiser and schedule. Why lr 2e-4: on the validation split it beat 1e-4 and 4e-4, and the tiny
    preset's 160 steps beat 120 and 240 (docs/research-log.md, Settings checked on validation)."""
    batch_size: int = 32
    """Pairs per step (global)."""
    temperature: float = TEMPERATURE
    """InfoNCE temperature (``contrastive.TEMPERATURE``)."""
    lambda_gen: float = 1.0
    """Weight of NextToken(r* | q) (ours)."""
    lambda_dir: float = 1.0
    """Weight of the direct term InfoNCE(e(q), t+) (ours)."""
    hard_negatives: int = 3
    """Mined negatives per pair (other candidates of the item / near-miss targets)."""
    rationales: str = "selected"
    """"selected" (ours), "random_worker" or "always" (ablations)."""
    chunk_size: int = 0
    """GradCache chunk size (0 = unchunked): the contrastive batch no longer bounds activation memory."""
    length_buckets: int = 4
    """Unchunked steps run each forward as this many sub-batches of rows of similar length (1 = one padded
    batch). Same loss and gradient (rows do not interact inside the model); fewer padded positions
    (``make bench`` times both; docs/research-log.md, Stage 1: length buckets)."""
    def __post_init__(self):
        if self.rationales not in RATIONALE_SOURCES:
            raise ValueError(f"unknown rationale source {self.rationales!r}")
        if self.lambda_gen < 0 or self.lambda_dir < 0:
            raise ValueError("loss weights must be >= 0")
        if self.length_buckets < 1:
            raise ValueError("length_buckets must be >= 1")


def assistant_target(rationale: str | None) -> str:
    """What the model should write after the prompt: a reasoning span (or nothing), then ``<|emb|>``.

    No space after ``<think>``: a space first was measured and gave no gain (docs/research-log.md, Stage 1:
    no space after ``<think>``)."""
    return (reasoning_span(rationale) if rationale else "") + EMB_TOKEN


def generation_labels(backbone: Backbone, batch: dict, targets: list[str]) -> torch.Tensor:
    """Next-token labels on the reasoning span, or on ``<|emb|>`` alone for no-reasoning pairs.

    For a reasoning pair the final ``<|emb|>`` is not a label (it always follows ``</think>``)."""
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    for i, t in enumerate(targets):
        n = len(backbone.tokenizer(t, add_special_tokens=False)["input_ids"])
        reasoning = t.startswith(THINK_OPEN)
        end = ids.shape[1] - 1 if reasoning else ids.shape[1]
        labels[i, ids.shape[1] - n:end] = ids[i, ids.shape[1] - n:end]
    return labels


def length_buckets(backbone: Backbone, inputs: list[Input], assistants: list[str] | None = None, n: int = 4
                   ) -> list[list[int]]:
    """Row indices in ``n`` groups of similar token length (shortest first); every row exactly once."""
    return bucketed_batches(backbone, inputs, assistants, n)[0]


def bucketed_batches(backbone: Backbone, inputs: list[Input], assistants: list[str] | None = None, n: int = 4
                     ) -> tuple[list[list[int]], list[dict]]:
    """``length_buckets`` and each bucket's batch, from ONE ``collate`` of all rows (images are processed
    once): a bucket's batch is its rows with the left-padding columns none of them needs cut, and its own
    images - what ``collate`` builds for those rows alone (tests/test_stage1.py)."""
    full = collate(backbone, inputs, assistants)
    if n <= 1 or len(inputs) <= 1:
        return [list(range(len(inputs)))], [full]
    order = torch.argsort(full["attention_mask"].sum(1).cpu(), stable=True).tolist()
    k = -(-len(order) // n)
    buckets = [order[i:i + k] for i in range(0, len(order), k)]
    return buckets, [sub_batch(full, b, backbone.merge) for b in buckets]


def sub_batch(batch: dict, rows: list[int], merge: int) -> dict:
    """Rows ``rows`` of a left-padded ``collate`` batch, as ``collate`` builds them on their own. Which
    images belong to which row is read off the batch: row by row, its image tokens use up the images'
    merged-token counts in order (``merge``: the backbone's spatial merge)."""
    idx = torch.tensor(rows, device=batch["input_ids"].device)
    width = int(batch["attention_mask"][idx].sum(1).max())
    out = {k: batch[k][idx][:, -width:] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "pixel_values" in batch:
        per_image = (batch["image_grid_thw"].prod(-1) // merge ** 2).tolist()
        first, j = [0], 0
        for tokens in batch["mm_token_type_ids"].sum(1).tolist():
            while tokens > 0:
                tokens, j = tokens - per_image[j], j + 1
            first.append(j)
        patches = np.cumsum([0] + batch["image_grid_thw"].prod(-1).tolist())
        imgs = [j for r in rows for j in range(first[r], first[r + 1])]
        if imgs:
            out["pixel_values"] = torch.cat([batch["pixel_values"][patches[j]:patches[j + 1]] for j in imgs])
            out["image_grid_thw"] = batch["image_grid_thw"][imgs]
    return {k: out[k] for k in batch if k in out}


def in_row_order(parts: torch.Tensor, buckets: list[list[int]]) -> torch.Tensor:
    """Rows computed bucket by bucket, put back in the original row order."""
    order = torch.tensor([i for b in buckets for i in b], device=parts.device)
    return parts[torch.argsort(order)]


class Stage1Model(torch.nn.Module):
    """All stage-1 forwards in ONE call (DDP-safe). Each part is one batch, or a list of sub-batches
    (length buckets) whose outputs are concatenated in list order."""
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, reasoned: dict | None, labels: torch.Tensor | None, direct: dict | None,
                targets: dict | None):
        """(summed next-token loss, #label tokens, e(q + r*), e(q), e(targets)); parts given as None are skipped."""
        base = base_model(self.model)
        lm_sum, n_lab, e_r = torch.zeros((), device=self.model.device), 0, None
        if reasoned is not None:
            e_r = []
            for b, lb in zip(*((reasoned, labels) if isinstance(reasoned, list) else ([reasoned], [labels]))):
                states = base(**b, use_cache=False).last_hidden_state
                logits = self.model.lm_head(states[:, :-1])
                lab = lb[:, 1:].reshape(-1)
                lm_sum = lm_sum + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab, ignore_index=-100,
                                                  reduction="sum")
                n_lab += int((lab != -100).sum())
                e_r.append(pool(states))
            e_r = torch.cat(e_r)

        def embed_all(part):
            if part is None:
                return None
            return torch.cat([pool(base(**b, use_cache=False).last_hidden_state)
                              for b in (part if isinstance(part, list) else [part])])

        return lm_sum, n_lab, e_r, embed_all(direct), embed_all(targets)


def load_stage1_set(selection_dir: str | Path, world_seed: int, hard_fraction: float, source: str = "selected",
                    seed: int = 0) -> list[tuple[Item, str | None]]:
    """(item, r*) pairs from a selection run: the selected rationale, or an ablation's choice."""
    sel_dir = Path(selection_dir)
    rows = [json.loads(ln) for ln in (sel_dir / "stage1_set.jsonl").read_text().splitlines() if ln.strip()]
    gains: dict[str, list[dict]] = {}
    for ln in (sel_dir / "gains.jsonl").read_text().splitlines():
        if ln.strip():
            g = json.loads(ln)
            gains.setdefault(g["item_id"], []).append(g)
    rng = np.random.default_rng([seed, 23])
    out = []
    for r in rows:
        item = make_item(r["dataset"], world_seed, "train", r["index"], hard_fraction)
        if item.item_id != r["item_id"]:
            raise ValueError(f"{sel_dir}: row {r['item_id']} does not match the world (seed {world_seed})")
        cands = [g for g in gains[r["item_id"]] if g["status"] == "ok"]
        if source == "selected":
            rat = r["rationale"]
        elif source == "none":
            rat = None
        elif source == "random_worker":
            rat = cands[int(rng.integers(len(cands)))]["rationale"] if cands else None
        else:  # always: the best candidate by swap gain, whatever its gain
            rat = max(cands, key=lambda g: g["gain_swap"])["rationale"] if cands else None
        out.append((item, rat))
    return out


def _query(x: Item | Pair) -> Input:
    return x.query() if isinstance(x, Pair) else item_query(x)


def _pair_id(x: Item | Pair) -> str:
    return x.id if isinstance(x, Pair) else x.item_id


def _targets(x: Item | Pair, rng: np.random.Generator, k: int) -> tuple[Input, str, list[Input], list[str]]:
    """Positive, its key, ``k`` negatives and their keys: mined from a toy item, or drawn from a real pair's own
    negatives (with replacement when it has fewer than ``k``)."""
    if not isinstance(x, Pair):
        return positive_and_negatives(x, rng, k)
    picked = [x.negatives[int(j)] for j in rng.choice(len(x.negatives), k, replace=len(x.negatives) < k)]
    return x.positive, target_key(x.positive), picked, [target_key(n) for n in picked]


def make_step_fn(backbone: Backbone, data: list[tuple[Item | Pair, str | None]], cfg: Stage1Config, seed: int):
    world = max(1, distributed.world_size())
    per_rank = cfg.batch_size // world

    def step_fn(step: int, module) -> dict:
        rng = np.random.default_rng([seed, step])
        idx = rng.choice(len(data), cfg.batch_size, replace=len(data) < cfg.batch_size)
        # every rank draws the negatives of the whole global batch, in order, and keeps its slice: the rng
        # stream, hence the batch, is the same in 1 process as in N
        drawn = [_targets(data[int(i)][0], rng, cfg.hard_negatives) for i in idx]
        lo = distributed.rank() * per_rank
        batch, drawn = [data[int(i)] for i in idx[lo:lo + per_rank]], drawn[lo:lo + per_rank]
        queries = [_query(it) for it, _ in batch]
        targets_text = [assistant_target(r) for _, r in batch]
        pos, negs, ids, nids = [], [], [], []
        for p, pid, neg, nid in drawn:
            pos.append(p)
            ids.append(pid)
            negs += neg
            nids += nid
        share = float(np.mean([r is not None for _, r in batch]))
        if cfg.chunk_size:
            return _chunked_step(backbone, module, cfg, queries, targets_text, pos + negs, len(pos), (ids, nids)) | {
                "reasoning_share": share}
        tgts, n = pos + negs, cfg.length_buckets
        (rb, reasoned), (db, direct), (tb, targets) = (bucketed_batches(backbone, queries, targets_text, n),
                                                       bucketed_batches(backbone, queries, None, n),
                                                       bucketed_batches(backbone, tgts, None, n))
        labels = [generation_labels(backbone, r, [targets_text[i] for i in b]) for r, b in zip(reasoned, rb)]
        lm_sum, n_lab, e_r, e_d, e_t = module(reasoned, labels, direct, targets)
        e_r, e_d, e_t = in_row_order(e_r, rb), in_row_order(e_d, db), in_row_order(e_t, tb)
        # the mean over the global batch's label tokens; x world undoes DDP's average of the ranks' gradients
        lm = lm_sum * world / max(1, distributed.reduce_sum(n_lab))
        nce_r, nce_d = _contrastive(cfg, e_r, e_d, e_t, len(pos), (ids, nids))
        loss = nce_r.loss + cfg.lambda_gen * lm + cfg.lambda_dir * nce_d.loss
        return {"loss": loss, "nce_reasoned": nce_r.loss.detach(), "gen": lm.detach(), "nce_direct": nce_d.loss.detach(),
                "acc_reasoned": nce_r.accuracy, "acc_direct": nce_d.accuracy, "reasoning_share": share}

    return step_fn


def _contrastive(cfg: Stage1Config, e_r, e_d, e_t, n_pos: int, ids):
    """Both InfoNCE terms; ``ids`` = (positive ids, negative ids) for masking false negatives."""
    p, n = e_t[:n_pos], e_t[n_pos:]
    pos_ids, neg_ids = ids
    return (info_nce(e_r, p, cfg.temperature, hard_negatives=n, target_ids=pos_ids, negative_ids=neg_ids),
            info_nce(e_d, p, cfg.temperature, hard_negatives=n, target_ids=pos_ids, negative_ids=neg_ids))


def _chunked_step(backbone, module, cfg, queries, targets_text, target_inputs, n_pos, ids) -> dict:
    """The joint loss under GradCache (``contrastive.grad_cache_step``): the contrastive terms couple the
    batch, the generation term is each query chunk's own. Same gradient as the unchunked step
    (tests/test_stage1.py), with the activation memory of one chunk."""
    k = cfg.chunk_size
    qc = [queries[i:i + k] for i in range(0, len(queries), k)]
    tc = [targets_text[i:i + k] for i in range(0, len(queries), k)]
    xc = [target_inputs[i:i + k] for i in range(0, len(target_inputs), k)]
    reasoned = [collate(backbone, q, t) for q, t in zip(qc, tc)]
    labels = [generation_labels(backbone, b, t) for b, t in zip(reasoned, tc)]
    n_lab = max(1, distributed.reduce_sum(sum(int((lab[:, 1:] != -100).sum()) for lab in labels)))  # global
    n_lab /= max(1, distributed.world_size())  # x world: undoes DDP's average (as in the unchunked step)
    chunks = [(b, lab, collate(backbone, q), None) for b, lab, q in zip(reasoned, labels, qc)]
    chunks += [(None, None, None, collate(backbone, x)) for x in xc]

    def encode(chunk):
        lm_sum, _, er, ed, et = module(*chunk)
        if chunk[3] is not None:
            return {"t": et}, None
        return {"r": er, "d": ed}, cfg.lambda_gen * lm_sum / n_lab

    terms = {}

    def loss_fn(e):
        terms["r"], terms["d"] = _contrastive(cfg, e["r"], e["d"], e["t"], n_pos, ids)
        return terms["r"].loss + cfg.lambda_dir * terms["d"].loss

    module.zero_grad(set_to_none=True)
    _, gen = grad_cache_step(chunks, encode, loss_fn, getattr(module, "no_sync", None))
    nce_r, nce_d = terms["r"], terms["d"]
    lm = gen / cfg.lambda_gen if cfg.lambda_gen else 0.0
    loss = float(nce_r.loss.detach()) + gen + cfg.lambda_dir * float(nce_d.loss.detach())
    return {"loss": torch.tensor(loss), "backward_done": True, "nce_reasoned": float(nce_r.loss.detach()), "gen": lm,
            "nce_direct": float(nce_d.loss.detach()), "acc_reasoned": nce_r.accuracy, "acc_direct": nce_d.accuracy}


def train_stage1(backbone: Backbone, data: list[tuple[Item | Pair, str | None]], out_dir: str | Path,
                 cfg: Stage1Config = Stage1Config(), seed: int = 0, resume: bool = True,
                 stop_after: int | None = None, stale: str = "raise", upstream: dict | None = None) -> LoopResult:
    """Run (or resume) stage 1 on (toy item or real pair, r*) rows; the backbone's weights are updated in place.
    ``stale``: what to do with a checkpoint in ``out_dir`` written by another run ("raise", or "archive": move
    it aside and start afresh). ``upstream``: more inputs for the manifest (where the pairs came from)."""
    log.info("stage 1 (%s rationales): %d pairs, %d with reasoning", cfg.rationales, len(data),
             sum(r is not None for _, r in data))
    # a checkpoint may only be resumed by the run that wrote it: same pairs and rationales, config, seed and
    # starting weights (``runs.RunFolder``); "archive" moves another run aside, "raise" refuses
    pairs = hashlib.sha256(json.dumps([[_pair_id(it), r] for it, r in data]).encode()).hexdigest()[:16]
    manifest = Manifest.make("stage1", cfg, seed, {"pairs": pairs, "n_pairs": len(data),
                                                   "weights": weights_digest(backbone.model), **(upstream or {})})
    with RunFolder(out_dir, manifest, overwrite=stale == "archive", resume=resume):
        return run_loop(Stage1Model(backbone.model), make_step_fn(backbone, data, cfg, seed), cfg.loop, out_dir,
                        resume=resume, stop_after=stop_after, desc=f"stage 1 ({cfg.rationales})")


def run_arm(foundation: str, world_root: str, registry_info: dict, selection_dir: str, out_dir: str,
            cfg: Stage1Config, world_seed: int, hard_fraction: float, seed: int = 0, threads: int | None = None,
            full_eval: bool = True, latency_sample: int = LATENCY_SAMPLE, max_new_tokens: int = MAX_NEW_TOKENS,
            only: str | None = None) -> dict:
    """One arm of stage 1 from the foundation checkpoint: train, then measure (also runs in a subprocess).

    Returns the arm's numbers: wall time, always-mode scores, rationale diagnostics, and (``full_eval``)
    the direct and oracle modes. Writes ``arm.json`` and the trained model under ``out_dir``.
    ``only="direct"`` / ``"always"``: a baseline arm, evaluated in its own mode only (model saved)."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    backbone, _ = load_foundation(foundation)
    data = load_stage1_set(selection_dir, world_seed, hard_fraction, cfg.rationales, seed)
    t0 = time.time()
    res = train_stage1(backbone, data, out / "train", cfg, seed=seed, stale="archive")
    train_wall = time.time() - t0
    if res.resumed_from >= res.steps_done and (out / "arm.json").exists():  # already trained: report that run's time
        train_wall = json.loads((out / "arm.json").read_text()).get("train_wall_s", train_wall)
    registry = toy_registry(registry_info)
    if only is not None:
        return _baseline_arm(backbone, world_root, registry, out, cfg, res, train_wall, only, latency_sample,
                             max_new_tokens)
    inference = InferenceConfig(max_new_tokens=max_new_tokens, latency_sample=latency_sample)
    always, enc = _evaluate_mode(backbone, world_root, registry, out / "eval", "always", inference)
    diag = rationale_diagnostics(backbone, world_root, registry, max_new_tokens)
    arm = {"rationales": cfg.rationales, "steps": res.steps_done, "train_wall_s": train_wall,
           "always": always.summary() | {"unclosed_spans": enc.inner.unclosed},
           "rationale_sensitivity": diag.sensitivity, "rationale_step_accuracy": diag.step_accuracy,
           "rationale_answer_accuracy": diag.answer_accuracy, "rationale_examples": diag.examples,
           "training_curve_tail": read_metrics(out / "train")[-1:]}
    if full_eval:
        direct, _ = _evaluate_mode(backbone, world_root, registry, out / "eval", "direct", inference)
        arm["direct"] = direct.summary()
        oracle = run_oracle(backbone, ToySource(Path(world_root)), registry, out / "eval",
                            _harness_cfg("oracle", inference), inference, benchmark="toy", progress=False)
        arm["oracle"] = oracle.summary()
        backbone.save(out / "model")
    atomic_write_text(out / "arm.json", json.dumps(arm, indent=1))
    return arm


def _baseline_arm(backbone: Backbone, world_root: str, registry: dict, out: Path, cfg: Stage1Config, res: LoopResult,
                  train_wall: float, mode: str, latency_sample: int, max_new_tokens: int) -> dict:
    """A baseline trained for one mode, evaluated in that mode only: ``direct`` (no rationales) or ``always``
    (a rationale on every pair, written by the model itself at inference)."""
    inference = InferenceConfig(max_new_tokens=max_new_tokens, latency_sample=latency_sample)
    r, enc = _evaluate_mode(backbone, world_root, registry, out / "eval", mode, inference)
    arm = {"rationales": cfg.rationales, "steps": res.steps_done, "train_wall_s": train_wall,
           mode: r.summary() | ({"unclosed_spans": enc.inner.unclosed} if mode == "always" else {})}
    backbone.save(out / "model")
    atomic_write_text(out / "arm.json", json.dumps(arm, indent=1))
    return arm


def _harness_cfg(mode: str, inference: InferenceConfig):
    return HarnessConfig(mode=mode, chunk_size=_ONE_CHUNK, batch_size=inference.batch_size,
                         latency_sample=inference.latency_sample)


def _evaluate_mode(backbone: Backbone, world_root, registry: dict, out: Path, mode: str, inference: InferenceConfig):
    """One mode of an arm's model through the harness (the encoder ``modes.encoder_for`` makes, so that the
    oracle reuses the direct and always runs); returns the result and the encoder."""
    enc = encoder_for(backbone, mode, inference)
    r = run_benchmark(backbone, ToySource(Path(world_root)), registry, out, _harness_cfg(mode, inference), enc,
                      benchmark="toy", progress=False, encoder_settings=settings_for(mode, inference))
    return r, enc
