"""Pair-aware posterior selection by counterfactual intervention (docs/method.md, step 2).

Concept
    For a pair (q, t+) with negatives N and a candidate rationale r_k, an *evaluator* embedder scores a
    pair-aware match confidence C(q + r, t+): the log-probability of t+ under InfoNCE against the pair's
    own negatives (ours; cosine is reported beside it). The rationale's effect is measured against an
    intervention on r:

        removal:  gain_k = C(q + r_k, t+) - C(q, t+)                 do(r = nothing): the direct embedding
        swap:     gain_k = C(q + r_k, t+) - C(q + r_swap, t+)        do(r = the same worker's rationale
                                                                      written for ANOTHER query)
        swap_max: gain_k = C(q + r_k, t+) - max_j C(q + r_swap_j, t+) do(r = the best of ANOTHER query's
                                                                      rationales, any worker): a baseline

    Intuition: removal credits everything a rationale does, including the mere presence of
    reasoning-shaped text; swap keeps the format and changes only the content, so a rationale whose
    benefit is its format (the shortcut of always-reasoning embedders) gains nothing. Selection keeps,
    among the r_k whose gain clears tau, the one with the highest posterior score log p(r_k) + C(q + r_k, t+);
    if none clears it, the pair's latent is "no reasoning" (r = none). The prior p(r) over workers is fitted
    to the gain table by EM (``worker_prior``): p(t+ | q) = sum_r p(r) p(t+ | q, r), none included.

    Defaults (ours): the "both_max" counterfactual (removal AND swap_max gains clear tau: the rationale beats
    not reasoning and beats the strongest rationale written for another pair), tau = ln 2 (it at least
    doubles p(t+ | q)), the fitted prior. Why swap_max and not the same worker's swap ("both", the previous
    default): gains against each worker's own partner are not comparable - a hallucinating worker's partner
    rationale is wrong too, so its swap gain is inflated. Against one intervention per pair every candidate
    faces the same bar, and fewer hallucinating rationales are kept, at the price of more "no reasoning" on
    hard pairs (docs/research-log.md, Selection: the "both_max" counterfactual).

Deviations: the paper's exact confidence and threshold are not public; ours are documented defaults.
The swap partner is the same worker's rationale for the next query of the same dataset whose target
differs (ours), so the swap never pairs a query with its own rationale, nor with one that is right for
its target too.

Used by: the demo ("selection" in summary.json), stage 1 (the training set), notebooks 02 and 03.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..data import item_query, load_eval, visual_array
from ..eval.scoring import score_set
from ..model.backbone import Backbone
from ..model.embed import Input, embed
from ..runs import atomic_write_text
from ..train.contrastive import TEMPERATURE
from ..world.tasks import DATASETS, make_item
from .counterfactual import TAU, GainTable, Pair, pair_partners, score_candidate, score_pairs, swap_partners, toy_pairs
from .workers import HFWorker, WorkerSpec, toy_rationales

# the counterfactual gains are computed in ``counterfactual``; a user of selection reaches for them here too
__all__ = ["TAU", "GainTable", "Pair", "pair_partners", "score_candidate", "score_pairs", "swap_partners",
           "toy_pairs", "Selection", "SelectionConfig", "worker_prior", "select", "random_worker",
           "selection_summary", "gold_rationale_gain", "explorer", "run_selection"]


@dataclass(frozen=True)
class Selection:
    """The posterior choice per pair: a worker index, or -1 for "no reasoning"."""

    variant: str
    tau: float
    choice: np.ndarray
    table: GainTable = field(repr=False)
    prior: np.ndarray | None = field(default=None, repr=False)
    """The worker prior the ranking used (none first; ``worker_prior``), None for a uniform one."""

    def selected(self) -> np.ndarray:
        return self.choice >= 0

    def precision(self) -> float:
        sel = self.selected()
        if not sel.any():
            return float("nan")
        return float(np.mean(self.table.correct[np.where(sel)[0], self.choice[sel]]))

    def precision_best_ranking(self) -> float:
        """The precision an oracle ranking would reach with this filter: among pairs where some candidate clears
        tau, the share where a correct one does. What no choice among the passing candidates can beat; the
        rest of the gap to 1 is the filter's (the evaluator credits a wrong candidate, not the right one)."""
        t = self.table
        passing = t.valid & (np.nan_to_num(t.gains(self.variant), nan=-np.inf) > self.tau)
        some = passing.any(axis=1)
        if not some.any():
            return float("nan")
        return float(np.mean((passing & t.correct).any(axis=1)[some]))

    def share_by_worker(self) -> dict[str, float]:
        sel = self.choice[self.selected()]
        return {w: float(np.mean(sel == j)) if len(sel) else 0.0 for j, w in enumerate(self.table.workers)}

    def no_reasoning_rate(self, hard: bool) -> float:
        m = self.table.needs_reasoning == hard
        return float(np.mean(self.choice[m] < 0)) if m.any() else float("nan")

    def solved_directly_rate_per_dataset(self, hard: bool) -> dict[str, float]:
        """Share of pairs whose direct confidence is already p(t+ | q) >= exp(-tau), per dataset. Removal gains
        are capped at -log p(t+ | q), so on these pairs no rationale can clear tau: "no reasoning" is forced
        there by the evaluator's own confidence, not by the candidates."""
        return self._mean_per_dataset(self.table.logp_direct >= -self.tau, hard)

    def no_reasoning_rate_per_dataset(self, hard: bool) -> dict[str, float]:
        """``no_reasoning_rate`` within each dataset (datasets without such pairs are left out)."""
        return self._mean_per_dataset(self.choice < 0, hard)

    def _mean_per_dataset(self, flags: np.ndarray, hard: bool) -> dict[str, float]:
        """Mean of per-pair ``flags`` over the easy or hard pairs of each dataset that has some."""
        names = np.asarray(self.table.datasets)
        masks = {n: (names == n) & (self.table.needs_reasoning == hard) for n in sorted(set(self.table.datasets))}
        return {n: float(np.mean(flags[m])) for n, m in masks.items() if m.any()}

    def rationale(self, i: int) -> str | None:
        return None if self.choice[i] < 0 else self.table.texts[i][self.choice[i]]

    def recall_on_opportunity(self) -> float:
        """Among hard pairs with an opportunity - some candidate states every gold fact AND that correct
        candidate clears tau under this selection's counterfactual - the share that received a correct
        rationale. (Strictly, an opportunity needs the gold rationale's own gain; a correct candidate
        states the gold facts, so its gain stands in for it.)"""
        t = self.table
        passing = t.correct & (np.nan_to_num(t.gains(self.variant), nan=-np.inf) >= self.tau)
        opp = t.needs_reasoning & passing.any(axis=1)
        if not opp.any():
            return float("nan")
        got = np.array([c >= 0 and t.correct[i, c] for i, c in enumerate(self.choice)])
        return float(np.mean(got[opp]))

    def worker_step_accuracy(self) -> dict[str, float]:
        """Mean share of gold facts stated, per worker, over every pair (unusable outputs count 0)."""
        t = self.table
        if t.step_accuracy is None:
            return {}
        return {w: float(np.mean(t.step_accuracy[:, j])) for j, w in enumerate(t.workers)}


def worker_prior(table: GainTable, iters: int = 200, pseudocount: float = 1.0) -> np.ndarray:
    """The prior p(r | q) of the latent-variable view over r in {none, worker_1 .. worker_K}, fitted to the
    gain table by EM - from the evaluator's confidences alone, never from the ground truth.

    Model: p(t+ | q) = sum_r p(r) p(t+ | q, r) with p(t+ | q, r) = exp C(q + r, t+) (r = none: C(q, t+)).
    E-step: each pair's responsibilities over its usable values of r; M-step: p(r) = (sum of
    responsibilities + ``pseudocount``) / (n + (K + 1) ``pseudocount``). Returns (K + 1,), none first.

    Why it matters: where a worker's rationale and another's lead the evaluator to the same target -
    a hallucinated last fact that no negative of the pair happens to match ("centre red star" for
    "centre red triangle" when no candidate is a centre star) - their confidences tie to within noise
    and a uniform prior picks between them by that noise. The fitted prior breaks such ties toward the
    worker that wins where the evaluator CAN tell them apart."""
    like = np.concatenate([table.logp_direct[:, None], np.where(table.valid, table.logp_with, np.nan)], axis=1)
    usable = ~np.isnan(like)
    like = np.where(usable, like, -np.inf)
    prior = np.full(like.shape[1], 1.0 / like.shape[1])
    for _ in range(iters):
        a = like + np.log(prior)
        a = np.exp(a - a.max(axis=1, keepdims=True)) * usable
        resp = a / a.sum(axis=1, keepdims=True)
        new = (resp.sum(axis=0) + pseudocount) / (len(like) + like.shape[1] * pseudocount)
        if np.allclose(new, prior, atol=1e-9):
            break
        prior = new
    return prior


def select(table: GainTable, variant: str = "swap", tau: float = TAU, prior: np.ndarray | None = None
           ) -> Selection:
    """Among valid candidates whose gain exceeds tau, keep the one with the highest posterior score
    log p(r) + C(q + r, t+); if none passes, "no reasoning" (-1). ``prior``: ``worker_prior(table)``
    (none first), or None for a uniform prior (the highest confidence alone).

    The counterfactual is the *filter* (does the content matter for this pair?) and the pair-aware
    posterior is the *ranking*: gains of different workers are measured against different swap
    partners, so the largest gain is not the best rationale (a hallucinating worker whose own swap
    partner is very wrong can out-gain a correct one)."""
    g = np.nan_to_num(np.where(table.valid, table.gains(variant), -np.inf), nan=-np.inf)
    passing = g > tau
    log_prior = np.zeros(len(table.workers)) if prior is None else np.log(np.asarray(prior)[1:])
    conf = np.where(passing, np.nan_to_num(table.logp_with, nan=-np.inf) + log_prior[None, :], -np.inf)
    best = np.argmax(conf, axis=1)
    ok = passing.any(axis=1)
    return Selection(variant, tau, np.where(ok, best, -1), table, prior)


def random_worker(table: GainTable, seed: int = 0) -> Selection:
    """Baseline: always reason, with a uniformly random worker's (valid) rationale."""
    rng = np.random.default_rng([seed, 17])
    choice = np.array([int(rng.choice(np.where(v)[0])) if v.any() else -1 for v in table.valid])
    return Selection("random_worker", float("nan"), choice, table)


def selection_summary(sel: Selection, baselines: dict[str, Selection]) -> dict:
    """The ``selection`` block of summary.json."""
    fitted = {} if sel.prior is None else {"worker_prior": dict(zip(["none", *sel.table.workers], map(float, sel.prior)))}
    return {"variant": sel.variant, "tau": sel.tau, "n_pairs": int(len(sel.choice)), **fitted,
            "precision": sel.precision(), "precision_best_ranking": sel.precision_best_ranking(),
            "selected_share_by_worker": sel.share_by_worker(),
            "recall_on_opportunity": sel.recall_on_opportunity(), "worker_step_accuracy": sel.worker_step_accuracy(),
            "no_reasoning_rate_easy": sel.no_reasoning_rate(False),
            "no_reasoning_rate_hard": sel.no_reasoning_rate(True),
            "no_reasoning_rate_hard_per_dataset": sel.no_reasoning_rate_per_dataset(True),
            "solved_directly_rate_hard_per_dataset": sel.solved_directly_rate_per_dataset(True),
            "baselines": {k: {"precision": b.precision(), "selected_share_by_worker": b.share_by_worker(),
                              "no_reasoning_rate_easy": b.no_reasoning_rate(False),
                              "no_reasoning_rate_hard": b.no_reasoning_rate(True)} for k, b in baselines.items()}}


def gold_rationale_gain(evaluator: Backbone, world_root, registry, hard_only: bool = True) -> dict:
    """Hit@1 (or the dataset's metric) on hard eval items with the gold rationale appended minus without,
    per dataset and as the unweighted mean over datasets, in points.

    Also returns both scores per dataset (``direct``, ``gold``): where even the gold rationale does not
    lift the evaluator, no selection rule can find a rationale that helps, and a reward-following gate has
    no reason to open (the demo's ``reasoning_headroom`` figure)."""

    per, scores = {}, {"direct": {}, "gold": {}}
    for name, info in registry.items():
        es = load_eval(world_root, name, info.eval_type)
        qs = [q for q in es.queries if q.needs_reasoning or not hard_only]
        if not qs:
            continue
        sub = type(es)(es.name, qs, es.candidates, es.eval_type)
        c = embed(evaluator, list(es.candidates.values()))
        direct = embed(evaluator, [q.query for q in qs])
        gold = embed(evaluator, [Input(q.query.text, q.query.visual, q.query.instruction,
                                       " ".join(q.gold_steps) or None, q.query.name) for q in qs])
        scores["gold"][name] = score_set(sub, gold, c, info.metric).score
        scores["direct"][name] = score_set(sub, direct, c, info.metric).score
        per[name] = scores["gold"][name] - scores["direct"][name]
    return {"mean": float(np.mean(list(per.values()))) if per else float("nan"), "per_dataset": per, **scores}



def explorer(table: GainTable, pairs: Sequence[Pair], selection: Selection):
    """An ipywidgets explorer: pick a pair, see its image, query, target, every candidate's gains and the choice."""
    import ipywidgets as w

    options = [(f"{i}: {table.item_ids[i]} ({'hard' if table.needs_reasoning[i] else 'easy'})", i)
               for i in range(len(pairs))]
    pick = w.Dropdown(options=options, description="pair", layout=w.Layout(width="420px"))
    image, text = w.Image(format="png", width=220), w.HTML()

    def show(i: int) -> None:
        p = pairs[i]
        vis = p.item.query_visual if p.item.query_visual is not None else p.item.candidates[p.item.labels[0]][1]
        arr = visual_array(vis)
        buf = io.BytesIO()
        Image.fromarray(arr).resize((220, int(220 * arr.shape[0] / arr.shape[1])), 0).save(buf, "png")
        image.value = buf.getvalue()
        rows = "".join(
            f"<tr style='background:{'#dfe' if selection.choice[i] == j else 'white'}'><td>{wk}</td>"
            f"<td>{table.texts[i][j][:160]}</td><td>{table.gain_removal[i, j]:+.2f}</td>"
            f"<td>{table.gain_swap[i, j]:+.2f}</td><td>{'yes' if table.correct[i, j] else 'no'}</td></tr>"
            for j, wk in enumerate(table.workers))
        chosen = "no reasoning" if selection.choice[i] < 0 else table.workers[selection.choice[i]]
        text.value = (f"<b>query</b>: {p.item.query_inst} {p.item.query_text}<br><b>target</b>: {p.item.answer}"
                      f"<br><b>direct log p(t+)</b>: {table.logp_direct[i]:.2f} &nbsp; <b>selected</b>: {chosen}"
                      f"<table><tr><th>worker</th><th>rationale</th><th>removal</th><th>swap</th>"
                      f"<th>gold facts</th></tr>{rows}</table>")
    pick.observe(lambda ch: show(ch["new"]), names="value")
    show(0)
    return w.VBox([pick, w.HBox([image, text])])


@dataclass(frozen=True)
class SelectionConfig:
    n_per_dataset: int = 64
    """Training items per dataset that get candidate rationales and a counterfactual selection."""
    tau: float = TAU
    """Gain threshold (nats of log p(t+)); ours: ln 2, i.e. the rationale must double p(t+ | q). On the validation
    split it beat 0.35 and 1.0 (docs/research-log.md, Settings checked on validation)."""
    variant: str = "both_max"
    """Counterfactual used for the selection: "both_max" (the removal AND the swap_max gain clear tau), "both"
    (removal AND the same worker's swap), "swap", "removal" or "swap_max". Removal asks whether reasoning beats
    not reasoning, swap whether this content beats reasoning-shaped text written for another pair; requiring
    removal makes "no reasoning" the latent of a pair whose evaluator already finds its target directly."""
    fitted_prior: bool = True
    """Rank the passing candidates by log p(r) + C with the EM-fitted worker prior (``worker_prior``);
    False: a uniform prior (the highest confidence). The uniform ranking is reported as
    ``baselines.uniform_prior`` either way."""
    temperature: float = TEMPERATURE
    """Evaluator InfoNCE temperature for the pair-aware confidence (``contrastive.TEMPERATURE``)."""
    own_worker: bool = True
    """Add the stage-0 model's own sampled rationales as a worker ("own")."""
    own_max_new_tokens: int = 48
    """Generation budget of the own worker."""


def run_selection(evaluator: Backbone, world_seed: int, hard_fraction: float, cfg: SelectionConfig, out_dir,
                  progress: bool = True) -> tuple[GainTable, dict[str, Selection], list[Pair]]:
    """Workers write candidates for training items, the evaluator scores them, selection picks r* per pair.

    Writes ``gains.jsonl`` (one line per pair and worker) and ``stage1_set.jsonl`` (item id, selected
    rationale or null, worker) under ``out_dir``.
    """

    out = Path(out_dir)
    items = [make_item(name, world_seed, "train", i, hard_fraction)
             for name in sorted(DATASETS) for i in range(cfg.n_per_dataset)]
    rats = [toy_rationales(it, world_seed, tokenizer=evaluator.tokenizer) for it in items]
    if cfg.own_worker:
        spec = WorkerSpec("own", evaluator.source, max_new_tokens=cfg.own_max_new_tokens, batch_size=32,
                          max_rationale_tokens=cfg.own_max_new_tokens - 1)
        own = HFWorker(spec, evaluator)([item_query(it) for it in items], seed=world_seed)
        rats = [r + [o] for r, o in zip(rats, own)]
    pairs = toy_pairs(items, rats, seed=world_seed)
    table = score_pairs(evaluator, pairs, cfg.temperature, progress=progress)
    prior = worker_prior(table) if cfg.fitted_prior else None
    sels = {cfg.variant: select(table, cfg.variant, cfg.tau, prior)}
    for name, variant in (("removal_only", "removal"), ("swap", "swap"), ("both", "both"), ("swap_max", "swap_max"),
                          ("both_max", "both_max")):
        if variant != cfg.variant:
            sels[name] = select(table, variant, cfg.tau, prior)
    sels["uniform_prior"] = select(table, cfg.variant, cfg.tau)
    sels["random_worker"] = random_worker(table, world_seed)
    lines = []
    for i, p in enumerate(pairs):
        for j, r in enumerate(p.rationales):
            lines.append(json.dumps({"item_id": p.item.item_id, "dataset": p.item.dataset,
                                     "needs_reasoning": bool(p.item.needs_reasoning), "worker": r.worker,
                                     "status": r.status, "n_tokens": r.n_tokens, "rationale": r.text,
                                     "correct": bool(table.correct[i, j]),
                                     "logp_direct": float(table.logp_direct[i]),
                                     "logp_with": float(table.logp_with[i, j]), "logp_swap": float(table.logp_swap[i, j]),
                                     "gain_removal": float(table.gain_removal[i, j]),
                                     "gain_swap": float(table.gain_swap[i, j]),
                                     "cos_direct": float(table.cos_direct[i]), "cos_with": float(table.cos_with[i, j]),
                                     "cos_swap": float(table.cos_swap[i, j])}))
    atomic_write_text(out / "gains.jsonl", "\n".join(lines) + "\n")
    main = sels[cfg.variant]
    atomic_write_text(out / "stage1_set.jsonl", "\n".join(
        json.dumps({"item_id": p.item.item_id, "dataset": p.item.dataset, "index": int(p.item.item_id.split("-")[-1]),
                    "rationale": main.rationale(i),
                    "worker": None if main.choice[i] < 0 else table.workers[main.choice[i]]})
        for i, p in enumerate(pairs)) + "\n")
    return table, sels, pairs
