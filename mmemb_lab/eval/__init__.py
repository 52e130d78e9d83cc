"""Evaluation: which datasets a score is made of, how each is scored, and the one runner every mode goes through.

``registry`` (MMEB-V2 and the toy benchmark: datasets, metrics, meta-tasks), ``mmeb`` (MMEB-V2's files and
loaders), ``metrics`` (Hit@k, NDCG, MMEB aggregation), ``scoring`` (one result type per level), ``modes`` (direct,
always, adaptive, oracle: how a query becomes an embedding), ``embedding_cache`` (sharded, resumable embeddings),
``harness`` (``run_benchmark``: any mode, any source, 1 or N processes), ``report`` (the paper table), ``attribution``
(which rationale tokens and image patches a similarity rests on).

May import: ``world``, ``model``, ``data``, ``runs``, ``distributed``, ``paths``, ``summary``. Never the method's training:
a trained model is evaluated the same way whatever made it.
"""
