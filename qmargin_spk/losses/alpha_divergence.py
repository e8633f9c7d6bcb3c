"""Functional core: the alpha-divergence operator with a reference measure and its Fenchel-Young loss.

The maths is in ``docs/loss.md`` (Koutsianos et al., ECCV 2026; Roulet et al., ICML 2025).
For logits ``theta`` [B, C], a prior ``q`` that is 1 everywhere except ``q_y = exp(log_q_target)``
at the target, and ``alpha > 1``::

    p_j = q_j * [1 + (alpha - 1)(theta_j - tau)]_+ ** (1 / (alpha - 1)),  tau such that sum_j p_j = 1

``alpha == 1`` is the closed form ``softmax(theta + log q)`` (Q-Margin at alpha 1 is CosFace).

The support of ``p`` is a prefix of the classes sorted by logit and every class below
``tau_lo - 1/(alpha - 1)`` is inactive (``tau_lo`` any lower bound of tau), so the solver only ever
looks at those *candidates*: a few per row, found with one comparison over the row once the maxima
of a few groups of classes have bounded tau from below.

A training step runs this once per batch on a CPU or a GPU, so the code keeps the number of tensor
operations and host syncs (reading a value back: ``int()``, ``bool()``) small and independent of
the data where it can (``docs/performance.md``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qmargin_spk.losses.stats import PosteriorStats, posterior_statistics

_NEWTON_MAX_ITER = 60
# Newton steps run in blocks with one convergence test (a host sync) per block; a solve started
# from the probe's bound converges within one block (docs/performance.md). The probe, which only
# needs a lower bound, takes a fixed number of steps and no sync.
_NEWTON_BLOCK = 5
_PROBE_STEPS = 3
# alpha above this makes u^(1/(alpha-1)) underflow-prone and the loss's q_y^(1-alpha) overflow in
# float32 for usual scales and margins; alpha 2 (sparsemax) is already very sparse.
MAX_ALPHA = 10.0
# Probe of the dense path (docs/loss.md, "Candidates"): the maxima of this many interleaved groups
# of classes (class j in group j mod G) bound tau from below almost as tightly as the G largest
# logits, since the few largest logits rarely share a group, at the cost of one vectorised max
# over the row instead of a top-k.
DENSE_PROBE_GROUPS = 64


@dataclass
class SparsePosterior:
    """``p`` stored as (index, value) pairs: ``p[b, indices[b, i]] = values[b, i]``, zero elsewhere."""

    indices: torch.Tensor  # [B, K] long, candidate classes (padding entries carry value 0)
    values: torch.Tensor  # [B, K] float, p on the candidates (sums to 1 per row)
    tau: torch.Tensor  # [B] the threshold (nan for alpha == 1, which has none)
    support_size: torch.Tensor  # [B] long, number of classes with p > 0

    def to_dense(self, num_classes: int) -> torch.Tensor:
        """Scatter into a dense ``[B, C]`` tensor."""
        dense = self.values.new_zeros(self.values.shape[0], num_classes)
        return dense.scatter_add_(1, self.indices, self.values)


def validate_inputs(logits: torch.Tensor, target: torch.Tensor, alpha: float) -> None:
    """Raise ``ValueError`` on alpha < 1, non-2-D logits, mismatched or out-of-range targets, non-finite logits."""
    validate_alpha(alpha)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    _validate_target_layout(target, logits.shape[0])
    # One host sync for the value checks of a valid batch; the checks that name the fault run only if it fails.
    suspect = ~torch.isfinite(logits.sum())
    if target.numel():
        suspect = suspect | (target.min() < 0) | (target.max() >= logits.shape[1])
    if bool(suspect):
        validate_targets(target, logits.shape[0], logits.shape[1])
        validate_finite(logits, "logits")


def validate_alpha(alpha: float, sparse: bool = False) -> None:
    """Raise ``ValueError`` unless ``1 <= alpha <= MAX_ALPHA`` (``1 < alpha`` when ``sparse``: a sparse support)."""
    if not 1.0 <= alpha <= MAX_ALPHA:
        raise ValueError(f"alpha must lie in [1, {MAX_ALPHA}], got {alpha}")
    if sparse and alpha == 1.0:
        raise ValueError("alpha must be > 1 for a sparse head (alpha 1 is CosFaceLoss)")


def validate_targets(target: torch.Tensor, batch: int, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``target`` is ``[batch]`` integer class indices in ``[0, num_classes)``."""
    _validate_target_layout(target, batch)
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"targets out of range [0, {num_classes}): min {int(target.min())}, max {int(target.max())}")


def _validate_target_layout(target: torch.Tensor, batch: int) -> None:
    """Raise ``ValueError`` unless ``target`` is a ``[batch]`` tensor of an integer dtype (no host sync)."""
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"targets must be [B] with B = {batch}, got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"targets must be integer class indices, got dtype {target.dtype}")


def validate_finite(values: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``values`` holds NaN or inf."""
    # One reduction catches NaN and inf; only an overflowing sum needs the element-wise check.
    if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contain NaN or inf")


def solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (tau is never solved in half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def f_prime_inv_q(log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """``f'(1/q) = (q^(1-alpha) - 1) / (alpha - 1)``, from ``log q``."""
    am1 = alpha - 1.0
    return torch.expm1(-am1 * log_q) / am1


def _mass(theta: torch.Tensor, log_q: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """Unnormalised posterior ``q_j [1 + (alpha-1)(theta_j - tau)]_+^(1/(alpha-1))`` for a row-wise ``tau``."""
    am1 = alpha - 1.0
    u = torch.clamp_min(1.0 + am1 * (theta - tau.unsqueeze(1)), 0.0)
    return torch.exp(log_q + torch.log(u) / am1)  # log 0 = -inf: inactive classes get exactly 0


def _tau_sorted_closed_form(theta: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exact tau for alpha 2 or 1.5 from prefix sums over candidates sorted by decreasing logit."""
    if alpha == 2.0:
        big_q = torch.cumsum(q, dim=1)
        s1 = torch.cumsum(q * (1.0 + theta), dim=1)
        tau_k = (s1 - 1.0) / big_q
        active = (1.0 + theta - tau_k > 0) & (q > 0)
    else:  # alpha == 1.5: p = q (c - t)^2 with c = 1 + theta / 2, t = tau / 2
        c = 1.0 + 0.5 * theta
        big_q = torch.cumsum(q, dim=1)
        s1 = torch.cumsum(q * c, dim=1)
        s2 = torch.cumsum(q * c * c, dim=1)
        disc = torch.clamp_min(s1 * s1 - big_q * (s2 - 1.0), 0.0)
        t_k = (s1 - torch.sqrt(disc)) / big_q
        tau_k = 2.0 * t_k
        active = (c > t_k) & (q > 0)
    # The support is the largest self-consistent prefix.
    last = active.shape[1] - 1 - torch.flip(active, dims=[1]).to(torch.int8).argmax(dim=1)
    return tau_k.gather(1, last.unsqueeze(1)).squeeze(1)


def _tau_newton(
    theta: torch.Tensor, log_q: torch.Tensor, alpha: float, lower: torch.Tensor | None = None, exact: bool = True
) -> torch.Tensor:
    """Safeguarded Newton + bisection on ``phi(tau) = S(tau)^(alpha-1) - 1`` within the exact bracket.

    ``S(tau) = sum_j p_j(tau)`` is the mass; ``S^(alpha-1)`` is a p-norm (p = 1/(alpha-1)) of the
    affine ``q_j^(alpha-1) u_j``, exactly linear in tau on a one-class support and nearly linear
    otherwise, so Newton needs few steps; for alpha <= 2 it is convex, and Newton from a lower
    bound of tau never overshoots (docs/performance.md). ``lower``, a known lower bound of tau,
    raises the bracket's lower end (a warm start). The steps run in blocks of ``_NEWTON_BLOCK``
    with one host sync, the convergence test, per block. ``exact=False`` takes ``_PROBE_STEPS``
    steps and returns a lower bound of tau without any sync: tau where a row has converged, the
    bracket's lower end (``S >= 1`` there) elsewhere.
    """
    lo = (theta - f_prime_inv_q(log_q, alpha)).amax(dim=1)
    if lower is not None:
        lo = torch.maximum(lo, lower)
    hi = theta.amax(dim=1) - f_prime_inv_q(torch.logsumexp(log_q, dim=1), alpha)
    q = torch.exp(log_q)
    # A step is accepted as converged below rounding of tau; the bracket bounds |tau|.
    resolution = 2.0 * torch.finfo(theta.dtype).eps * (1.0 + torch.maximum(lo.abs(), hi.abs()))
    tau = lo
    if not exact:
        for _ in range(_PROBE_STEPS):
            tau, lo, hi, small = _newton_step(theta, q, tau, lo, hi, alpha, resolution)
        return torch.where(small | (hi - lo <= resolution), tau, lo)  # S(lo) >= 1: lo is never above the root
    for _ in range(0, _NEWTON_MAX_ITER, _NEWTON_BLOCK):
        for _ in range(_NEWTON_BLOCK):
            tau, lo, hi, small = _newton_step(theta, q, tau, lo, hi, alpha, resolution)
        if bool((small | (hi - lo <= resolution)).all()):
            break
    return tau


def _newton_step(
    theta: torch.Tensor, q: torch.Tensor, tau: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, alpha: float,
    resolution: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One safeguarded step: new ``tau``, the bracket ``lo, hi`` updated by the sign of S - 1, and rows whose step was rounding."""
    am1 = alpha - 1.0
    u = (theta - tau.unsqueeze(1)).mul_(am1).add_(1.0).clamp_min_(0.0)
    # -dp_j/dtau = q_j u_j^(1/(alpha-1) - 1) and p_j = that times u_j. For alpha > 2 the power is inf
    # at an inactive class (u = 0), which has neither mass nor slope: set to 0.
    slope = q * u.pow(1.0 / am1 - 1.0)
    if alpha > 2.0:
        slope = slope.nan_to_num_(nan=0.0, posinf=0.0)
    total, slope = (slope * u).sum(dim=1), slope.sum(dim=1)
    # S is non-increasing: S >= 1 means the root lies at or above tau.
    above = total >= 1.0
    lo = torch.where(above, tau, lo)
    hi = torch.where(above, hi, tau)
    # Newton on S^(alpha-1) - 1: tau + (S - S^(2-alpha)) / ((alpha-1) |S'|). No mass gives 0/0, a
    # NaN that fails both tests below and falls back to bisection, like a step out of the bracket.
    proposal = torch.addcdiv(tau, total - total.pow(2.0 - alpha), slope, value=1.0 / am1)
    # A step of rounding size is kept (Newton converges quadratically near the root), never replaced
    # by a bisection that would throw the converged tau away.
    small = (proposal - tau).abs() <= resolution
    # Strictly inside: a proposal on an end of the bracket may be a 2-cycle of Newton between them.
    take = small | ((proposal > lo) & (proposal < hi))
    tau = torch.where(take, proposal.clamp(lo, hi), torch.lerp(lo, hi, 0.5))
    return tau, lo, hi, small


def _tau(
    theta: torch.Tensor, log_q: torch.Tensor, alpha: float, lower: torch.Tensor | None = None, exact: bool = True
) -> torch.Tensor:
    """tau of candidates: closed form for alpha 1.5 and 2 (``theta`` sorted by decreasing logit), Newton otherwise."""
    if alpha in (1.5, 2.0):
        return _tau_sorted_closed_form(theta, torch.exp(log_q), alpha)
    return _tau_newton(theta, log_q, alpha, lower, exact)


def _tau_lower_bound(theta: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """A lower bound of tau of candidates sorted by decreasing logit, without a host sync.

    tau does not increase with alpha (``(1 + a x)^(1/a)`` decreases in ``a``, so every class has less
    mass at a given tau; docs/performance.md), so tau at alpha 1.5 or 2, the nearest closed form
    above, bounds tau from below for 1 < alpha < 2; ``_PROBE_STEPS`` Newton steps from there tighten it.
    """
    if alpha in (1.5, 2.0):
        return _tau_sorted_closed_form(theta, torch.exp(log_q), alpha)
    lower = None
    if alpha < 2.0:
        lower = _tau_sorted_closed_form(theta, torch.exp(log_q), 1.5 if alpha < 1.5 else 2.0)
    return _tau_newton(theta, log_q, alpha, lower, exact=False)


def tau_rounding_slack(tau: torch.Tensor) -> torch.Tensor:
    """Room left below a computed tau so that its rounding never turns a lower bound into an upper one."""
    return torch.finfo(tau.dtype).eps ** 0.5 * (1.0 + tau.abs())


def group_maxima_tau(
    x: torch.Tensor, target_x: torch.Tensor, log_q_target: torch.Tensor, alpha: float, scale: float, groups: int
) -> torch.Tensor:
    """A lower bound of each row's tau (logits ``scale * x``) from the maxima of ``groups`` groups of its classes.

    Class j is in group ``j mod groups``. Each maximum stands for a class of its group, so the
    maxima are a subset of the row's classes and their tau, less a rounding slack, a lower bound
    of the row's (docs/loss.md, "Candidates"). ``target_x [B, 1]`` is the target's ``x`` (NaN
    where the target is not among the columns): a maximum equal to it may be the target and gets
    ``min(q_y, 1)``, less mass than either class it can be, which keeps the bound valid. One
    strided max over the row instead of a top-k; no host sync.
    """
    batch, classes = x.shape
    groups = min(groups, classes)
    whole = classes // groups * groups
    maxima = x[:, :whole].reshape(batch, classes // groups, groups).amax(dim=1)
    if whole < classes:  # the columns past the last whole stride join the first groups
        tail = classes - whole
        maxima[:, :tail] = torch.maximum(maxima[:, :tail], x[:, whole:])
    log_q = torch.where(maxima == target_x, log_q_target.clamp_max(0.0).unsqueeze(1), 0.0)
    theta = maxima.to(log_q.dtype) * scale
    if alpha <= 2.0:  # the closed forms walk prefixes sorted by logit
        theta, order = torch.sort(theta, dim=1, descending=True)
        log_q = log_q.gather(1, order)
    tau = _tau_lower_bound(theta, log_q, alpha)
    return tau - tau_rounding_slack(tau)


def _dense_candidates(
    x: torch.Tensor, scale: float, target: torch.Tensor, target_x: torch.Tensor, log_q_target: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every class of the dense rows of logits ``scale * x`` that can be in the support.

    Returns the candidates in the layout of :func:`candidates_from_pairs` and the probe's lower
    bound of tau. The floor is compared with ``x`` itself (``x_j > floor / scale``, the quotient
    rounded down), so the scaled ``B x C`` logits are never formed.
    """
    lower = group_maxima_tau(x, target_x, log_q_target, alpha, scale, DENSE_PROBE_GROUPS)
    floor = lower - 1.0 / (alpha - 1.0)
    cut = floor if scale == 1.0 else torch.nextafter(floor / scale, floor.new_tensor(float("-inf")))
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
    cand_theta: torch.Tensor, cand_idx: torch.Tensor, log_q: torch.Tensor, alpha: float,
    lower: torch.Tensor | None = None,
) -> SparsePosterior:
    """:func:`solve_on_candidates`, the Newton solve started from ``lower``, a known lower bound of tau (or None)."""
    tau = _tau(cand_theta, log_q, alpha, lower)
    values = _mass(cand_theta, log_q, tau, alpha)
    values = values / values.sum(dim=1, keepdim=True)
    return SparsePosterior(cand_idx, values, tau, (values > 0).sum(dim=1))


def _softmax_posterior(theta: torch.Tensor, target: torch.Tensor, log_q_target: torch.Tensor) -> SparsePosterior:
    """alpha = 1: ``softmax(theta + log q)`` over every class (no threshold)."""
    shifted = theta.scatter_add(1, target.unsqueeze(1), log_q_target.unsqueeze(1))
    values = torch.softmax(shifted, dim=1)
    indices = torch.arange(theta.shape[1], device=theta.device).expand_as(theta)
    nan = torch.full((theta.shape[0],), float("nan"), dtype=theta.dtype, device=theta.device)
    return SparsePosterior(indices, values, nan, (values > 0).sum(dim=1))


def _dense_sparse_posterior(
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
    ``q_j = 1``. Solved in float64 for float64 logits and float32 otherwise; deterministic.
    """
    validate_inputs(logits, target, alpha)
    work = solver_dtype(logits.dtype)
    target = target.long()
    log_q_target = torch.as_tensor(log_q_target, dtype=work, device=logits.device).expand(logits.shape[0])
    if alpha == 1.0:
        return _softmax_posterior(logits.detach().to(work), target, log_q_target)
    return _dense_sparse_posterior(logits.detach(), 1.0, target, log_q_target, alpha)[0]


def alpha_divergence_posterior(
    logits: torch.Tensor, target: torch.Tensor, log_q_target: torch.Tensor | float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``p`` [B, C] (in the logits' dtype) and the support size per row."""
    sparse = solve_sparse_posterior(logits, target, log_q_target, alpha)
    return sparse.to_dense(logits.shape[1]).to(logits.dtype), sparse.support_size


def fy_loss_from_posterior(
    logits: torch.Tensor, target: torch.Tensor, log_q_target: torch.Tensor, sparse: SparsePosterior, alpha: float
) -> torch.Tensor:
    """Per-row Fenchel-Young loss ``<p - e_y, theta> + regulariser terms`` from a solved posterior."""
    theta = logits.detach().to(sparse.values.dtype)
    log_q_target = log_q_target.to(theta.dtype).expand(theta.shape[0])
    rows = torch.arange(theta.shape[0], device=theta.device)
    target_theta = theta[rows, target]
    if alpha == 1.0:
        # KL generator: logsumexp(theta + log q) - theta_y - log q_y, i.e. cross-entropy.
        shifted = theta.scatter_add(1, target.unsqueeze(1), log_q_target.unsqueeze(1))
        return torch.logsumexp(shifted, dim=1) - shifted[rows, target]
    return fy_loss_on_candidates(theta.gather(1, sparse.indices), target_theta, target, log_q_target, sparse, alpha)


def fy_loss_on_candidates(
    cand_theta: torch.Tensor,
    target_theta: torch.Tensor,
    target: torch.Tensor,
    log_q_target: torch.Tensor,
    sparse: SparsePosterior,
    alpha: float,
) -> torch.Tensor:
    """Per-row loss (alpha > 1) from the logits at ``sparse.indices`` and at the target only."""
    am1 = alpha - 1.0
    p_theta = (sparse.values * cand_theta).sum(dim=1)
    is_target = sparse.indices == target.unsqueeze(1)
    p_target = (sparse.values * is_target).sum(dim=1)
    p_pow = sparse.values.clamp_min(0.0) ** alpha
    others = (p_pow * ~is_target).sum(dim=1)
    inv_q_target = torch.exp(-am1 * log_q_target)  # q_y^(1 - alpha)
    regulariser = (inv_q_target * (1.0 - p_target**alpha) - others) / (alpha * am1)
    return p_theta - target_theta + regulariser


class _FenchelYoungLoss(torch.autograd.Function):
    """A mean loss solved beforehand, as a function of ``inputs``; backward is ``scale (p - e_y) / B``.

    No gradient flows through the solver. ``sparse`` holds ``p`` as (index, value) pairs, or
    every class in order when ``dense`` (alpha 1), whose gradient needs no scatter.
    """

    @staticmethod
    def forward(ctx, inputs, mean_loss, sparse, target, scale, dense):  # noqa: D102
        ctx.save_for_backward(sparse.values, target, None if dense else sparse.indices)
        ctx.shape, ctx.dtype, ctx.scale = inputs.shape, inputs.dtype, scale
        return mean_loss.to(inputs.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        values, target, indices = ctx.saved_tensors
        batch = values.shape[0]
        factor = grad_out.to(values.dtype) * (ctx.scale / batch)
        if indices is None:
            grad = (values * factor).to(ctx.dtype)
        else:
            grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=values.device)
            grad.scatter_add_(1, indices, (values * factor).to(ctx.dtype))
        grad.scatter_add_(1, target.unsqueeze(1), (-factor).to(ctx.dtype).expand(batch, 1))
        return grad, None, None, None, None, None


def fenchel_young_loss_and_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    log_q_target: torch.Tensor | float = 0.0,
    alpha: float = 1.5,
    scale: float = 1.0,
) -> tuple[torch.Tensor, PosteriorStats]:
    """:func:`fenchel_young_loss` and the :class:`PosteriorStats` of the batch."""
    with torch.no_grad():
        validate_inputs(logits, target, alpha)
        work = solver_dtype(logits.dtype)
        target = target.long()
        log_q = torch.as_tensor(log_q_target, dtype=work, device=logits.device).expand(logits.shape[0])
        if alpha == 1.0:
            theta = logits.detach().to(work)
            theta = theta if scale == 1.0 else theta * scale
            sparse = _softmax_posterior(theta, target, log_q)
            per_row = fy_loss_from_posterior(theta, target, log_q, sparse, alpha)
        else:
            sparse, cand_theta, target_theta = _dense_sparse_posterior(logits.detach(), scale, target, log_q, alpha)
            per_row = fy_loss_on_candidates(cand_theta, target_theta, target, log_q, sparse, alpha)
    loss = _FenchelYoungLoss.apply(logits, per_row.mean(), sparse, target, float(scale), alpha == 1.0)
    return loss, posterior_statistics(sparse.values, sparse.indices, sparse.support_size, target)


def fenchel_young_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    log_q_target: torch.Tensor | float = 0.0,
    alpha: float = 1.5,
    scale: float = 1.0,
) -> torch.Tensor:
    """Mean alpha-divergence Fenchel-Young loss of ``scale * logits`` over the batch.

    The gradient w.r.t. ``logits`` is ``scale * (p - e_y) / B`` (``scale`` is folded in so
    cosine classifiers need no extra ``B x C`` product).
    """
    return fenchel_young_loss_and_stats(logits, target, log_q_target, alpha, scale)[0]
