"""Stage 2: learn *when* to reason, by GRPO with the utility-gap reward (docs/method.md, step 4).

Concept
    The stage-1 model can both embed directly and reason-then-embed. Stage 2 turns the first
    assistant token into a learned decision. For each training query the policy samples a group of G
    completions; each either opens a span and writes a rationale (``<think> r </think><|emb|>``) or
    embeds at once (``<|emb|>``). Each completion is scored by ``mmemb_lab.method.rewards`` (utility gap
    delta = s(q + r, t+) - s(q, t+) under the current policy, minus a per-token cost, plus a format
    term); advantages are the rewards normalised within the group (:func:`group_advantages`), and the
    policy gradient raises the log-probability of completions that beat their group. Queries where
    reasoning pays (hard items whose rationale resolves the chain) learn to open the span; queries
    where it does not (easy items) learn to embed at once. The rationale tokens are trained by the same
    signal, so reasoning that raises the pair's confidence is reinforced.

    Implementation: trl's ``GRPOTrainer`` (CPU here; accelerate / DeepSpeed / vLLM rollouts on GPUs
    through trl's own options). Our pieces: a processor for the tiny or real Qwen-VL that needs no
    torchvision (:func:`make_processor`; its chat template renders exactly ``embed.prompt_text``),
    a dataset of conversational prompts with an ``images`` column (:func:`rl_dataset`), the reward
    functions, and a callback that measures the gate's invocation rate on a probe set during training.

Entry point: :func:`train_rl` (the backbone's weights are updated in place). On GPUs, run the calling
script under ``accelerate launch``; ``RLConfig.prompts_per_step`` is then per process.

Where our GRPO departs from textbook GRPO (DeepSeekMath) - and from the paper's outline
    - **Constrained decision token** (ours, ``constrain_decision``): at the first sampled position only
      ``<think>`` and ``<|emb|>`` may be drawn (``begin_suppress_tokens``). Every completion is then a
      real choice between the two paths; the loss still uses the unconstrained log-probability, so
      the gradient moves p(<think>) against p(<|emb|>) and the rest of the vocabulary.
    - **Decision exploration** (ours, ``decision_exploration``): the first token is sampled from
      (1 - eps) p + eps uniform over the two decisions (:class:`DecisionExploration`). GRPO only learns the
      decision from groups that contain both choices; a stage-1 model that opens with p = 0.995 yields
      groups that all reason, and the decision never moves. The loss uses the policy's own log-probability,
      so this gradient is slightly off-policy on that one token.
    - **Rollouts stop at ``</think>``**, as inference does: ``<|emb|>`` is appended when the rationale is
      embedded, so the policy is never trained (or penalised) on what it writes after closing the span.
    - **What is trained** (``train``): "all" updates the whole model, as textbook GRPO would; "decision"
      (ours) updates only the ``<think>`` row of the output embedding (untied first from the input
      embedding, so the rationale written after ``<think>`` does not move), a linear gate on the state at
      the assistant start. "decision" cannot touch the direct embedding (the ``<think>`` row only enters
      inputs that reason), which "all" lowered (docs/research-log.md, Stage 2: only the decision trains).
    - **Greedy rationales for the decision** (ours, ``rationale="greedy"``, with ``train="decision"``): the
      rollout samples the decision token alone, and an opening is credited with the rationale the model
      writes *at inference* (greedy, generated once per query and cached: the writer is frozen). Sampled
      rationales are worse than those inference writes, and the gate judged on them closed everywhere
      (docs/research-log.md, Stage 2: greedy rationales). The one-token rollouts also make a step cheap
      (no 64-token sampling for every completion).
    - **Loss aggregation**: trl's default ``loss_type="dapo"`` (token losses averaged over all active
      tokens of the batch) instead of the per-sequence mean, which would favour short completions with
      positive advantage and long ones with negative advantage. Configurable.
    - **No KL by default** (``beta=0.0``, trl's default; DAPO / Dr. GRPO drop it): no reference model
      copy. Set ``beta > 0`` for the textbook KL to the initial policy (trl keeps a frozen copy, or
      disables LoRA adapters when the policy is a peft model).
    - **One policy update per generation batch** (``num_iterations=1``): the importance ratio is 1 and
      clipping (``epsilon``) is inactive; raise ``num_iterations`` for PPO-style reuse.
    - **Moving reward**: the reward is computed by the policy's own embeddings (``rewards``), not by
      a fixed verifier.
    - The paper does not say how rewards are combined or which loss variant it uses; ours are the
      documented defaults above and in ``RLConfig`` / ``rewards.RewardConfig``.

Used by: the demo (stage 2, ``eval.adaptive``), notebook 05 (reward and invocation curves).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import distributed
from ..model.backbone import EMB_TOKEN, THINK_CLOSE, THINK_OPEN, Backbone
from ..model.embed import Input
from ..model.inference import THRESHOLD
from .rewards import PairTargets, RewardConfig, reward_functions
from .rl_data import CHAT_TEMPLATE, make_processor, prompt_messages, rl_dataset, toy_rl_pairs
from .rl_decision import (
    DecisionExploration,
    GreedyRationales,
    WithGreedyRationale,
    _decision_only,
    _with_processor,
    untie_output_embedding,
)

# what a user of stage 2 reaches for, wherever it is defined
__all__ = ["RLConfig", "RLResult", "train_rl", "probe_invocation", "group_advantages", "read_rl_run",
           "read_decision_rows", "toy_rl_pairs", "make_processor", "prompt_messages", "rl_dataset", "CHAT_TEMPLATE",
           "GreedyRationales", "DecisionExploration", "untie_output_embedding"]

log = logging.getLogger(__name__)

def group_advantages(rewards, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages as trl computes them: reward minus its group's mean, divided by the group's
    (Bessel-corrected) std + eps (``scale="group"``), the batch std (``"batch"``) or nothing (``"none"``).

    ``rewards``: (n_groups * group_size,), consecutive rows = one prompt's group (trl's order)."""
    r = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    g = r.view(-1, group_size)  # (groups, G)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(adv)
        adv = adv / (std + eps)
    elif scale == "batch":
        adv = adv / ((r.std() if r.numel() > 1 else torch.tensor(0.0, device=r.device)) + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}")
    return adv.reshape(-1)


# ---------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class RLConfig:
    """Stage-2 settings. The defaults are what the demo runs (ours; the paper's are not public), the decision
    alone trained with Dr. GRPO; :meth:`textbook` gives GRPO as published (every weight, sampled rationales,
    group-std scaling), which left the gate shut everywhere here (docs/research-log.md, Stage 2: the GRPO
    settings)."""

    steps: int = 80
    """Optimiser steps (one generation batch each)."""
    lr: float = 3e-3
    """Learning rate (AdamW, constant). High because only one output-embedding row trains (``train``). On the
    validation split 3e-3 beat 1e-3 and 1e-2 (docs/research-log.md, Settings checked on validation)."""
    prompts_per_step: int = 8
    """Distinct queries per step (per process); each is sampled ``num_generations`` times."""
    num_generations: int = 6
    """Group size G: completions per query, normalised together."""
    max_completion_length: int = 64
    """Token budget of a completion (decision + span + <|emb|>); a span still open at the end is "unclosed"."""
    temperature: float = 0.8
    """Sampling temperature of the rollouts (textbook: 1.0)."""
    beta: float = 0.0
    """KL coefficient to the initial policy (0: no reference model, trl's default)."""
    epsilon: float = 0.2
    """PPO clipping range (active only with num_iterations > 1)."""
    num_iterations: int = 1
    """Policy updates per generation batch."""
    loss_type: str = "dapo"
    """trl loss aggregation ("grpo", "dr_grpo", "dapo", "bnpo", ...)."""
    scale_rewards: str = "none"
    """Advantage scaling: "group" (textbook GRPO), "batch" or "none" (Dr. GRPO, ours)."""
    constrain_decision: bool = True
    """Sample only <think> or <|emb|> as the first token (see module docstring)."""
    decision_exploration: float = 0.5
    """Exploration on the decision (ours; textbook: 0): the first token is sampled from (1 - eps) * p + eps * uniform over
    {<think>, <|emb|>}. A stage-1 model that almost always opens (p_open 0.99) otherwise samples whole groups
    that all reason; their advantages sum to zero on the shared first token and the gate cannot learn."""
    rationale: str = "greedy"
    """What a ``<think>`` decision is credited with: "sampled" (the rationale trl samples in the rollout, textbook)
    or "greedy" (ours; needs ``train="decision"``): rollouts sample the decision token alone, and an opening
    is scored with the greedy rationale the model writes at inference (``GreedyRationales``, generated once per
    query: the writer is frozen)."""
    train: str = "decision"
    """What GRPO updates: "all" (every trainable weight: the decision, the rationales and, through shared
    weights, the embedding) or "decision" (ours: only the ``<think>`` row of the (untied) output embedding, i.e.
    a linear gate on the state at the assistant start; the embedder and the rationale writer stay as stage 1
    left them)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward constants (``mmemb_lab.method.rewards``)."""
    probe_every: int = 5
    """Measure the gate's invocation rate on the probe set every this many steps (and at 0 and the end)."""
    probe_threshold: float = THRESHOLD
    """Gate threshold for the probe's invocation rate."""
    embed_batch_size: int = 32
    """Batch size of the reward's and probe's embedding passes."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (trl turns it on by default; useless on a tiny model)."""
    trl_args: dict = field(default_factory=dict)
    """Extra ``trl.GRPOConfig`` arguments, applied last (GPU users: ``use_vllm``, ``vllm_mode``, ``bf16``...)."""
    seed: int = 0
    """Seed of trl's sampler and rollouts."""

    @classmethod
    def textbook(cls, **kw) -> "RLConfig":
        """GRPO as published: every trainable weight, the sampled rationale credited, group-std advantages,
        temperature 1, no decision exploration; ``kw`` overrides any field."""
        return cls(**{"train": "all", "rationale": "sampled", "scale_rewards": "group", "temperature": 1.0,
                      "decision_exploration": 0.0, **kw})

    def __post_init__(self):
        if self.steps < 1 or self.lr <= 0 or self.prompts_per_step < 1 or self.num_generations < 2:
            raise ValueError(f"invalid RL config: steps, lr, prompts_per_step >= 1, num_generations >= 2 ({self})")
        if self.train not in ("all", "decision"):
            raise ValueError(f"unknown train={self.train!r}: 'all' or 'decision'")
        if self.rationale not in ("sampled", "greedy"):
            raise ValueError(f"unknown rationale={self.rationale!r}: 'sampled' or 'greedy'")
        if self.rationale == "greedy" and self.train != "decision":
            raise ValueError("rationale='greedy' scores the frozen writer's rationale: it needs train='decision'")
        if not 0 <= self.decision_exploration <= 1:
            raise ValueError("decision_exploration must be in [0, 1]")
        if self.max_completion_length < 1 or self.probe_every < 1:
            raise ValueError("max_completion_length and probe_every must be >= 1")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"unknown scale_rewards {self.scale_rewards!r}")


@dataclass(frozen=True)
class RLResult:
    """What a stage-2 run did."""

    history: list[dict]
    """One dict per step from trl's log: step, reward, rewards/<term>/mean, sampled_invocation_rate,
    completions/mean_length, loss, ..."""
    invocation: list[dict]
    """Probe measurements: step, invocation_rate (p_open > probe_threshold), mean_p_open, and the same
    on easy / hard probe queries where labels exist."""
    steps_done: int
    wall_s: float
    decision_rows: dict = field(default_factory=dict)
    """{step: the ``<think>`` output row at that probe step} with ``train="decision"`` (step 0: stage 1's)."""


def probe_invocation(backbone: Backbone, inputs: Sequence[Input], hard: Sequence[bool | None] | None = None,
                     threshold: float = THRESHOLD, batch_size: int = 32) -> dict:
    """The gate's invocation statistics on ``inputs`` (one prefill each): overall, easy and hard."""
    from ..model.gating import gate_forward

    p = gate_forward(backbone, inputs, batch_size).p_open.numpy()
    out = {"invocation_rate": float((p > threshold).mean()), "mean_p_open": float(p.mean())}
    if hard is not None:
        h = np.array([bool(x) for x in hard])
        known = np.array([x is not None for x in hard])
        for name, m in (("easy", known & ~h), ("hard", known & h)):
            out[f"invocation_rate_{name}"] = float((p[m] > threshold).mean()) if m.any() else None
            out[f"mean_p_open_{name}"] = float(p[m].mean()) if m.any() else None
    return out


def _probe_callback(backbone: Backbone, probe: Sequence[PairTargets], cfg: RLConfig, records: list[dict],
                    rows: dict[int, torch.Tensor]):
    """Measures the probe's invocation rate every ``cfg.probe_every`` steps; with ``train="decision"`` it also
    keeps the ``<think>`` output row at those steps in ``rows`` (the whole of what GRPO changed by then)."""
    from transformers import TrainerCallback

    inputs = [p.query for p in probe]
    hard = [p.needs_reasoning for p in probe]
    think = backbone.token_id(THINK_OPEN)

    class InvocationProbe(TrainerCallback):
        def _measure(self, step: int) -> None:
            records.append({"step": step, **probe_invocation(backbone, inputs, hard, cfg.probe_threshold,
                                                              cfg.embed_batch_size)})
            if cfg.train == "decision":
                rows[step] = backbone.model.get_output_embeddings().weight[think].detach().float().cpu().clone()

        def on_train_begin(self, args, state, control, **kw):
            self._measure(0)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % cfg.probe_every == 0 or state.global_step == state.max_steps:
                self._measure(state.global_step)

    return InvocationProbe()


def train_rl(backbone: Backbone, pairs: Sequence[PairTargets], cfg: RLConfig = RLConfig(),
             out_dir: str | Path = "runs/rl", probe: Sequence[PairTargets] | None = None,
             reward_funcs: list | None = None, progress: bool = False) -> RLResult:
    """Run GRPO on ``pairs`` with trl; the backbone's weights are updated in place.

    ``probe`` (default: up to 64 of ``pairs``) is the set on which the gate's invocation rate is
    tracked. ``reward_funcs`` replaces the default rewards (``rewards.reward_functions``; used by tests
    to build constructed cases). Writes ``config.json``, ``history.jsonl`` and ``invocation.jsonl``
    to ``out_dir``."""
    from transformers import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from ..runs import atomic_torch_save, atomic_write_text

    pairs = list(pairs)
    if len(pairs) < cfg.prompts_per_step:
        raise ValueError(f"{len(pairs)} training queries for {cfg.prompts_per_step} prompts per step")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():  # every rank runs this function; one writes
        atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=1))
    model = backbone.model
    think, emb = backbone.token_id(THINK_OPEN), backbone.token_id(EMB_TOKEN)
    vocab = model.get_output_embeddings().weight.shape[0]
    gen_kwargs = {"begin_suppress_tokens": [i for i in range(vocab) if i not in (think, emb)]} \
        if cfg.constrain_decision else None
    greedy = cfg.rationale == "greedy"
    cuda = torch.cuda.is_available()
    # bf16 only for bf16 weights (a Qwen-VL release): an fp32 model trains in fp32, since bf16 autocast over
    # it turned weights into NaN on a GPU (docs/research-log.md, GPU).
    bf16 = cuda and next(model.parameters()).dtype == torch.bfloat16
    args = GRPOConfig(**{**dict(
        output_dir=str(out / "trl"), use_cpu=not cuda, bf16=bf16,
        max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations, gradient_accumulation_steps=1,
        num_generations=cfg.num_generations, max_completion_length=1 if greedy else cfg.max_completion_length,
        temperature=cfg.temperature, beta=cfg.beta, epsilon=cfg.epsilon, num_iterations=cfg.num_iterations,
        loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards, generation_kwargs=gen_kwargs,
        activation_checkpointing=cfg.activation_checkpointing, remove_unused_columns=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=not progress, seed=cfg.seed,
        # trl gathers the batch's images for its logs only on ranks whose prompts have images: a rank with
        # text-only prompts skips that collective and every rank hangs (2 processes, mixed modalities)
        log_multimodal=False), **cfg.trl_args})
    if reward_funcs is None:
        reward_funcs = reward_functions(backbone, pairs, cfg.reward, cfg.embed_batch_size,
                                        frozen_embedder=cfg.train == "decision")
    if greedy:
        writer = GreedyRationales(backbone, pairs, cfg.max_completion_length - 1, cfg.embed_batch_size)
        reward_funcs = [WithGreedyRationale(f, writer) for f in reward_funcs]
    records: list[dict] = []
    rows: dict[int, torch.Tensor] = {}
    callback = _probe_callback(backbone, list(probe) if probe is not None else pairs[:64], cfg, records, rows)
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a peft wrapper
    saved_gen = copy.deepcopy(owner.generation_config)
    # A completion ends at <|emb|> (direct), at </think> (the span is closed: as at inference, <|emb|> is
    # appended when the rationale is embedded) or at <|im_end|>; trl reads the ids from here.
    owner.generation_config.eos_token_id = [emb, backbone.token_id(THINK_CLOSE), backbone.tokenizer.eos_token_id]
    saved_generate = owner.__dict__.get("generate")
    if cfg.decision_exploration > 0:
        owner.generate = _with_processor(owner.generate, DecisionExploration(think, emb, cfg.decision_exploration))
    was_training = model.training
    restore = _decision_only(model, think) if cfg.train == "decision" else None
    t0 = time.time()
    try:
        trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args,
                              train_dataset=rl_dataset(pairs, backbone.video_mode),
                              processing_class=make_processor(backbone), callbacks=[callback])
        # PrinterCallback and the progress bar both print every log dict; the history is returned instead
        trainer.remove_callback(PrinterCallback)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_bar_only(ProgressCallback))
        trainer.train()
        steps = trainer.state.global_step
        history = [_clean(h) for h in trainer.state.log_history if "reward" in h]
    finally:
        owner.generation_config = saved_gen
        if restore is not None:
            restore()
        if saved_generate is None:
            owner.__dict__.pop("generate", None)
        else:
            owner.generate = saved_generate
        model.train(was_training)
    wall = time.time() - t0
    broken = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise FloatingPointError(f"GRPO left non-finite weights in {len(broken)} tensors ({broken[:3]}...); "
                                 f"run config in {out / 'config.json'}")
    if distributed.is_main():
        atomic_write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        atomic_write_text(out / "invocation.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        if rows:
            atomic_torch_save({"steps": sorted(rows), "rows": torch.stack([rows[k] for k in sorted(rows)])},
                              out / DECISION_ROWS)
    log.info("stage 2: %d GRPO steps in %.0f s; invocation rate %s -> %s", steps, wall,
             records[0]["invocation_rate"] if records else None, records[-1]["invocation_rate"] if records else None)
    return RLResult(history, records, steps, wall, rows)


def _bar_only(progress_callback: type) -> type:
    """transformers' ProgressCallback without its ``on_log`` (which writes each log dict under the bar)."""
    class BarOnly(progress_callback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            return None
    return BarOnly


def _clean(h: dict) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in h.items()}


def read_rl_run(out_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(history, invocation) of a finished run, from its files (for notebooks and figures)."""
    out = Path(out_dir)

    def rows(name: str) -> list[dict]:
        p = out / name
        return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []

    return rows("history.jsonl"), rows("invocation.jsonl")



DECISION_ROWS = "decision_rows.pt"
"""Under a run's folder: the ``<think>`` row at each probe step (``RLResult.decision_rows``)."""


def read_decision_rows(out_dir: str | Path) -> dict[int, torch.Tensor]:
    """{step: row} kept by a decision-only run (empty for a run that kept none)."""
    p = Path(out_dir) / DECISION_ROWS
    if not p.is_file():
        return {}
    d = torch.load(p, weights_only=True)
    return {int(k): r for k, r in zip(d["steps"], d["rows"])}
