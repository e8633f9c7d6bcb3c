"""The posterior is exact over the whole alpha range, on every path the heads use (docs/loss.md, "Exactness").

Exact: p within 1e-5 (absolute) of a float64 brute force on the same float32 logits upcast, and the
gradient w.r.t. the logits within 1e-5 of the closed form ``p - e_y`` computed from the brute-force p,
for scales up to 64, alpha up to ``MAX_ALPHA``, tied and near-tied (clustered) logits.

The brute force is independent of the solver: for every class ``k`` it bisects, geometrically and to
the last bit of float64 (far past 1e-12), the unknown ``u_k = 1 + (alpha-1)(theta_k - tau)`` of the
equation ``sum_j q_j [u_k + (alpha-1)(theta_j - theta_k)]_+^(1/(alpha-1)) = 1``, and reads
``p_k = q_k u_k^(1/(alpha-1))``. A bisection on tau itself cannot be the oracle above alpha 4: a
class at the edge of the support has ``u_k = p_k^(alpha-1)`` (1e-18 for p_k = 0.01 at alpha 10),
below the rounding of ``1 + (alpha-1)(theta_k - tau)``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qmargin_spk.losses import alpha_divergence_posterior, fenchel_young_loss
from qmargin_spk.losses.candidate_stream import CandidatePairs, HeadSettings, SingleProcess, chunk_logits
from qmargin_spk.losses.sparse_head import _solve
from qmargin_spk.losses.validation import MAX_ALPHA

# 1.5 and 2 are closed forms; 1.25 and 1.75 (the paper's) check Newton below 2.
ALPHAS = [1.25, 1.5, 1.75, 2.0, 3.0, 3.5, 4.0, 6.0, 10.0]
SCALES = [10.0, 30.0, 64.0]
TOLERANCE = 1e-5
BATCH, CLASSES, DIM = 12, 48, 16


def brute_force_posterior(theta: np.ndarray, target: np.ndarray, log_q_target: np.ndarray, alpha: float):
    """p [B, C] of float64 logits by one geometric bisection per (row, class), each class at its own pivot."""
    theta = np.asarray(theta, dtype=np.float64)
    batch, classes = theta.shape
    log_q = np.zeros((batch, classes))
    log_q[np.arange(batch), target] = log_q_target
    q = np.exp(log_q)
    if alpha == 1.0:
        shifted = theta + log_q
        e = np.exp(shifted - shifted.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    am1 = alpha - 1.0
    # Only classes above tau_lo - 1/(alpha-1), tau_lo = max_j (theta_j - f'(1/q_j)) <= tau, can be active.
    tau_lo = (theta - np.expm1(-am1 * log_q) / am1).max(axis=1, keepdims=True)
    rows, pivots = np.nonzero(theta > tau_lo - 1.0 / am1)
    offset = am1 * (theta[rows] - theta[rows, pivots][:, None])  # [pairs, C]: u_j - u_k

    def mass(u_k):
        return (q[rows] * np.clip(u_k[:, None] + offset, 0.0, None) ** (1.0 / am1)).sum(axis=1)

    lo, hi = np.full(rows.size, 1e-300), np.ones(rows.size)
    while (short := mass(hi) < 1.0).any():
        hi = np.where(short, 2.0 * hi, hi)
    for _ in range(80):  # log2(690 / 2^-52) < 60 halvings of [log lo, log hi] reach float64's last bit
        mid = np.sqrt(lo * hi)
        above = mass(mid) >= 1.0
        lo, hi = np.where(above, lo, mid), np.where(above, mid, hi)
    u_k = np.sqrt(lo * hi)
    p = np.zeros((batch, classes))
    p[rows, pivots] = q[rows, pivots] * np.where(u_k > 1e-290, u_k, 0.0) ** (1.0 / am1)  # inactive: down to lo
    return p / p.sum(axis=1, keepdims=True)


def closed_form_gradient(p: np.ndarray, target: np.ndarray) -> np.ndarray:
    """dL/dtheta of the Fenchel-Young loss of one row: ``p - e_y``."""
    grad = p.copy()
    grad[np.arange(len(target)), target] -= 1.0
    return grad


def clustered_cosines(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosines whose largest few are near-tied (spread 1e-3 to 1e-7) or exactly tied; the target in or out."""
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-0.3, 0.5, (BATCH, CLASSES))
    target = rng.integers(0, CLASSES, BATCH)
    for row in range(BATCH):
        members = rng.choice(CLASSES, 2 + row % 10, replace=False)
        if row % 2 == 0:
            members[0] = target[row]
        cos[row, members] = 0.7 + rng.normal(0.0, [1e-3, 1e-5, 1e-7][row % 3], members.size)
        if row % 4 == 3:
            cos[row, members[: members.size // 2 + 1]] = 0.7  # exact ties
    return cos, target


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_dense_posterior_and_gradient_are_exact(alpha, scale):
    cos, target = clustered_cosines(seed=int(alpha * 10 + scale))
    logits = torch.tensor(scale * cos, dtype=torch.float32)
    log_q = torch.tensor(np.resize([0.0, -0.2 * scale, 1.0], BATCH))  # q_y 1, a Q-Margin prior, q_y > 1
    p_ref = brute_force_posterior(logits.double().numpy(), target, log_q.numpy(), alpha)
    p, _ = alpha_divergence_posterior(logits, torch.tensor(target), log_q, alpha)
    np.testing.assert_allclose(p.double().numpy(), p_ref, rtol=0, atol=TOLERANCE)
    leaf = logits.clone().requires_grad_(True)
    fenchel_young_loss(leaf, torch.tensor(target), log_q, alpha).backward()
    np.testing.assert_allclose(
        leaf.grad.double().numpy() * BATCH, closed_form_gradient(p_ref, target), rtol=0, atol=TOLERANCE
    )


class _ThreadShards:
    """Two shards of the classes solved by two threads of one process, combined as the ranks of a group are."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world

    def combiner(self, rank: int):
        shards = self

        class Combiner:
            def max(self, values):
                return torch.stack(shards._exchange(rank, values)).amax(dim=0)

            def gather_pairs(self, pairs):
                return CandidatePairs.cat(shards._exchange(rank, pairs))

        return Combiner()

    def _exchange(self, rank: int, value) -> list:
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values


def _head_problem(alpha: float, scale: float):
    """Embeddings and prototypes whose cosines cluster like :func:`clustered_cosines`, and the head's logits."""
    gen = torch.Generator().manual_seed(int(alpha * 10 + scale))
    weight = torch.randn(CLASSES, DIM, generator=gen)
    target = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    for row in range(BATCH):  # near-copies of one prototype (spread 1e-3 to 1e-7, or exact copies)
        members = torch.randperm(CLASSES, generator=gen)[: 2 + row % 10]
        spread = [1e-3, 1e-5, 1e-7, 0.0][row % 4]
        weight[members] = weight[members[0]] + spread * torch.randn(len(members), DIM, generator=gen)
    centre = F.normalize(weight, dim=1)[torch.randint(0, CLASSES, (BATCH,), generator=gen)]
    x_n = F.normalize(centre + 0.3 * torch.randn(BATCH, DIM, generator=gen), dim=1)
    return x_n, weight, target


def _gradient_from_solve(solved, batch: int, classes: int) -> np.ndarray:
    """The non-zeros of ``p - e_y`` a head's backward scatters, as a dense [B, C] array."""
    rows, cols, coef = solved.touched
    grad = torch.zeros(batch, classes, dtype=torch.float64)
    grad.index_put_((rows, cols), coef.double(), accumulate=True)
    return grad.numpy()


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_sparse_and_sharded_heads_solve_exactly(alpha, scale):
    x_n, weight, target = _head_problem(alpha, scale)
    log_q = np.full(BATCH, -0.2 * scale)
    # capacity = C: no row takes the exact fallback, whose recomputed logits (a matrix product over
    # fewer rows) may differ from the batch's in the last bit, which would not be the same input.
    settings = HeadSettings(alpha, scale, 0.2, chunk_size=16, capacity=CLASSES, sparse_grad=False)
    # The logits the head forms (float32, chunk by chunk), upcast: the brute force's input.
    logits = torch.cat([chunk_logits(x_n, weight, start, start + 16, scale) for start in range(0, CLASSES, 16)], 1)
    p_ref = brute_force_posterior(logits.double().numpy(), target.numpy(), log_q, alpha)
    grad_ref = closed_form_gradient(p_ref, target.numpy())
    single = _solve(x_n, weight, target, settings, SingleProcess())
    np.testing.assert_allclose(_gradient_from_solve(single, BATCH, CLASSES), grad_ref, rtol=0, atol=TOLERANCE)
    # Two shards of 32 and 16 classes (each chunked like the single process), combined across threads.
    shards, bounds, results = _ThreadShards(2), [(0, 32), (32, 48)], [None, None]

    def run(rank: int) -> None:
        start, stop = bounds[rank]
        local = HeadSettings(alpha, scale, 0.2, 16, CLASSES, False, class_offset=start)
        results[rank] = _solve(x_n, weight[start:stop], target, local, shards.combiner(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    sharded = np.zeros((BATCH, CLASSES))
    for rank, (start, stop) in enumerate(bounds):
        sharded[:, start:stop] = _gradient_from_solve(results[rank], BATCH, stop - start)
    np.testing.assert_allclose(sharded, grad_ref, rtol=0, atol=TOLERANCE)


def test_the_range_tested_is_the_range_allowed():
    assert max(ALPHAS) == MAX_ALPHA


def test_softmax_end_of_the_range_is_exact():
    """alpha 1 (the KL case) is ``softmax(theta + log q)``: checked against the brute force's own closed form."""
    cos, target = clustered_cosines(seed=1)
    logits = torch.tensor(64.0 * cos, dtype=torch.float32)
    log_q = torch.full((BATCH,), -0.2 * 64.0, dtype=torch.float64)
    p_ref = brute_force_posterior(logits.double().numpy(), target, log_q.numpy(), 1.0)
    p, _ = alpha_divergence_posterior(logits, torch.tensor(target), log_q, 1.0)
    np.testing.assert_allclose(p.double().numpy(), p_ref, rtol=0, atol=TOLERANCE)
