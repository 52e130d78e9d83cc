"""Tests for mmemb_lab.train.contrastive and mmemb_lab.distributed.

Float64 throughout where we compare to 1e-6: the claims are exact identities (chain rule, DDP averaging),
so any residue should be rounding, and float64 keeps rounding far below the tolerance.
"""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmemb_lab.train.contrastive import grad_cache_step, info_nce, log_prob_positive
from mmemb_lab.train.loop import distributed

TAU = 0.1


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _explicit_loss(q, cols, masked=frozenset()):
    """-mean_i log softmax_i, written with math.exp over Python floats; `masked` holds (row, col) pairs."""
    total = 0.0
    for i in range(q.shape[0]):
        scores = [float(q[i] @ cols[j]) / TAU for j in range(cols.shape[0]) if (i, j) not in masked]
        pos = float(q[i] @ cols[i]) / TAU
        total += -(pos - math.log(sum(math.exp(s) for s in scores)))
    return total / q.shape[0]


# (a) hand-built embeddings ------------------------------------------------------------------------


def test_loss_matches_explicit_formula():
    q, t = _unit(4, 5, seed=0), _unit(6, 5, seed=1)  # 2 extra targets beyond the batch
    h = _unit(4, 2, 5, seed=2)
    out = info_nce(q, t, TAU, hard_negatives=h)
    cols = torch.cat([t, h.reshape(-1, 5)])
    assert out.loss.item() == pytest.approx(_explicit_loss(q, cols), abs=1e-10)
    assert out.logits.shape == (4, 6 + 8)
    assert torch.allclose(out.logits, q @ cols.T / TAU)
    # A flat (M, D) block of the same hard negatives is the same set of columns.
    flat = info_nce(q, t, TAU, hard_negatives=h.reshape(-1, 5))
    assert flat.loss.item() == pytest.approx(out.loss.item(), abs=1e-12)


def test_duplicate_targets_are_masked_but_not_the_positive():
    q, t = _unit(4, 5, seed=3), _unit(4, 5, seed=4)
    ids = ["paris", "rome", "paris", "oslo"]  # rows 0 and 2 share an answer
    out = info_nce(q, t, TAU, target_ids=ids)
    assert out.logits[0, 2] == float("-inf") and out.logits[2, 0] == float("-inf")
    assert torch.isfinite(out.logits.diagonal()).all()
    assert torch.isfinite(out.logits).sum() == 16 - 2
    assert out.loss.item() == pytest.approx(_explicit_loss(q, t, masked={(0, 2), (2, 0)}), abs=1e-10)
    unmasked = info_nce(q, t, TAU)
    assert out.loss.item() < unmasked.loss.item()  # removing negatives can only lower the loss
    # Tensor ids behave like the sequence.
    as_tensor = info_nce(q, t, TAU, target_ids=torch.tensor([7, 1, 7, 2]))
    assert as_tensor.loss.item() == pytest.approx(out.loss.item(), abs=1e-12)
    # The loss stays finite and differentiable with masked entries.
    qg = q.clone().requires_grad_()
    info_nce(qg, t, TAU, target_ids=ids).loss.backward()
    assert torch.isfinite(qg.grad).all()


def test_closer_hard_negative_lowers_accuracy():
    eye = torch.eye(8, dtype=torch.float64)
    q = eye[:4]  # query i = e_i
    t = 0.8 * eye[:4] + 0.6 * eye[4:]  # positive at cosine 0.8, orthogonal to other queries
    far = -eye[:4, None, :]  # (B, 1, D): cosine -1 to its own query
    base = info_nce(q, t, TAU, hard_negatives=far)
    assert base.accuracy == 1.0
    close = far.clone()
    close[0, 0] = 0.95 * eye[0] + math.sqrt(1 - 0.95**2) * eye[5]  # cosine 0.95 > 0.8 for query 0
    harder = info_nce(q, t, TAU, hard_negatives=close)
    assert harder.accuracy == 0.75
    assert harder.loss.item() > base.loss.item()


# (d) pair-aware confidence --------------------------------------------------------------------------


def test_log_prob_positive_matches_log_softmax():
    q, p, n = _unit(3, 5, seed=5), _unit(3, 5, seed=6), _unit(3, 4, 5, seed=7)
    got = log_prob_positive(q, p, n, TAU)
    assert got.shape == (3,)
    for i in range(3):
        scores = torch.cat([(q[i] @ p[i]).view(1), n[i] @ q[i]]) / TAU
        assert got[i].item() == pytest.approx(torch.log_softmax(scores, 0)[0].item(), abs=1e-12)
        assert got[i].item() == pytest.approx(
            scores[0].item() - math.log(sum(math.exp(s) for s in scores.tolist())), abs=1e-10
        )
    assert (got < 0).all()


# (c) GradCache == plain backward ----------------------------------------------------------------------


def test_grad_cache_matches_plain_backward():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()

    def encode(x):
        return F.normalize(mlp(x), dim=-1)

    g = torch.Generator().manual_seed(1)
    xq, xt = (torch.randn(7, 6, generator=g, dtype=torch.float64) for _ in range(2))
    ids = [0, 1, 2, 0, 3, 4, 2]

    def loss_fn(q, t):
        return info_nce(q, t, TAU, target_ids=ids).loss

    plain = loss_fn(encode(xq), encode(xt))
    plain.backward()
    expected = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    # query and target chunks of different sizes, each chunk holding one kind of embedding
    chunks = [("q", x) for x in xq.split([2, 3, 2])] + [("t", x) for x in xt.split([3, 1, 3])]
    value, local = grad_cache_step(chunks, lambda c: ({c[0]: encode(c[1])}, None), lambda e: loss_fn(e["q"], e["t"]))
    assert local == 0 and value.item() == pytest.approx(plain.item(), abs=1e-12)
    for got, want in zip((p.grad for p in mlp.parameters()), expected):
        assert want.abs().max() > 1e-3  # the comparison is not vacuous
        assert torch.allclose(got, want, atol=1e-6, rtol=0)


# (b) 2 processes == 1 process -------------------------------------------------------------------------

# Each case: per-rank query counts, per-rank extra targets, hard negatives per query (3-D) or per-rank
# flat counts (2-D), ids with duplicates that straddle the rank boundary.
CASES = [
    dict(sizes=(4, 4), extras=(0, 0), hard=("per_query", 2), ids=list("abcadbef")),
    dict(sizes=(3, 5), extras=(1, 2), hard=("flat", (2, 1)), ids=list("abcxaycb")),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case_loss(case, rows, encoder):
    """Loss on the query rows `rows` (a slice of the global batch), with every input built from seed 0."""
    g = torch.Generator().manual_seed(0)
    n, n_ranks = sum(case["sizes"]), len(case["sizes"])
    xq, xt = (torch.randn(n, 6, generator=g, dtype=torch.float64) for _ in range(2))
    x_extra = [torch.randn(e, 6, generator=g, dtype=torch.float64) for e in case["extras"]]
    kind, h = case["hard"]
    if kind == "per_query":
        xh_all = torch.randn(n, h, 6, generator=g, dtype=torch.float64)
    else:
        x_flat = [torch.randn(m, 6, generator=g, dtype=torch.float64) for m in h]

    def enc(x):
        return F.normalize(encoder(x), dim=-1)

    if rows is None:  # the 1-process reference: everything concatenated
        rows, which = slice(0, n), range(n_ranks)
        gather = False
    else:
        which, gather = [distributed.rank()], True
    target = torch.cat([xt[rows]] + [x_extra[r] for r in which])
    hard = xh_all[rows] if kind == "per_query" else torch.cat([x_flat[r] for r in which])
    return info_nce(
        enc(xq[rows]), enc(target), TAU, hard_negatives=enc(hard), target_ids=case["ids"][rows], gather=gather
    )


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        assert distributed.is_distributed() and distributed.world_size() == 2
        assert distributed.rank() == rank and distributed.is_main() == (rank == 0)
        assert distributed.reduce_mean(float(rank)) == 0.5
        # Unequal sizes come back in rank order, and only the local slice carries gradient.
        x = torch.full((rank + 1, 2), float(rank), requires_grad=True)
        got = distributed.all_gather_with_grad(x)
        assert got.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        got.sum().backward()
        assert (x.grad == 1).all()

        for case in CASES:
            torch.manual_seed(0)
            encoder = torch.nn.Linear(6, 5).double()
            ref = _case_loss(case, None, encoder)
            ref.loss.backward()
            want = [p.grad.clone() for p in encoder.parameters()]
            encoder.zero_grad()

            start = sum(case["sizes"][:rank])
            out = _case_loss(case, slice(start, start + case["sizes"][rank]), encoder)
            out.loss.backward()
            for p in encoder.parameters():  # what DDP does: average over ranks
                dist.all_reduce(p.grad)
                p.grad /= 2
            assert abs(out.loss.item() - ref.loss.item()) < 1e-6, (case, out.loss.item(), ref.loss.item())
            assert out.accuracy == ref.accuracy
            assert out.logits.shape == ref.logits.shape
            assert torch.isinf(out.logits).sum() == torch.isinf(ref.logits).sum() > 0
            for p, w in zip(encoder.parameters(), want):
                assert torch.allclose(p.grad, w, atol=1e-6, rtol=0), (case, (p.grad - w).abs().max())
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=2, join=True)


# single-process no-ops -----------------------------------------------------------------------------------


def test_helpers_are_noops_in_one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with distributed.init_from_env() as scope:
        assert not scope.created
        assert not distributed.is_distributed()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        x = torch.ones(3, 2)
        assert distributed.all_gather_with_grad(x) is x
        assert distributed.reduce_mean(2.5) == 2.5
        distributed.barrier()
    distributed.seed_everything(7)
    a = torch.rand(3)
    distributed.seed_everything(7)
    assert torch.equal(a, torch.rand(3))


def test_hard_negatives_equal_to_a_positive_are_masked_for_that_query():
    q, t = _unit(3, 5, seed=11), _unit(3, 5, seed=12)
    h = torch.cat([t[1:2], _unit(1, 5, seed=13)])  # hard negative 0 is query 1's own answer again
    out = info_nce(q, t, TAU, hard_negatives=h, target_ids=["a", "b", "c"], negative_ids=["b", "z"])
    assert out.logits[1, 3] == float("-inf")  # masked for query 1 ...
    assert torch.isfinite(out.logits[0, 3]) and torch.isfinite(out.logits[2, 3])  # ... a negative for the others
    assert torch.isfinite(out.logits[:, 4]).all()
    cols = torch.cat([t, h])
    masked = {(1, 3)}
    assert out.loss.item() == pytest.approx(_explicit_loss(q, cols, masked), abs=1e-9)
