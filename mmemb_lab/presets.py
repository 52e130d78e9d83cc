"""Run configurations: dataclasses composed into one run config, and named presets as plain functions.

``tiny()`` is the CPU preset that ``make demo`` and the tests use (2 cores, minutes); every field is
documented where it is defined (WorldConfig, FinetuneConfig, LoopConfig). A run writes its resolved
config next to its outputs (``config.json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .method.rl import RLConfig
from .method.selection import SelectionConfig
from .method.stage1 import Stage1Config
from .method.stage2 import Stage2Config
from .model.inference import LATENCY_SAMPLE
from .train.finetune import FinetuneConfig
from .train.loop import LoopConfig
from .world.build import WorldConfig


@dataclass(frozen=True)
class RunConfig:
    preset: str
    """Name of the preset this config came from."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """The toy world to generate and evaluate on."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Contrastive-only fine-tuning (``mmemb-lab train``; the demo runs stage 1, which includes this term)."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Candidate rationales and counterfactual selection after stage 0 (n_per_dataset=0 skips it)."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    """Stage 1 joint training (steps=0 skips it); the random-worker ablation uses the same settings."""
    stage2: Stage2Config = field(default_factory=Stage2Config)
    """Stage 2 (GRPO) on the stage-1 model, then the adaptive gate (rl.steps=0 in ``run`` skips it)."""
    run_stage2: bool = True
    """Run stage 2 after stage 1."""
    baselines: bool = True
    """Also train the two baselines for their own mode (no rationales; a rationale on every pair)."""
    parallel_arms: bool = True
    """Train the ablation arm in a second process at the same time (one thread each)."""
    description_items: int = 100
    """Held-out scenes, frames and pages each, to measure what the foundation model sees."""
    latency_sample: int = LATENCY_SAMPLE
    """Queries per dataset timed one at a time."""

    def to_dict(self) -> dict:
        return asdict(self)


def tiny(seed: int = 0) -> RunConfig:
    """CPU preset: 8 toy datasets x 100 eval queries (50 validation queries choose the gate's threshold), 256
    training rows each, 100 fine-tuning steps,
    192 selected pairs per dataset, 160 stage-1 steps at lr 2e-4 (better on validation than 120 or 240 steps and
    than lr 1e-4 or 4e-4), a demo of minutes on 2 cores (docs/research-log.md, Settings checked on validation;
    Evaluation: run time)."""
    return RunConfig("tiny", WorldConfig(seed=seed, n_train=256, n_eval=100, n_val=50),
                     FinetuneConfig(loop=LoopConfig(steps=100, lr=2e-4, warmup=10, ckpt_every=25)),
                     SelectionConfig(n_per_dataset=192),  # 64: stage 1 memorised 512 pairs (direct hard -14)
                     Stage1Config(loop=LoopConfig(steps=160, lr=2e-4, warmup=20, ckpt_every=40),
                                  hard_negatives=2), latency_sample=LATENCY_SAMPLE)


def smoke(seed: int = 0) -> RunConfig:
    """Seconds-long preset for tests: tiny sizes everywhere."""
    return RunConfig("smoke", WorldConfig(seed=seed, n_train=16, n_eval=12, n_val=6),
                     FinetuneConfig(loop=LoopConfig(steps=4, lr=2e-4, warmup=1, ckpt_every=2),
                                    batch_size=8), SelectionConfig(n_per_dataset=3, own_max_new_tokens=8),
                     Stage1Config(loop=LoopConfig(steps=2, lr=5e-4, warmup=1, ckpt_every=2), batch_size=4),
                     Stage2Config(RLConfig(steps=2, prompts_per_step=2, num_generations=2, max_completion_length=8,
                                           probe_every=1, seed=seed), n_per_dataset=1, probe_per_dataset=1,
                                  thresholds=(0.1, 0.5, 0.9), max_new_tokens=8),
                     parallel_arms=False, description_items=4, latency_sample=2)


PRESETS = {"tiny": tiny, "smoke": smoke}
