"""Losses: the alpha-divergence functional core, the cosine-classifier loss modules, and the heads."""

from qmargin_spk.losses.fenchel_young import fenchel_young_loss, fenchel_young_loss_and_stats
from qmargin_spk.losses.heads import DenseHead
from qmargin_spk.losses.margin_losses import AAMLoss, AlphaEntmaxLoss, CosFaceLoss, QMarginLoss
from qmargin_spk.losses.posterior import (
    SparsePosterior,
    alpha_divergence_posterior,
    solve_on_candidates,
    solve_sparse_posterior,
)
from qmargin_spk.losses.registry import HEADS, LOSSES, SpeakerHead, build_head
from qmargin_spk.losses.sharded_head import ShardedQMarginHead
from qmargin_spk.losses.sparse_head import SparseQMarginHead
from qmargin_spk.losses.stats import PosteriorStats, posterior_statistics
from qmargin_spk.losses.wespeaker_losses import SphereFace2Loss, SubCenterAAMLoss

__all__ = [
    "AAMLoss",
    "AlphaEntmaxLoss",
    "CosFaceLoss",
    "DenseHead",
    "HEADS",
    "LOSSES",
    "PosteriorStats",
    "QMarginLoss",
    "ShardedQMarginHead",
    "SparsePosterior",
    "SparseQMarginHead",
    "SpeakerHead",
    "SphereFace2Loss",
    "SubCenterAAMLoss",
    "alpha_divergence_posterior",
    "build_head",
    "fenchel_young_loss",
    "fenchel_young_loss_and_stats",
    "posterior_statistics",
    "solve_on_candidates",
    "solve_sparse_posterior",
]
