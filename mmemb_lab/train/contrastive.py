"""Contrastive objective (InfoNCE) for query/target embeddings, exact under data parallelism.

Concept: a query embedding q_i should be closer to its own target t_i than to every other candidate.
With L2-normalised embeddings and temperature tau,

    loss = mean_i  -log  exp(q_i . t_i / tau) / sum_j exp(q_i . c_j / tau)

where the candidates c_j are all targets of the batch (in-batch negatives), any extra targets, and any
mined hard negatives. Intuition: a softmax classifier over candidates whose "weights" are the targets;
a bigger batch means more (and harder) negatives, which is why we gather across GPUs and why GradCache
(:func:`grad_cache_step`) exists: it lets one GPU afford a big batch by encoding it chunk by chunk.

Used by: the training loop (embedding stage), notebook on contrastive training, and
:func:`log_prob_positive` as the pair-aware match confidence at evaluation.

Why the distributed loss is exact (tests/test_contrastive.py checks it to 1e-6 against one process):

* Every rank gathers queries, targets and hard negatives of all ranks with
  ``distributed.all_gather_with_grad``: other ranks' rows arrive without history, only the local rows
  carry gradient. Every rank then computes the *full* global loss L (all global query rows). This is the
  open_clip ``ClipLoss`` default. Computing only the local query rows would be wrong with this gather:
  the local targets would miss the gradient that other ranks' queries send them.
* Rank r's backward therefore yields dL/d(local embeddings), exactly, and its parameter gradient is
  the part of dL/dtheta that flows through its own rows; the sum over ranks is the full dL/dtheta.
  DDP *averages* gradients over W ranks, so we backpropagate W * L.
* The returned ``loss`` has value L (identical on every rank, equal to the one-process loss of the
  concatenated batch, so no all-reduce is needed to report it) and gradient W * dL. The extra cost is
  the (B_global, C) logits matrix on every rank, negligible next to the encoders.

Deviations from textbook InfoNCE: in-batch targets that share the positive's ``target_id`` (the same
answer text twice in a batch) are not negatives: their logits are set to -inf. Hard negatives and extra
targets are never masked; they are assumed to be mined so as to differ from the positive.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mmemb_lab.train.loop import distributed


@dataclass(frozen=True)
class ContrastiveOutput:
    loss: Tensor
    """Scalar: mean cross-entropy over the global batch (backward is DDP-exact, see module doc)."""
    logits: Tensor
    """(B_global, B_global + N_global + M_global), detached; columns = [positives; extra targets and
    hard negatives]; false negatives hold -inf."""
    accuracy: float
    """Fraction of global queries whose highest logit is their own positive."""


def _global_ids(target_ids: Sequence | Tensor, n_local: int, gathered: bool) -> list:
    ids = target_ids.tolist() if isinstance(target_ids, Tensor) else list(target_ids)
    if len(ids) != n_local:
        raise ValueError(f"target_ids has {len(ids)} entries for {n_local} queries")
    if not gathered:
        return ids
    # Objects, not tensors: ids may be strings, and Python's str hash differs between processes.
    per_rank: list[list | None] = [None] * distributed.world_size()
    dist.all_gather_object(per_rank, ids)
    return [i for rank_ids in per_rank for i in rank_ids]


TEMPERATURE = 0.05
"""The InfoNCE temperature of every stage and of the confidences that score rationales (ours, for a tiny
model; the VLM2Vec-V2 recipe uses 0.02 at 4B). Stage 0, stage 1, selection and the rewards read this one."""


def info_nce(
    query: Tensor,
    target: Tensor,
    temperature: float,
    hard_negatives: Tensor | None = None,
    target_ids: Sequence | Tensor | None = None,
    gather: bool = True,
    negative_ids: Sequence | None = None,
) -> ContrastiveOutput:
    """InfoNCE of ``query`` (B, D) against ``target`` (B, D) or (B + N, D) and optional ``hard_negatives``.

    The positive of query i is target i; rows B.. of ``target`` and all ``hard_negatives`` ((B, H, D) or
    (M, D), flattened either way) are extra negatives shared by every query. ``target_ids`` (length B)
    marks duplicate positives to mask. ``negative_ids`` (one per extra/hard negative row, in order) marks
    negatives that are in fact some query's positive (same answer text): masked for that query. With
    small answer spaces (the toy world's 30 classes) shared hard negatives collide with positives all the
    time, and unmasked they push a query away from its own answer. With ``gather`` and a process group,
    all ranks must pass the same kinds of inputs (hard negatives or not, ids or not), since each is gathered.
    """
    b, d = query.shape
    if target.shape[0] < b:
        raise ValueError(f"need at least one target per query, got {target.shape[0]} for {b}")
    positives, extras = target[:b], target[b:]
    negatives = extras if hard_negatives is None else torch.cat([extras, hard_negatives.reshape(-1, d)])
    gathered = gather and distributed.is_distributed()
    n_neg_local = negatives.shape[0]
    if gathered:
        query = distributed.all_gather_with_grad(query)
        positives = distributed.all_gather_with_grad(positives)
        negatives = distributed.all_gather_with_grad(negatives)
    n = query.shape[0]  # global batch
    logits = query @ torch.cat([positives, negatives]).T / temperature  # (n, n + negatives)
    if target_ids is not None:
        ids = _global_ids(target_ids, b, gathered)
        code = {}
        ids_t = torch.tensor([code.setdefault(i, len(code)) for i in ids], device=logits.device)
        duplicate = ids_t[:, None] == ids_t[None, :]  # (n, n)
        duplicate.fill_diagonal_(False)  # the positive itself is never masked
        logits = torch.cat([logits[:, :n].masked_fill(duplicate, float("-inf")), logits[:, n:]], dim=1)
        if negative_ids is not None:
            neg_ids = _global_ids(negative_ids, n_neg_local, gathered)
            neg_t = torch.tensor([code.get(i, -1 - k) for k, i in enumerate(neg_ids)], device=logits.device)
            false_neg = ids_t[:, None] == neg_t[None, :]  # (n, n_negatives)
            logits = torch.cat([logits[:, :n], logits[:, n:].masked_fill(false_neg, float("-inf"))], dim=1)
    labels = torch.arange(n, device=logits.device)
    loss = F.cross_entropy(logits, labels)
    if gathered:
        # Value L, gradient W * dL: undoes DDP's average over W ranks (module doc).
        loss = loss.detach() + (loss - loss.detach()) * distributed.world_size()
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return ContrastiveOutput(loss=loss, logits=logits.detach(), accuracy=accuracy)


def log_prob_positive(query: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """log p(t+ | q) of each pair against its own negatives: (B, D), (B, D), (B, N, D) -> (B,).

    The InfoNCE probability of picking the positive among [positive, own negatives]; used as a match
    confidence that accounts for how confusable this particular pair's negatives are.
    """
    pos = (query * positive).sum(-1, keepdim=True)  # (B, 1)
    neg = torch.einsum("bd,bnd->bn", query, negatives)  # (B, N)
    return torch.log_softmax(torch.cat([pos, neg], dim=1) / temperature, dim=1)[:, 0]


def grad_cache_step(chunks: Sequence[Any], encode: Callable[[Any], tuple[dict[str, Tensor], Tensor | None]],
                    loss_fn: Callable[[dict[str, Tensor]], Tensor], no_sync: Callable[[], Any] | None = None,
                    ) -> tuple[Tensor, float]:
    """Accumulate the gradient of a batch-coupled loss (plus per-chunk terms) into the encoder's parameters,
    chunk by chunk: the one GradCache of the workbench (stage 1's chunked step, and any contrastive loss).

    GradCache (Gao et al., 2021): a contrastive loss couples every embedding with every other, so it cannot
    be split over chunks, but the encoder can. ``encode(chunk)`` returns ``(embeddings, local)``: a dict of
    embeddings by kind (each chunk may hold some kinds, e.g. queries or targets) and a scalar loss term of
    that chunk alone (None for none; a generation loss). (1) Encode every chunk without a graph; (2) compute
    ``loss_fn`` on each kind concatenated in chunk order and backpropagate only to those detached
    embeddings, caching g = dloss/de; (3) re-encode each chunk with a graph and backpropagate
    ``<e_chunk, g_chunk> + local``. By the chain rule the accumulated parameter gradient equals that of one
    unchunked backward of ``loss_fn + sum of local``, while activation memory is that of one chunk. The
    equality needs a deterministic encoder (dropout off, or the same RNG state in both passes). Under DDP,
    pass ``no_sync`` (the model's ``no_sync``): every chunk but the last then skips the gradient all-reduce.
    The caller zeroes gradients before and steps the optimizer after. Returns the coupled loss (detached,
    with the values of ``loss_fn``'s output, e.g. for accuracy) and the sum of the local terms.
    """
    with torch.no_grad():
        first = [encode(c) for c in chunks]
    kinds = list(dict.fromkeys(k for e, _ in first for k in e))
    sizes = {k: [e[k].shape[0] if k in e else 0 for e, _ in first] for k in kinds}
    cat = {k: torch.cat([e[k] for e, _ in first if k in e]).requires_grad_() for k in kinds}
    coupled = loss_fn(cat)
    coupled.backward()
    grads = {k: cat[k].grad.split(sizes[k]) for k in kinds}
    local_total = sum(float(loc) for _, loc in first if loc is not None)
    for j, c in enumerate(chunks):
        ctx = no_sync() if no_sync is not None and j < len(chunks) - 1 else contextlib.nullcontext()
        with ctx:
            e, loc = encode(c)
            surrogate = loc if loc is not None else 0.0
            for k, v in e.items():
                surrogate = surrogate + (v * grads[k][j]).sum()
            surrogate.backward()
    return coupled.detach(), local_total
