"""MMEmb-R1's steps, in the order a run takes them (docs/method.md).

``reasoning`` (reasoning as a latent variable), ``workers`` and ``http_worker`` (candidate rationales: simulated,
any Hugging Face VLM, an OpenAI-compatible server), ``counterfactual`` and ``selection`` (keep a rationale only
where it helps its pair), ``rationales`` (both on a real training set: the ``rationales`` and ``select
--rationales`` commands), ``real_stages`` (stage 1 and stage 2 on a real training set), ``stage1`` (contrastive plus rationale generation) and ``diagnostics`` (does the embedding
use what a rationale says), ``rewards``, ``rl_data``, ``rl_decision`` and ``rl`` (GRPO), ``gate`` (the threshold,
chosen on validation), ``stage2`` (RL teaches the gate when reasoning pays), ``shortcut`` (a stage-1 ablation:
gold against format-only rationales).

May import: ``world``, ``model``, ``data``, ``train``, ``eval``, ``runs``, ``distributed``, ``paths``,
``summary``; and ``figures`` in ``shortcut``'s command-line entry only (tests/test_layout.py).
"""
