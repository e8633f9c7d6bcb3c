"""The threshold tau of the alpha-divergence posterior: closed forms, a safeguarded Newton solve and lower bounds.

For logits ``theta`` [B, K] (the candidates of each row), a prior ``q`` (``log q`` given) and ``alpha > 1``,
tau is the root of ``sum_j q_j [1 + (alpha - 1)(theta_j - tau)]_+ ** (1 / (alpha - 1)) = 1``
(``docs/loss.md``). alpha 1.5 and 2 have closed forms over candidates sorted by logit; any other alpha
is solved by Newton steps within an exact bracket. The lower bounds found here without a host sync
(``group_maxima_tau``) are what lets the posterior look only at a few candidates per row.

A training step runs this once per batch on a CPU or a GPU, so the code keeps the number of tensor
operations and host syncs (reading a value back: ``int()``, ``bool()``) small and independent of
the data where it can (``docs/performance.md``).
"""

from __future__ import annotations

import torch

_NEWTON_MAX_ITER = 60
# Newton steps run in blocks with one convergence test (a host sync) per block; a solve started
# from the probe's bound converges within one block (docs/performance.md). The probe, which only
# needs a lower bound, takes a fixed number of steps and no sync.
_NEWTON_BLOCK = 5
_PROBE_STEPS = 3
# Probe of the dense path (docs/loss.md, "Candidates"): the maxima of this many interleaved groups
# of classes (class j in group j mod G) bound tau from below almost as tightly as the G largest
# logits, since the few largest logits rarely share a group, at the cost of one vectorised max
# over the row instead of a top-k.
DENSE_PROBE_GROUPS = 64


def solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (tau is never solved in half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def f_prime_inv_q(log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """``f'(1/q) = (q^(1-alpha) - 1) / (alpha - 1)``, from ``log q``."""
    am1 = alpha - 1.0
    return torch.expm1(-am1 * log_q) / am1


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
    theta: torch.Tensor,
    q: torch.Tensor,
    tau: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    alpha: float,
    resolution: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One safeguarded Newton step within the bracket ``lo, hi``.

    Returns the new ``tau``, the bracket updated by the sign of S - 1, and the rows whose step was rounding.
    """
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


def solve_tau(
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
