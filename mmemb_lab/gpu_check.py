"""The prepared GPU check (``make gpu-check``): the paper-scale model's speed and memory on one GPU, no download.

Concept
    What a researcher needs to know before renting GPUs for the paper recipe: how fast stage 1 trains a
    Qwen3-VL-4B at the recipe's per-GPU batch with GradCache, how much memory that takes, how many inputs per
    second the direct mode embeds, and what the gate costs per query, closed and open. The model is built
    from the released configuration's values (``QWEN3_VL_4B``, read from the public ``config.json`` of
    ``Qwen/Qwen3-VL-4B-Instruct``) with random weights: speed and memory do not depend on the weights, so
    nothing is downloaded. Inputs are toy-world items under the workbench's own tokenizer (ids below the
    4B vocabulary): sequences are shorter than real MMEB inputs (toy images are at most 256 x 256), so the
    tokens/s here is for short sequences; the report records the mean sequence length.

    Every measurement goes through the code a run uses: ``stage1.make_step_fn`` under ``train.run_loop``
    (LoRA on the language model as in the paper recipe), ``embed.embed``, ``gating.gate_forward`` (closed)
    and ``gating.gate_and_spans`` (open). ``scale="tiny"`` runs the same path with the tiny spec on the CPU,
    which is how ``make test`` keeps this script from rotting.

    MFU is an estimate: stage 1 under GradCache runs a forward without a graph, then a forward and a backward
    per chunk, about 2 + 2 + 2 = 6 N flops per token for N parameters (the backward of frozen LoRA-base
    weights still propagates activations; no weight gradients: we count it as 2 N). Divided by the GPU's
    dense bf16 peak, which this script takes from ``PEAK_TFLOPS`` by device name or from ``--peak-tflops``.

Used by: ``mmemb-lab gpu-check`` (``make gpu-check``), tests/test_gpu_check.py (tiny, CPU).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .data import item_query
from .method import stage1
from .model.backbone import (
    Backbone,
    TinySpec,
    attn_implementation,
    build_tiny,
    image_processor_for,
    lora_config,
    tiny_config,
)
from .model.embed import collate, embed
from .model.gating import gate_and_spans, gate_forward
from .paths import foundation_dir
from .runs import RunError, atomic_write_text
from .scale import PaperPreset
from .train.loop import LoopConfig, read_metrics, run_loop
from .world.tasks import DATASETS, HARD_FRACTION, make_item

QWEN3_VL_4B = {
    "text": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                 rms_norm_eps=1e-6, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                  "mrope_interleaved": True}),
    "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                   spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=2560,
                   num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
}
"""Shape values of the released ``Qwen/Qwen3-VL-4B-Instruct`` config.json (text and vision towers)."""

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 peak per GPU (vendor data sheets), looked up by a substring of the device name."""


def build_backbone(scale: str, tokenizer, device: str | torch.device) -> Backbone:
    """``"qwen3-vl-4b"``: the released shape in bf16 with random weights; ``"tiny"``: the tiny spec in fp32."""
    if scale == "tiny":
        return build_tiny(TinySpec(), tokenizer, device=device)
    if scale != "qwen3-vl-4b":
        raise ValueError(f"scale {scale!r}: expected 'qwen3-vl-4b' or 'tiny'")
    cls, cfg = tiny_config(TinySpec(arch="qwen3_vl"), tokenizer)  # the special-token ids of our tokenizer
    cfg = type(cfg)(text_config=QWEN3_VL_4B["text"], vision_config=QWEN3_VL_4B["vision"],
                    image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                    vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
                    tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs (a "meta" device checks the shape without memory)
        model = cls._from_config(cfg, attn_implementation=attn_implementation(), dtype=torch.bfloat16)
    return Backbone(model, tokenizer, image_processor_for("qwen3_vl"), "qwen3_vl", "qwen3-vl-4b (random weights)")


def _items(n: int, split: str = "train"):
    names = sorted(DATASETS)
    return [make_item(names[i % len(names)], 0, split, i, HARD_FRACTION) for i in range(n)]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stage1_speed(bb: Backbone, per_gpu_batch: int, chunk: int, steps: int, lora: bool) -> dict:
    """Stage-1 steps through ``train.run_loop``; the best step after the first, tokens/s and peak memory."""
    if lora:
        from peft import LoraConfig, get_peft_model

        bb = replace(bb, model=get_peft_model(bb.model, LoraConfig(**lora_config(PaperPreset().lora_r, dropout=0.0))))
    items = _items(max(64, per_gpu_batch))
    data = [(it, " ".join(it.gold_steps) if it.needs_reasoning else None) for it in items]
    cfg = stage1.Stage1Config(batch_size=per_gpu_batch, chunk_size=chunk, hard_negatives=1,
                              loop=LoopConfig(steps=steps, lr=1e-5, warmup=0, log_every=1, ckpt_every=10 ** 6))
    # tokens per sample: the query with its span and the positive target, as collated
    sample = [item_query(it, r) for it, r in data[:32]]
    tokens = float(collate(bb, sample)["attention_mask"].sum()) / len(sample) * 2
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        run_loop(stage1.Stage1Model(bb.model), stage1.make_step_fn(bb, data, cfg, seed=0), cfg.loop, tmp,
                 resume=False, desc="gpu-check stage 1")
        wall = [m["wall_s"] for m in read_metrics(tmp)]
    step_s = min(b - a for a, b in zip(wall, wall[1:])) if len(wall) > 1 else wall[0]
    params = sum(p.numel() for p in bb.model.parameters())
    return {"per_gpu_batch": per_gpu_batch, "gradcache_chunk": chunk, "lora_r": PaperPreset().lora_r if lora else 0,
            "s_per_step": step_s, "samples_per_s": per_gpu_batch / step_s,
            "tokens_per_sample_est": tokens, "tokens_per_s_est": per_gpu_batch * tokens / step_s,
            "flops_per_s_est": 6 * params * per_gpu_batch * tokens / step_s, "params": params,
            **({"peak_cuda_gb": torch.cuda.max_memory_allocated() / 2 ** 30} if torch.cuda.is_available() else {})}


def embed_speed(bb: Backbone, n: int, batch_size: int) -> dict:
    inputs = [item_query(it) for it in _items(n, "eval")]
    embed(bb, inputs[:batch_size], batch_size=batch_size)  # warm-up
    _sync()
    t = time.perf_counter()
    embed(bb, inputs, batch_size=batch_size)
    _sync()
    return {"inputs": n, "batch_size": batch_size, "inputs_per_s": n / (time.perf_counter() - t)}


def gate_latency(bb: Backbone, n: int, max_new_tokens: int) -> dict:
    """Per-query (batch 1) median ms: the gate's prefill alone (closed), and prefill plus the span (open)."""
    inputs = [item_query(it) for it in _items(n, "eval")]
    closed, opened = [], []
    for r in range(2):  # the first pass warms up
        for x in inputs:
            _sync()
            t0 = time.perf_counter()
            gate_forward(bb, [x])
            _sync()
            t1 = time.perf_counter()
            gate_and_spans(bb, [x], -1.0, max_new_tokens)
            _sync()
            if r:
                closed.append(1000 * (t1 - t0))
                opened.append(1000 * (time.perf_counter() - t1))
    return {"queries": n, "max_new_tokens": max_new_tokens, "closed_ms_p50": float(np.median(closed)),
            "open_ms_p50": float(np.median(opened))}


def run_gpu_check(out: str | Path = "runs/gpu-check", scale: str = "qwen3-vl-4b", per_gpu_batch: int | None = None,
                  chunk: int | None = None, steps: int = 3, n_embed: int = 256, n_gate: int = 16,
                  peak_tflops: float | None = None) -> dict:
    """Every measurement of the module docstring into ``out/gpu_check.json``; returns it."""
    from transformers import PreTrainedTokenizerFast

    paper = PaperPreset()
    per_gpu_batch = per_gpu_batch or paper.global_batch // paper.gpus
    chunk = paper.chunk_size if chunk is None else chunk
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if scale != "tiny" and device == "cpu":
        raise RunError("gpu-check at paper scale needs a CUDA GPU; on a CPU use --scale tiny")
    tok = PreTrainedTokenizerFast.from_pretrained(foundation_dir(), padding_side="left")
    bb = build_backbone(scale, tok, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    res = {"date": time.strftime("%Y-%m-%d"), "device": name, "scale": scale, "torch": torch.__version__,
           "attn_implementation": attn_implementation(),
           "embedding_direct": embed_speed(bb, n_embed, 32), "gate": gate_latency(bb, n_gate, paper.max_rationale_tokens),
           "stage1": stage1_speed(bb, per_gpu_batch, chunk, steps, lora=scale != "tiny")}
    peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    res["stage1"]["mfu_est"] = res["stage1"]["flops_per_s_est"] / (peak * 1e12) if peak else None
    res["peak_tflops"] = peak
    atomic_write_text(Path(out) / "gpu_check.json", json.dumps(res, indent=1))
    return res


__all__ = ["QWEN3_VL_4B", "PEAK_TFLOPS", "build_backbone", "run_gpu_check"]
