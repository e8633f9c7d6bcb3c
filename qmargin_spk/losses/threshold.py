"""The threshold tau of the alpha-divergence posterior: closed forms, a safeguarded Newton solve and lower bounds.

For logits ``theta`` [B, K] (the candidates of each row), a prior ``q`` (``log q`` given) and ``alpha > 1``,
tau is the root of ``sum_j q_j [1 + (alpha - 1)(theta_j - tau)]_+ ** (1 / (alpha - 1)) = 1``
(``docs/loss.md``). alpha 1.5 and 2 have closed forms over candidates sorted by logit; any other alpha
is solved by Newton steps within an exact bracket. The lower bounds found here without a host sync
(``group_maxima_tau``) are what lets the posterior look only at a few candidates per row.

tau is always solved in float64 (``TAU_DTYPE``), whatever the dtype of the logits, and Newton solves
for ``u`` of a pivot class rather than tau (:class:`Threshold`): near-tied logits at a large scale
make ``p`` of a class at the edge of the support so sensitive to rounding that a float32 solve on
tau was off by up to 0.2 at alpha 10, a float64 one by 1e-2 (``docs/loss.md``, "Exactness"). The
candidates are few per row, so the cost is small.

A training step runs this once per batch on a CPU or a GPU, so the code keeps the number of tensor
operations and host syncs (reading a value back: ``int()``, ``bool()``) small and independent of
the data where it can (``docs/performance.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NEWTON_MAX_ITER = 60
# Newton steps run in blocks with one convergence test (a host sync) per block; a solve started
# from the probe's bound converges within one block (docs/performance.md). The probe, which only
# needs a lower bound, takes a fixed number of steps and no sync.
_NEWTON_BLOCK = 5
_PROBE_STEPS = 3
# Rounding of the float64 solve, relative (z may be tiny): a bracket this narrow has converged.
_RESOLUTION = 2.0 * torch.finfo(torch.float64).eps
# For alpha <= 2, a Newton step this small (relative) is the last one: Newton converges quadratically
# near the root (order 4/3 at worst, a class entering the support), so the step taken leaves an error
# of about its square, far below what p needs (the float64 solve would otherwise take one more block).
# For alpha > 2 the slope of S is infinite where a class enters the support: steps must reach rounding.
_STEP_CONVERGED = 1e-9


def _step_converged(alpha: float) -> float:
    """The relative Newton step below which a row has converged at ``alpha``."""
    return _STEP_CONVERGED if alpha <= 2.0 else _RESOLUTION


# Probe of the dense path (docs/loss.md, "Candidates"): the maxima of this many interleaved groups
# of classes (class j in group j mod G) bound tau from below almost as tightly as the G largest
# logits, since the few largest logits rarely share a group, at the cost of one vectorised max
# over the row instead of a top-k.
DENSE_PROBE_GROUPS = 64


# The dtype of every threshold solve (docs/loss.md, "Exactness").
TAU_DTYPE = torch.float64


def solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype logits are formed in: float64 for float64 inputs, float32 for everything else (never half)."""
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


@dataclass
class Threshold:
    """tau of each row, held as ``u = 1 + (alpha-1)(theta - tau)`` of a per-row ``pivot`` logit.

    The solve's unknown is ``pivot_u``, not tau: ``u_j = pivot_u - (alpha-1)(pivot - theta_j)`` then
    keeps full relative precision for the classes near the pivot, which tau cannot give (``1 +
    (alpha-1)(theta_j - tau)`` rounds at ``eps (alpha - 1) |tau|``, and for alpha > 2 ``p_j =
    u_j^(1/(alpha-1))`` amplifies that at the edge of the support: docs/loss.md, "Exactness").
    """

    tau: torch.Tensor
    pivot: torch.Tensor
    pivot_u: torch.Tensor

    @staticmethod
    def from_tau(theta: torch.Tensor, tau: torch.Tensor, alpha: float) -> Threshold:
        top = theta.amax(dim=1)
        return Threshold(tau, top, 1.0 + (alpha - 1.0) * (top - tau))

    def u(self, theta: torch.Tensor, alpha: float) -> torch.Tensor:
        """``u_j = 1 + (alpha-1)(theta_j - tau)`` of the candidates, negative outside the support."""
        return self.pivot_u.unsqueeze(1) - (alpha - 1.0) * (self.pivot.unsqueeze(1) - theta)

    def mass(self, theta: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
        """Unnormalised posterior ``q_j [u_j]_+^(1/(alpha-1))`` of the candidates ``theta`` (inactive: exactly 0)."""
        return torch.exp(log_q + torch.log(self.u(theta, alpha).clamp_min(0.0)) / (alpha - 1.0))  # log 0 = -inf


def _newton(
    theta: torch.Tensor, log_q: torch.Tensor, alpha: float, lower: torch.Tensor | None = None, exact: bool = True
) -> Threshold | torch.Tensor:
    """Safeguarded Newton + bisection on ``phi = S^(alpha-1) - 1`` within the exact bracket, in ``z = u_top``.

    ``S(z) = sum_j q_j [z - g_j]_+^(1/(alpha-1))``, ``g_j = (alpha-1)(top - theta_j)``, is the mass (``z``
    is an affine function of tau, so the steps are tau's); ``S^(alpha-1)`` is a p-norm (p = 1/(alpha-1))
    of affine functions, exactly linear on a one-class support and nearly linear otherwise, so Newton
    needs few steps; for alpha <= 2 it is convex in tau, and Newton from a lower bound of tau never
    overshoots (docs/performance.md). The bracket of docs/loss.md in ``z``: ``S >= 1`` at
    ``min_j (g_j + q_j^(1-alpha))`` (tau's lower end) and ``S <= 1`` at ``(sum_j q_j)^(1-alpha)``;
    ``lower``, a known lower bound of tau, lowers the upper end (a warm start). For alpha > 2 the
    solve is repeated with the edge of the support as the pivot (:func:`_refine_at_edge`).
    ``exact=False`` takes ``_PROBE_STEPS`` steps and returns a lower bound of tau without any sync:
    tau where a row has converged, the bracket's end (``S >= 1`` there) elsewhere.
    """
    am1 = alpha - 1.0
    top = theta.amax(dim=1)
    gap = (top.unsqueeze(1) - theta).mul_(am1)
    hi = (gap + torch.exp(-am1 * log_q)).amin(dim=1)  # padding (log q = -inf) gives inf
    if lower is not None:
        hi = torch.minimum(hi, 1.0 + am1 * (top - lower))
    lo = torch.exp(-am1 * torch.logsumexp(log_q, dim=1))
    q = torch.exp(log_q)
    if not exact:
        z = hi
        for _ in range(_PROBE_STEPS):
            z, lo, hi, small = _newton_step(gap, q, z, lo, hi, alpha)
        z = torch.where(small | (hi - lo <= _RESOLUTION * hi), z, hi)  # S(hi) >= 1: hi is never below the root
        return top + (1.0 - z) / am1
    z = _newton_blocks(gap, q, hi, lo, hi, alpha)
    threshold = Threshold(top + (1.0 - z) / am1, top, z)
    return _refine_at_edge(theta, q, alpha, threshold) if alpha > 2.0 else threshold


def _refine_at_edge(theta: torch.Tensor, q: torch.Tensor, alpha: float, threshold: Threshold) -> Threshold:
    """The solve again with each row's least active class as the pivot: exact ``p`` at the edge of the support.

    Solved with the largest logit as the pivot, ``u_j`` is exact to about ``eps (u_top + g_j)``; a class
    at the edge has ``u_j = p_j^(alpha-1)``, at alpha 10 about 1e-18 for ``p_j`` = 0.01, far below that.
    The pivot ``k`` is the class of least ``u`` not below minus that rounding (a class that rounded out
    of the support is taken); solved around it, every active ``u_j`` near the edge is exact to ``eps
    u_j``. The bracket: ``S <= 1`` at ``u_k`` = minus the rounding, ``S >= 1`` at ``u_top`` (``u_k <=
    u_top``), widened by rounding; the start is ``u_k`` of the first solve.
    """
    am1 = alpha - 1.0
    u = threshold.u(theta, alpha)
    rounding = 8.0 * _RESOLUTION * (threshold.pivot_u.unsqueeze(1) + am1 * (threshold.pivot.unsqueeze(1) - theta))
    edge = torch.where((u > -rounding) & (q > 0), u, float("inf")).argmin(dim=1, keepdim=True)
    pivot = theta.gather(1, edge).squeeze(1)
    gap = (pivot.unsqueeze(1) - theta).mul_(am1)
    lo = -rounding.gather(1, edge).squeeze(1)
    hi = threshold.pivot_u * (1.0 + 4.0 * _RESOLUTION)
    z = _newton_blocks(gap, q, u.gather(1, edge).squeeze(1).clamp(lo, hi), lo, hi, alpha)
    return Threshold(pivot + (1.0 - z) / am1, pivot, z)


def _newton_blocks(
    gap: torch.Tensor, q: torch.Tensor, z: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Newton steps from ``z`` within ``lo, hi`` in blocks of ``_NEWTON_BLOCK``, one host sync (the test) per block."""
    for _ in range(0, _NEWTON_MAX_ITER, _NEWTON_BLOCK):
        for _ in range(_NEWTON_BLOCK):
            z, lo, hi, small = _newton_step(gap, q, z, lo, hi, alpha)
        if bool((small | (hi - lo <= _RESOLUTION * hi.abs())).all()):
            break
    return z


def _newton_step(
    gap: torch.Tensor,
    q: torch.Tensor,
    z: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One safeguarded Newton step within the bracket ``lo, hi`` of ``z``.

    Returns the new ``z``, the bracket updated by the sign of S - 1, and the rows whose step was rounding.
    """
    am1 = alpha - 1.0
    u = (z.unsqueeze(1) - gap).clamp_min_(0.0)
    # dp_j/dz = q_j u_j^(1/(alpha-1) - 1) / (alpha-1) and p_j = q_j u_j^(1/(alpha-1)). For alpha > 2 the
    # power is inf at an inactive class (u = 0), which has neither mass nor slope: set to 0.
    slope = q * u.pow(1.0 / am1 - 1.0)
    if alpha > 2.0:
        slope = slope.nan_to_num_(nan=0.0, posinf=0.0)
    total, slope = (slope * u).sum(dim=1), slope.sum(dim=1)
    # S is non-decreasing in z: S >= 1 means the root lies at or below z.
    above = total >= 1.0
    hi = torch.where(above, z, hi)
    lo = torch.where(above, lo, z)
    # Newton on S^(alpha-1) - 1: z - (S - S^(2-alpha)) / sum_j q_j u_j^(1/(alpha-1) - 1). No mass gives
    # 0/0, a NaN that fails both tests below and falls back to bisection, like a step out of the bracket.
    proposal = torch.addcdiv(z, total - total.pow(2.0 - alpha), slope, value=-1.0)
    # A step of rounding size is kept (Newton converges quadratically near the root), never replaced
    # by a bisection that would throw the converged z away.
    small = (proposal - z).abs() <= _step_converged(alpha) * z.abs()
    # Strictly inside: a proposal on an end of the bracket may be a 2-cycle of Newton between them.
    # The bisection is geometric where 0 < lo: z may be many orders of magnitude below hi.
    take = small | ((proposal > lo) & (proposal < hi))
    middle = torch.where(lo > 0, torch.sqrt(lo.clamp_min(0.0) * hi), torch.lerp(lo, hi, 0.5))
    z = torch.where(take, proposal.clamp(lo, hi), middle)
    return z, lo, hi, small


def solve_tau(theta: torch.Tensor, log_q: torch.Tensor, alpha: float, lower: torch.Tensor | None = None) -> Threshold:
    """The threshold of candidates: closed form at alpha 1.5 and 2 (``theta`` sorted by decreasing logit), else Newton.

    Solved and returned in ``TAU_DTYPE`` (float64) whatever the inputs' dtype.
    """
    theta, log_q = theta.to(TAU_DTYPE), log_q.to(TAU_DTYPE)
    lower = None if lower is None else lower.to(TAU_DTYPE)
    if alpha in (1.5, 2.0):
        return Threshold.from_tau(theta, _tau_sorted_closed_form(theta, torch.exp(log_q), alpha), alpha)
    return _newton(theta, log_q, alpha, lower)


def _tau_lower_bound(theta: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """A lower bound of tau of candidates sorted by decreasing logit, without a host sync.

    tau does not increase with alpha (``(1 + a x)^(1/a)`` decreases in ``a``, so every class has less
    mass at a given tau; docs/performance.md), so tau at alpha 1.5 or 2, the nearest closed form
    above, bounds tau from below for 1 < alpha < 2; ``_PROBE_STEPS`` Newton steps from there tighten it.
    Solved in ``TAU_DTYPE``.
    """
    theta, log_q = theta.to(TAU_DTYPE), log_q.to(TAU_DTYPE)
    if alpha in (1.5, 2.0):
        return _tau_sorted_closed_form(theta, torch.exp(log_q), alpha)
    lower = None
    if alpha < 2.0:
        lower = _tau_sorted_closed_form(theta, torch.exp(log_q), 1.5 if alpha < 1.5 else 2.0)
    return _newton(theta, log_q, alpha, lower, exact=False)


def tau_lower_bound_in(tau: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A computed tau as a lower bound of the true one in ``dtype``.

    The slack ``sqrt(eps) (1 + |tau|)`` of ``dtype`` dwarfs both the solve's rounding and the cast's
    (at most ``eps |tau| / 2``), so neither can turn the bound into an upper one.
    """
    return (tau - torch.finfo(dtype).eps ** 0.5 * (1.0 + tau.abs())).to(dtype)


def group_maxima_tau(
    x: torch.Tensor, target_x: torch.Tensor, log_q_target: torch.Tensor, alpha: float, scale: float, groups: int
) -> torch.Tensor:
    """A lower bound of each row's tau (logits ``scale * x``) from the maxima of ``groups`` groups of its classes.

    Class j is in group ``j mod groups``. Each maximum stands for a class of its group, so the
    maxima are a subset of the row's classes and their tau, less a rounding slack, a lower bound
    of the row's (docs/loss.md, "Candidates"). ``target_x [B, 1]`` is the target's ``x`` (NaN
    where the target is not among the columns): a maximum equal to it may be the target and gets
    ``min(q_y, 1)``, less mass than either class it can be, which keeps the bound valid. One
    strided max over the row instead of a top-k; no host sync. The bound has ``log_q_target``'s dtype.
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
    return tau_lower_bound_in(_tau_lower_bound(theta, log_q, alpha), theta.dtype)
