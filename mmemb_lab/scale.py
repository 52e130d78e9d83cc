"""Paper scale: the ``paper`` preset for Qwen3-VL-4B and a per-GPU memory estimate.

Two sources, kept apart and marked:
- **reference recipe** (VLM2Vec-V2, docs/method.md, MMEB-V2 section): InfoNCE at temperature 0.02, L2-normalised
  last-token pooling, global batch 1024 over 8 GPUs with cross-GPU gathering, GradCache chunking, LoRA
  r=16, lr 5e-5, 5000 steps, bf16, flash-attention 2;
- **ours** (reconstructed MMEmb-R1 defaults; the paper's exact values are not public): lambda_gen = 1,
  lambda_dir = 1, selection tau = ln 2 on both counterfactuals (removal and swap), rationales of at most 128 tokens.

The memory estimate is arithmetic, not a measurement: it counts bf16 weights, LoRA parameters with
their fp32 gradients and Adam moments, and per-sequence activations of the chunk being back-propagated
(GradCache makes the contrastive batch irrelevant to activation memory). Stated assumptions are in
``memory_estimate``'s return value; measure on the target GPU before trusting it.

Used by: ``make bench`` (``paper_memory_estimate_gb``). No command selects this preset: ``mmemb-lab demo
--preset`` takes ``tiny`` or ``smoke`` (``presets.PRESETS``), and ``mmemb-lab train`` takes its settings
as flags (``--steps``, ``--lr``, ``--batch-size``, ``--lora``, ``--backbone``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PaperPreset:
    checkpoint: str = "Qwen/Qwen3-VL-4B-Instruct"
    """Hub id of the backbone (the paper's 4B model)."""
    # reference recipe (VLM2Vec-V2)
    temperature: float = 0.02
    global_batch: int = 1024
    gpus: int = 8
    lora_r: int = 16
    lr: float = 5e-5
    steps: int = 5000
    bf16: bool = True
    attn_implementation: str = "flash_attention_2"
    chunk_size: int = 8
    """GradCache chunk per GPU (sequences back-propagated at once)."""
    # ours: reconstructed MMEmb-R1 defaults
    lambda_gen: float = 1.0
    lambda_dir: float = 1.0
    tau: float = 0.6931471805599453
    max_rationale_tokens: int = 128
    # model shape (Qwen3-VL-4B public config) used by the estimate
    params_text: float = 4.0e9
    params_vision: float = 0.4e9
    hidden: int = 2560
    layers: int = 36
    intermediate: int = 9728
    seq_len: int = 1024
    """Tokens per sequence at this scale (prompt + image tokens + rationale)."""

    def marks(self) -> dict:
        return {"reference_recipe": ["temperature", "global_batch", "gpus", "lora_r", "lr", "steps", "bf16",
                                     "attn_implementation", "chunk_size"],
                "ours": ["lambda_gen", "lambda_dir", "tau", "max_rationale_tokens"]}


def memory_estimate(p: PaperPreset = PaperPreset()) -> dict:
    """Per-GPU memory (GB) for LoRA training of the paper preset with GradCache chunks, with assumptions."""
    gb = 1024 ** 3
    weights = 2 * (p.params_text + p.params_vision) / gb  # bf16, replicated (DDP)
    # LoRA on 7 projections per layer: r * (in + out) each
    proj = [(p.hidden, p.hidden)] * 4 + [(p.hidden, p.intermediate)] * 2 + [(p.intermediate, p.hidden)]
    lora = p.layers * sum(p.lora_r * (a + b) for a, b in proj)
    lora_state = lora * (2 + 4 + 4 + 4) / gb  # bf16 weight, fp32 grad, Adam m and v
    # activations kept for backward, per token per layer ~ 34 * hidden bytes in bf16 (flash attention,
    # no recomputation; the common transformer rule of thumb)
    act = p.chunk_size * p.seq_len * p.layers * 34 * p.hidden / gb
    embeddings = 3 * p.global_batch * p.hidden * 4 / gb  # gathered query/target/negative embeddings, fp32
    total = weights + lora_state + act + embeddings
    return {"total_gb": total, "weights_gb": weights, "lora_params": lora, "lora_state_gb": lora_state,
            "activations_gb": act, "gathered_embeddings_gb": embeddings,
            "assumptions": "bf16 weights replicated per GPU (DDP); LoRA r on q,k,v,o,gate,up,down; "
                           "activations ~34*hidden bytes per token per layer for one GradCache chunk; "
                           "no activation checkpointing; generation (KV cache) not included",
            "preset": asdict(p)}
