"""Losses: the alpha-divergence functional core and the cosine-classifier loss modules."""
from qmargin_spk.losses.alpha_divergence import (
    SparsePosterior,
    alpha_divergence_posterior,
    fenchel_young_loss,
    posterior_statistics,
    solve_on_candidates,
    solve_sparse_posterior,
)
from qmargin_spk.losses.margin_losses import AAMLoss, AlphaEntmaxLoss, CosFaceLoss, QMarginLoss
from qmargin_spk.losses.sharded_head import ShardedQMarginHead
from qmargin_spk.losses.sparse_head import SparseQMarginHead

__all__ = [
    "AAMLoss",
    "AlphaEntmaxLoss",
    "CosFaceLoss",
    "QMarginLoss",
    "ShardedQMarginHead",
    "SparsePosterior",
    "SparseQMarginHead",
    "alpha_divergence_posterior",
    "fenchel_young_loss",
    "posterior_statistics",
    "solve_on_candidates",
    "solve_sparse_posterior",
]
