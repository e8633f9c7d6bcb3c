"""Posterior statistics of one batch, the single schema that every head and loss reports.

Training logs them per epoch (support size, ``p_y``, overflowing rows, accuracy where a head
computes the full logits); see ``docs/loss.md`` for what they say about a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PosteriorStats:
    """Statistics of one batch of ``batch_size`` rows.

    ``support_mean`` / ``support_max``: classes with ``p > 0`` per row; ``p_target_mean``: mean ``p_y``;
    ``p_target_zero_frac``: rows whose target is outside the support; ``overflow_rows``: rows of a
    sparse head that needed the exact fallback; ``correct``: rows whose largest logit is the target
    (None where the head never forms every logit).
    """

    batch_size: int
    support_mean: float
    support_max: float
    p_target_mean: float
    p_target_zero_frac: float
    overflow_rows: int = 0
    correct: int | None = None


def posterior_statistics(
    values: torch.Tensor, indices: torch.Tensor, support_size: torch.Tensor, target: torch.Tensor
) -> PosteriorStats:
    """Statistics of a posterior stored as ``values`` at ``indices`` per row (``[B, K]``)."""
    p_target = (values * (indices == target.unsqueeze(1))).sum(dim=1).to(torch.float64)
    support = support_size.to(torch.float64)
    # One read back to the host (a sync on a GPU) for all four numbers.
    support_mean, support_max, p_target_mean, zero_frac = torch.stack(
        [support.mean(), support.max(), p_target.mean(), (p_target <= 0).to(torch.float64).mean()]
    ).tolist()
    return PosteriorStats(
        batch_size=int(target.shape[0]),
        support_mean=support_mean,
        support_max=support_max,
        p_target_mean=p_target_mean,
        p_target_zero_frac=zero_frac,
    )


def full_support_statistics(p_target: torch.Tensor, num_classes: int) -> PosteriorStats:
    """Statistics of a posterior that gives every class some mass (softmax, sigmoid): support ``num_classes``."""
    return PosteriorStats(
        batch_size=int(p_target.shape[0]),
        support_mean=float(num_classes),
        support_max=float(num_classes),
        p_target_mean=float(p_target.mean()),
        p_target_zero_frac=float((p_target <= 0).float().mean()),
    )
