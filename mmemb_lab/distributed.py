"""Distributed helpers that vanish in a single process.

Concept: one code path from a laptop to a node. ``python -m mmemb_lab ...`` runs in one process and every
helper here is a no-op (``rank() == 0``, ``world_size() == 1``, ``all_gather_with_grad(x) is x``);
``torchrun --nproc-per-node 8 -m mmemb_lab ...`` or ``accelerate launch -m mmemb_lab ...`` set ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``... and :func:`init_from_env` turns them into a process group (nccl on GPU,
gloo on CPU), after which the same helpers talk to the other ranks.

Intuition for :func:`all_gather_with_grad`: a contrastive loss wants every query to see every target of
the *global* batch as a negative, so each rank needs the other ranks' embeddings. ``torch.distributed``'s
``all_gather`` returns plain tensors with no autograd history; we put the local tensor itself back into
its own slot, so gradients of whatever is computed on the gathered batch reach the local embeddings (and
only those). The gradient for the other ranks' embeddings is computed by those ranks, which run the same
loss on the same gathered batch (the open_clip ``ClipLoss`` idea; see ``contrastive.py`` for how the
loss is scaled so that DDP's gradient average is exact).

Used by: ``contrastive.info_nce`` (gathering), the training loop (``is_main`` for logging/checkpoints,
``reduce_mean`` for metrics), tests/test_contrastive.py (2 gloo processes == 1 process).
"""

from __future__ import annotations

import logging
import os
import random

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True when a process group is initialised (``torchrun``/``accelerate`` after :func:`init_from_env`)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 writes logs, figures and checkpoints; the others stay quiet."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def default_device() -> torch.device:
    """Where this process puts its model: its own GPU (``LOCAL_RANK``) when CUDA is there, else the CPU."""
    if torch.cuda.is_available():  # more ranks than GPUs (a test of 2 ranks on 1 GPU): they share
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _collective_device() -> torch.device:
    # nccl only moves CUDA tensors; gloo only needs CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (n_r, ...) of every rank along dim 0, in rank order; grads flow to the local slice.

    Ranks may hold different ``n_r`` (a last, short batch; filtered examples): sizes are gathered first
    and every rank pads to the largest, because ``all_gather`` needs equal shapes. All ranks must call
    this the same number of times, with the same trailing shape and dtype.
    """
    if not is_distributed():
        return x
    n_ranks = world_size()
    local_n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(local_n) for _ in range(n_ranks)]
    dist.all_gather(sizes, local_n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    if longest == 0:
        return x
    pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
    padded = torch.cat([x.detach(), pad]).contiguous()  # (longest, ...)
    slots = [torch.empty_like(padded) for _ in range(n_ranks)]
    dist.all_gather(slots, padded)
    pieces = [slot[:n] for slot, n in zip(slots, counts)]
    # The gathered copy of our own rows has no history; the original does.
    pieces[rank()] = x
    return torch.cat(pieces)


def reduce_mean(value: float) -> float:
    """Mean of a Python number over ranks (for logging metrics; carries no gradient)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def reduce_sum(value: float) -> float:
    """Sum of a Python number over ranks (a count that normalises a loss over the global batch)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (if installed) and torch (all devices) with the same ``seed``.

    Every rank gets the same seed so that models start identical; give data streams a per-rank seed
    (``seed + rank()``) where ranks must differ.
    """
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the core library
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _ProcessGroupScope:
    """Returned by :func:`init_from_env`; as a context manager it tears down the group it created."""

    def __init__(self, created: bool) -> None:
        self.created = created

    def __enter__(self) -> "_ProcessGroupScope":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env() -> _ProcessGroupScope:
    """Start a process group if a launcher asked for one, else do nothing.

    ``torchrun`` and ``accelerate launch`` export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT``; with ``WORLD_SIZE > 1`` we join the group (nccl when CUDA is
    available, else gloo) through the ``env://`` rendezvous. A group that already exists (e.g. created by
    ``accelerate.Accelerator``) is left alone. The group starts on call; ``with init_from_env(): ...``
    also destroys it on exit.
    """
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1 or "RANK" not in os.environ or is_distributed():
        return _ProcessGroupScope(created=False)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(default_device())
    # nccl wants one GPU per rank; more local ranks than GPUs (2 ranks on 1 GPU, a test) fall back to gloo
    nccl = use_cuda and int(os.environ.get("LOCAL_WORLD_SIZE", n)) <= torch.cuda.device_count()
    dist.init_process_group(backend="nccl" if nccl else "gloo", init_method="env://")
    logger.info("joined process group: rank %d of %d (%s)", rank(), world_size(), dist.get_backend())
    return _ProcessGroupScope(created=True)
