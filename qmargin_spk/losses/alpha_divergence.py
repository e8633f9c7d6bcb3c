"""Functional core: the alpha-divergence operator with a reference measure and its Fenchel-Young loss.

The maths is in ``docs/loss.md`` (Koutsianos et al., ECCV 2026; Roulet et al., ICML 2025).
For logits ``theta`` [B, C], a prior ``q`` that is 1 everywhere except ``q_y = exp(log_q_target)``
at the target, and ``alpha > 1``::

    p_j = q_j * [1 + (alpha - 1)(theta_j - tau)]_+ ** (1 / (alpha - 1)),  tau such that sum_j p_j = 1

``alpha == 1`` is the closed form ``softmax(theta + log q)`` (Q-Margin at alpha 1 is CosFace).

The support of ``p`` is a prefix of the classes sorted by logit and every class below
``tau_lo - 1/(alpha - 1)`` is inactive (``tau_lo`` the lower end of the bracket), so the solver
only ever looks at those *candidates*: a few per row, gathered with one ``topk``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qmargin_spk.losses.stats import PosteriorStats, posterior_statistics

_HALLEY_MAX_ITER = 60
# alpha above this makes u^(1/(alpha-1)) underflow-prone and the loss's q_y^(1-alpha) overflow in
# float32 for usual scales and margins; alpha 2 (sparsemax) is already very sparse.
MAX_ALPHA = 10.0
# Probe sizes for the lower bound of tau (docs/loss.md, "Candidates"). The dense path has the
# whole row: 32 largest logits already put the floor within a few classes of the support.
DENSE_PROBE_CLASSES = 32


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
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"targets must be [B] with B = {batch}, got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"targets must be integer class indices, got dtype {target.dtype}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"targets out of range [0, {num_classes}): min {int(target.min())}, max {int(target.max())}")


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
    return torch.where(u > 0, torch.exp(log_q + torch.log(u) / am1), torch.zeros_like(u))


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


def _tau_halley(theta: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """Safeguarded Halley + bisection on ``g(tau) = sum_j p_j(tau) - 1`` within the exact bracket."""
    am1 = alpha - 1.0
    inv = 1.0 / am1
    lo = (theta - f_prime_inv_q(log_q, alpha)).amax(dim=1)
    total_q = torch.logsumexp(log_q, dim=1)
    hi = theta.amax(dim=1) - f_prime_inv_q(total_q, alpha)
    tau = lo.clone()
    q = torch.exp(log_q)
    eps = torch.finfo(theta.dtype).eps
    for _ in range(_HALLEY_MAX_ITER):
        u = torch.clamp_min(1.0 + am1 * (theta - tau.unsqueeze(1)), 0.0)
        pos = u > 0
        log_u = torch.log(torch.where(pos, u, torch.ones_like(u)))
        w0 = torch.where(pos, q * torch.exp(inv * log_u), torch.zeros_like(u))
        w1 = torch.where(pos, q * torch.exp((inv - 1.0) * log_u), torch.zeros_like(u))
        w2 = torch.where(pos, q * torch.exp((inv - 2.0) * log_u), torch.zeros_like(u))
        g = w0.sum(dim=1) - 1.0
        g1 = -w1.sum(dim=1)
        g2 = (2.0 - alpha) * w2.sum(dim=1)
        # Keep the bracket: g is non-increasing, so g >= 0 means the root lies above.
        lo = torch.where(g >= 0, tau, lo)
        hi = torch.where(g < 0, tau, hi)
        denom = 2.0 * g1 * g1 - g * g2
        step = torch.where(denom != 0, 2.0 * g * g1 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                           torch.zeros_like(g))
        proposal = tau - step
        inside = (proposal > lo) & (proposal < hi) & torch.isfinite(proposal)
        resolution = 2.0 * eps * (1.0 + tau.abs())
        # A row is done once its bracket has collapsed or a Halley step (cubically convergent
        # near the root) moves tau by no more than rounding; such a step is kept, never
        # replaced by a bisection that would throw the converged tau away.
        small = step.abs() <= resolution
        done = small | (hi - lo <= resolution)
        tau = torch.where(small, torch.minimum(torch.maximum(proposal, lo), hi),
                          torch.where(inside, proposal, 0.5 * (lo + hi)))
        if bool(done.all()):
            break
    return tau


def tau_rounding_slack(tau: torch.Tensor) -> torch.Tensor:
    """Room left below a computed tau so that its rounding never turns a lower bound into an upper one."""
    return torch.finfo(tau.dtype).eps ** 0.5 * (1.0 + tau.abs())


def probe_tau(
    theta: torch.Tensor, target: torch.Tensor, log_q_target: torch.Tensor, alpha: float, probe_classes: int,
    col_offset: int = 0,
) -> torch.Tensor:
    """tau of each row's ``probe_classes`` largest logits of ``theta`` (columns ``col_offset + j``).

    Any subset of a row's classes has less mass at a given tau, so its tau is a lower bound of the
    row's tau: classes below ``tau_probe - 1/(alpha - 1)`` can never be active (docs/loss.md).
    """
    probe_theta, probe_cols = torch.topk(theta, min(probe_classes, theta.shape[1]), dim=1, sorted=True)
    probe_cols = probe_cols + col_offset
    log_q = torch.where(probe_cols == target.unsqueeze(1), log_q_target.unsqueeze(1), torch.zeros_like(probe_theta))
    return solve_on_candidates(probe_theta, probe_cols, log_q, alpha).tau


def _candidates(theta: torch.Tensor, target: torch.Tensor, log_q_target: torch.Tensor, alpha: float):
    """Every class of a dense row that can be in the support, in the layout of :func:`candidates_from_pairs`.

    The floor is the probe's tau (``DENSE_PROBE_CLASSES`` largest logits) less the support gap; the
    probe holds the largest non-target logit, so it is never looser than the bracket's lower end.
    """
    tau_probe = probe_tau(theta, target, log_q_target, alpha, DENSE_PROBE_CLASSES)
    floor = tau_probe - tau_rounding_slack(tau_probe) - 1.0 / (alpha - 1.0)
    cand_row, cand_col = (theta > floor.unsqueeze(1)).nonzero(as_tuple=True)
    return candidates_from_pairs(cand_row, cand_col, theta[cand_row, cand_col], target, log_q_target, floor)


def candidates_from_pairs(
    rows: torch.Tensor,
    cols: torch.Tensor,
    theta: torch.Tensor,
    target: torch.Tensor,
    log_q_target: torch.Tensor,
    floor: torch.Tensor,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad candidate ``(row, class, logit)`` triples (``rows`` non-decreasing) into sorted ``[B, K]`` rows.

    Returns logits sorted by decreasing value, their class indices and ``log q`` (``log_q_target``
    at the target, 0 elsewhere), K the largest candidate count of the batch, or at most ``limit``
    (the ``limit`` largest logits of each row). Padding gets the finite logit ``floor`` of its row
    (any value no candidate lies below) and ``log q = -inf``.
    """
    batch = target.shape[0]
    counts = torch.bincount(rows, minlength=batch)
    starts = torch.cumsum(counts, dim=0) - counts
    slot = torch.arange(rows.shape[0], device=rows.device) - starts[rows]
    k = int(counts.max())
    cand_theta = theta.new_full((batch, k), float("-inf"))
    cand_theta[rows, slot] = theta
    cand_idx = torch.zeros(batch, k, dtype=torch.long, device=rows.device)
    cand_idx[rows, slot] = cols
    if limit is not None and limit < k:
        cand_theta, order = torch.topk(cand_theta, limit, dim=1)
    else:
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
    if alpha in (1.5, 2.0):
        tau = _tau_sorted_closed_form(cand_theta, torch.exp(log_q), alpha)
    else:
        tau = _tau_halley(cand_theta, log_q, alpha)
    values = _mass(cand_theta, log_q, tau, alpha)
    values = values / values.sum(dim=1, keepdim=True)
    return SparsePosterior(cand_idx, values, tau, (values > 0).sum(dim=1))


def solve_sparse_posterior(
    logits: torch.Tensor, target: torch.Tensor, log_q_target: torch.Tensor | float, alpha: float
) -> SparsePosterior:
    """The alpha-divergence posterior with the Q-Margin-style prior, as (index, value) pairs.

    ``log_q_target`` is ``log q_y`` per row (or one float for all rows); every other class has
    ``q_j = 1``. Solved in float64 for float64 logits and float32 otherwise; deterministic.
    """
    validate_inputs(logits, target, alpha)
    work = solver_dtype(logits.dtype)
    theta = logits.detach().to(work)
    target = target.long()
    log_q_target = torch.as_tensor(log_q_target, dtype=work, device=theta.device).expand(theta.shape[0])
    if alpha == 1.0:
        shifted = theta.scatter_add(1, target.unsqueeze(1), log_q_target.unsqueeze(1))
        values = torch.softmax(shifted, dim=1)
        indices = torch.arange(theta.shape[1], device=theta.device).expand_as(theta)
        nan = torch.full((theta.shape[0],), float("nan"), dtype=work, device=theta.device)
        return SparsePosterior(indices, values, nan, (values > 0).sum(dim=1))
    return solve_on_candidates(*_candidates(theta, target, log_q_target, alpha), alpha)


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
    """Mean loss on ``scale * inputs`` for a solved posterior; backward is ``scale (p - e_y) / B``.

    The posterior is solved before the call (no gradient flows through the solver).
    """

    @staticmethod
    def forward(ctx, inputs, target, scale, log_q_target, alpha, sparse):  # noqa: D102
        logits = inputs * scale if scale != 1.0 else inputs
        per_row = fy_loss_from_posterior(logits, target, log_q_target, sparse, alpha)
        ctx.save_for_backward(sparse.indices, sparse.values, target)
        ctx.shape, ctx.dtype, ctx.scale = inputs.shape, inputs.dtype, scale
        return per_row.mean().to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        indices, values, target = ctx.saved_tensors
        batch = values.shape[0]
        factor = grad_out.to(values.dtype) * (ctx.scale / batch)
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
        scaled = logits.detach() * scale if scale != 1.0 else logits.detach()
        sparse = solve_sparse_posterior(scaled, target, log_q_target, alpha)
    target = target.long()
    log_q = torch.as_tensor(log_q_target, dtype=sparse.values.dtype, device=logits.device)
    loss = _FenchelYoungLoss.apply(logits, target, float(scale), log_q, float(alpha), sparse)
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
