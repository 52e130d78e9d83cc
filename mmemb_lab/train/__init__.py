"""Training machinery shared by every stage, and stage 0.

``loop`` (one resumable training loop: AdamW, schedule, checkpoints, metrics), ``contrastive`` (InfoNCE with
embeddings gathered across ranks, GradCache), ``finetune`` (contrastive fine-tuning on MMEB-train-schema data),
``foundation`` (stage 0: the tiny model learns to see, describe and embed the toy world).

May import: ``world``, ``model``, ``data``, ``runs``, ``distributed``; one exception, named in
tests/test_layout.py: ``foundation.checkpoint`` reads ``method.workers`` so that the tokenizer's corpus holds
every text a simulated worker writes.
"""
