"""The alpha-divergence Fenchel-Young loss of a batch and its gradient ``scale (p - e_y) / B``.

The loss is solved under ``torch.no_grad`` from the posterior (``posterior.py``) and enters the
graph through one autograd function whose backward scatters ``p`` (stored sparse) into the
gradient: no gradient flows through the solver and no ``B x C`` product is formed beyond the
gradient itself (``docs/loss.md``). The batch's :class:`PosteriorStats` come with it.
"""

from __future__ import annotations

import torch

from qmargin_spk.losses.posterior import SparsePosterior, dense_sparse_posterior, softmax_posterior
from qmargin_spk.losses.stats import PosteriorStats, posterior_statistics
from qmargin_spk.losses.threshold import TAU_DTYPE, solver_dtype
from qmargin_spk.losses.validation import validate_inputs


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
        # alpha > 1: the candidates' logits, tau, p and the loss in float64 (docs/loss.md, "Exactness").
        work = solver_dtype(logits.dtype) if alpha == 1.0 else TAU_DTYPE
        target = target.long()
        log_q = torch.as_tensor(log_q_target, dtype=work, device=logits.device).expand(logits.shape[0])
        if alpha == 1.0:
            theta = logits.detach().to(work)
            theta = theta if scale == 1.0 else theta * scale
            sparse = softmax_posterior(theta, target, log_q)
            per_row = fy_loss_from_posterior(theta, target, log_q, sparse, alpha)
        else:
            sparse, cand_theta, target_theta = dense_sparse_posterior(logits.detach(), scale, target, log_q, alpha)
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
