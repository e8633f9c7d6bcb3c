"""The alpha-divergence operator with a reference measure: the sparse posterior of a batch of logits.

The maths is in ``docs/loss.md`` (Koutsianos et al., ECCV 2026; Roulet et al., ICML 2025).
For logits ``theta`` [B, C], a prior ``q`` that is 1 everywhere except ``q_y = exp(log_q_target)``
at the target, and ``alpha > 1``::

    p_j = q_j * [1 + (alpha - 1)(theta_j - tau)]_+ ** (1 / (alpha - 1)),  tau such that sum_j p_j = 1

``alpha == 1`` is the closed form ``softmax(theta + log q)`` (Q-Margin at alpha 1 is CosFace).

The support of ``p`` is a prefix of the classes sorted by logit and every class below
``tau_lo - 1/(alpha - 1)`` is inactive (``tau_lo`` any lower bound of tau), so the solver only ever
looks at those *candidates*: a few per row, found with one comparison over the row once the maxima
of a few groups of classes have bounded tau from below (the threshold itself: ``threshold.py``).
tau and ``p`` are computed in float64 on the candidates, whatever the logits' dtype, which makes
them exact for alpha up to ``MAX_ALPHA`` (``docs/loss.md``, "Exactness").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmargin_spk.losses.threshold import DENSE_PROBE_GROUPS, TAU_DTYPE, group_maxima_tau, solve_tau, solver_dtype
from qmargin_spk.losses.validation import validate_inputs


@dataclass
class SparsePosterior:
    """``p`` stored as (index, value) pairs: ``p[b, indices[b, i]] = values[b, i]``, zero elsewhere."""

    indices: torch.Tensor  # [B, K] long, candidate classes (padding entries carry value 0)
    values: torch.Tensor  # [B, K] float, p on the candidates (sums to 1 per row)
    tau: torch.Tensor  # [B] the threshold, float64 (nan for alpha == 1, which has none)
    support_size: torch.Tensor  # [B] long, number of classes with p > 0

    def to_dense(self, num_classes: int) -> torch.Tensor:
        """Scatter into a dense ``[B, C]`` tensor."""
        dense = self.values.new_zeros(self.values.shape[0], num_classes)
        return dense.scatter_add_(1, self.indices, self.values)


def _dense_candidates(
    x: torch.Tensor,
    scale: float,
    target: torch.Tensor,
    target_x: torch.Tensor,
    log_q_target: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every class of the dense rows of logits ``scale * x`` that can be in the support.

    Returns the candidates in the layout of :func:`candidates_from_pairs` and the probe's lower
    bound of tau. The floor is compared with ``x`` itself (``x_j > floor / scale``, the quotient
    rounded down, then cast to ``x``'s dtype rounded down), so the scaled ``B x C`` logits are never
    formed and the comparison needs no ``B x C`` conversion. The candidates' logits are formed in
    ``log_q_target``'s dtype (float64 on the dense path: ``scale * x`` exactly).
    """
    lower = group_maxima_tau(x, target_x, log_q_target, alpha, scale, DENSE_PROBE_GROUPS)
    floor = lower - 1.0 / (alpha - 1.0)
    cut = floor if scale == 1.0 else torch.nextafter(floor / scale, floor.new_tensor(float("-inf")))
    # Rounding to nearest moves a value by at most eps |v| / 2: a cut lowered by eps |cut| stays below.
    cut = (cut - torch.finfo(x.dtype).eps * cut.abs()).to(x.dtype)
    rows, cols = (x > cut.unsqueeze(1)).nonzero(as_tuple=True)
    theta = x[rows, cols].to(floor.dtype)
    theta = theta if scale == 1.0 else theta * scale
    # Only the closed forms walk sorted prefixes.
    sort = alpha in (1.5, 2.0)
    return (*candidates_from_pairs(rows, cols, theta, target, log_q_target, floor, sort=sort), lower)


def candidates_from_pairs(
    rows: torch.Tensor,
    cols: torch.Tensor,
    theta: torch.Tensor,
    target: torch.Tensor,
    log_q_target: torch.Tensor,
    floor: torch.Tensor,
    limit: int | None = None,
    sort: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad candidate ``(row, class, logit)`` triples (``rows`` non-decreasing) into sorted ``[B, K]`` rows.

    Returns logits sorted by decreasing value, their class indices and ``log q`` (``log_q_target``
    at the target, 0 elsewhere), K the largest candidate count of the batch, or at most ``limit``
    (the ``limit`` largest logits of each row). Padding gets the finite logit ``floor`` of its row
    (any value no candidate lies below) and ``log q = -inf``. ``sort=False`` (no ``limit``) keeps
    each row's candidates in the given order, padding last: the Newton solve needs no order.
    """
    batch = target.shape[0]
    # A scatter, not bincount: on a GPU bincount reads its input's range back to the host.
    counts = rows.new_zeros(batch).scatter_add_(0, rows, torch.ones_like(rows))
    k = int(counts.max())
    starts = torch.cumsum(counts, dim=0) - counts
    slot = torch.arange(rows.shape[0], device=rows.device) - starts[rows]
    cand_theta = theta.new_full((batch, k), float("-inf"))
    cand_theta[rows, slot] = theta
    cand_idx = torch.zeros(batch, k, dtype=torch.long, device=rows.device)
    cand_idx[rows, slot] = cols
    if limit is not None and limit < k:
        cand_theta, order = torch.topk(cand_theta, limit, dim=1)
        cand_idx = cand_idx.gather(1, order)
    elif sort:
        cand_theta, order = torch.sort(cand_theta, dim=1, descending=True, stable=True)
        cand_idx = cand_idx.gather(1, order)
    live = torch.isfinite(cand_theta)
    log_q = torch.where(cand_idx == target.unsqueeze(1), log_q_target.unsqueeze(1), torch.zeros_like(cand_theta))
    log_q = torch.where(live, log_q, torch.full_like(log_q, float("-inf")))
    cand_theta = torch.where(live, cand_theta, floor.unsqueeze(1).expand_as(cand_theta))
    return cand_theta, cand_idx, log_q


def solve_on_candidates(
    cand_theta: torch.Tensor, cand_idx: torch.Tensor, log_q: torch.Tensor, alpha: float
) -> SparsePosterior:
    """Exact posterior (alpha > 1) on candidates laid out as :func:`candidates_from_pairs` returns them.

    Exact for the full rows as long as every class left out lies at or below ``tau_lo - 1/(alpha - 1)``
    for some lower bound ``tau_lo`` of tau: such classes carry exactly zero mass.
    """
    return posterior_on_candidates(cand_theta, cand_idx, log_q, alpha)


def posterior_on_candidates(
    cand_theta: torch.Tensor,
    cand_idx: torch.Tensor,
    log_q: torch.Tensor,
    alpha: float,
    lower: torch.Tensor | None = None,
) -> SparsePosterior:
    """:func:`solve_on_candidates`, the Newton solve started from ``lower``, a known lower bound of tau (or None).

    tau and ``p`` are solved in ``TAU_DTYPE`` (float64) on the candidates as given; ``p`` comes back in
    ``cand_theta``'s dtype, tau in float64.
    """
    threshold = solve_tau(cand_theta, log_q, alpha, lower)
    values = threshold.mass(cand_theta.to(TAU_DTYPE), log_q.to(TAU_DTYPE), alpha)
    values = values / values.sum(dim=1, keepdim=True)
    return SparsePosterior(cand_idx, values.to(cand_theta.dtype), threshold.tau, (values > 0).sum(dim=1))


def softmax_posterior(theta: torch.Tensor, target: torch.Tensor, log_q_target: torch.Tensor) -> SparsePosterior:
    """alpha = 1: ``softmax(theta + log q)`` over every class (no threshold)."""
    shifted = theta.scatter_add(1, target.unsqueeze(1), log_q_target.unsqueeze(1))
    values = torch.softmax(shifted, dim=1)
    indices = torch.arange(theta.shape[1], device=theta.device).expand_as(theta)
    nan = torch.full((theta.shape[0],), float("nan"), dtype=theta.dtype, device=theta.device)
    return SparsePosterior(indices, values, nan, (values > 0).sum(dim=1))


def dense_sparse_posterior(
    x: torch.Tensor, scale: float, target: torch.Tensor, log_q_target: torch.Tensor, alpha: float
) -> tuple[SparsePosterior, torch.Tensor, torch.Tensor]:
    """The posterior (alpha > 1) of the logits ``scale * x``, with the candidates' logits and the target logits."""
    target_x = x.gather(1, target.unsqueeze(1))
    cand_theta, cand_idx, log_q, lower = _dense_candidates(x, scale, target, target_x, log_q_target, alpha)
    sparse = posterior_on_candidates(cand_theta, cand_idx, log_q, alpha, lower)
    target_theta = target_x.squeeze(1).to(cand_theta.dtype)
    return sparse, cand_theta, target_theta if scale == 1.0 else target_theta * scale


def solve_sparse_posterior(
    logits: torch.Tensor, target: torch.Tensor, log_q_target: torch.Tensor | float, alpha: float
) -> SparsePosterior:
    """The alpha-divergence posterior with the Q-Margin-style prior, as (index, value) pairs.

    ``log_q_target`` is ``log q_y`` per row (or one float for all rows); every other class has
    ``q_j = 1``. alpha > 1 is solved in float64 on the logits upcast (values in float64); alpha 1, a
    softmax, in float64 for float64 logits and float32 otherwise. Deterministic.
    """
    validate_inputs(logits, target, alpha)
    work = solver_dtype(logits.dtype) if alpha == 1.0 else TAU_DTYPE
    target = target.long()
    log_q_target = torch.as_tensor(log_q_target, dtype=work, device=logits.device).expand(logits.shape[0])
    if alpha == 1.0:
        return softmax_posterior(logits.detach().to(work), target, log_q_target)
    return dense_sparse_posterior(logits.detach(), 1.0, target, log_q_target, alpha)[0]


def alpha_divergence_posterior(
    logits: torch.Tensor, target: torch.Tensor, log_q_target: torch.Tensor | float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``p`` [B, C] (in the logits' dtype) and the support size per row."""
    sparse = solve_sparse_posterior(logits, target, log_q_target, alpha)
    return sparse.to_dense(logits.shape[1]).to(logits.dtype), sparse.support_size
