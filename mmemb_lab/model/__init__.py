"""The embedder itself: a Qwen-VL backbone, how an input becomes a vector, and what the trained model does at inference.

``backbone`` (load or build a Qwen3-VL / Qwen2.5-VL checkpoint, the tiny spec, special tokens), ``embed`` (inputs,
prompts, batching, pooling at ``<|emb|>``), ``inference`` (the inference config's defaults, writing a rationale and
embedding after it), ``gating`` (the gate at inference: one prefill gives p_open and the direct embedding).

May import: ``mmemb_lab.distributed`` only. Nothing here knows the toy world, training or evaluation, so the
same code runs a real checkpoint and the tiny one.
"""
