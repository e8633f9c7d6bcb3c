"""Losses: the alpha-divergence functional core, the cosine-classifier loss modules, and the heads."""
from qmargin_spk.losses.alpha_divergence import (
    SparsePosterior,
    alpha_divergence_posterior,
    fenchel_young_loss,
    fenchel_young_loss_and_stats,
    solve_on_candidates,
    solve_sparse_posterior,
)
from qmargin_spk.losses.heads import DenseHead
from qmargin_spk.losses.margin_losses import AAMLoss, AlphaEntmaxLoss, CosFaceLoss, QMarginLoss
from qmargin_spk.losses.sharded_head import ShardedQMarginHead
from qmargin_spk.losses.sparse_head import SparseQMarginHead
from qmargin_spk.losses.stats import PosteriorStats, posterior_statistics

__all__ = [
    "AAMLoss",
    "AlphaEntmaxLoss",
    "CosFaceLoss",
    "DenseHead",
    "PosteriorStats",
    "QMarginLoss",
    "ShardedQMarginHead",
    "SparsePosterior",
    "SparseQMarginHead",
    "alpha_divergence_posterior",
    "fenchel_young_loss",
    "fenchel_young_loss_and_stats",
    "posterior_statistics",
    "solve_on_candidates",
    "solve_sparse_posterior",
]
