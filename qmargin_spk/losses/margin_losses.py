"""Loss modules for cosine classifiers: what a ``DenseHead`` applies to SpeechBrain's ``Classifier`` outputs.

Every module takes cosines ``[B, 1, C]`` or ``[B, C]`` and targets ``[B, 1]`` or ``[B]`` and returns
a scalar. ``scale`` and ``margin`` are plain attributes that a scheduler may change between steps,
and ``stats`` holds the :class:`PosteriorStats` of the last forward (support size, ``p_y``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qmargin_spk.losses.fenchel_young import fenchel_young_loss_and_stats
from qmargin_spk.losses.shapes import flatten_batch
from qmargin_spk.losses.stats import PosteriorStats, full_support_statistics
from qmargin_spk.losses.validation import validate_alpha, validate_inputs


class _CosineLoss(torch.nn.Module):
    """Shared shape handling, validation and statistics of the cosine-classifier losses."""

    def __init__(self, scale: float, margin: float) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.margin = float(margin)
        self.stats: PosteriorStats | None = None

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor, length: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss over the batch (``length`` is accepted for SpeechBrain and ignored)."""
        cosines, targets = flatten_batch(outputs, targets)
        return self._loss(cosines, targets)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, scale={self.scale}, margin={self.margin}"

    def loss_settings(self) -> dict:
        """The loss's name and the hyper-parameters it was built with (model.json, logs and tables show these)."""
        return {"loss": self.name, **{key: getattr(self, key) for key in self.SETTINGS}}


class QMarginLoss(_CosineLoss):
    """Q-Margin: the alpha-divergence Fenchel-Young loss with the margin in the target's prior.

    ``q_y = exp(-scale * margin)``, ``q_j = 1`` otherwise; logits ``scale * cos`` are never changed.
    ``alpha = 1`` is exactly CosFace; ``margin = 0`` is alpha-entmax.
    """

    name = "qmargin"
    SETTINGS = ("alpha", "scale", "margin")

    def __init__(self, alpha: float = 1.5, scale: float = 10.0, margin: float = 0.2) -> None:
        validate_alpha(alpha)
        super().__init__(scale, margin)
        self.alpha = float(alpha)

    def _loss(self, cosines: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The functional core validates its inputs; nothing is checked twice.
        loss, self.stats = fenchel_young_loss_and_stats(
            cosines, targets, -self.scale * self.margin, self.alpha, scale=self.scale
        )
        return loss


class AlphaEntmaxLoss(QMarginLoss):
    """The alpha-entmax loss on ``scale * cos`` (Q-Margin with no margin; alpha 2 is SparseMax)."""

    name = "entmax"
    SETTINGS = ("alpha", "scale")

    def __init__(self, alpha: float = 1.5, scale: float = 10.0) -> None:
        super().__init__(alpha=alpha, scale=scale, margin=0.0)


class CosFaceLoss(QMarginLoss):
    """CosFace / AM-softmax: cross-entropy on ``scale * (cos - margin * e_y)``; Q-Margin at alpha 1."""

    name = "cosface"
    SETTINGS = ("scale", "margin")

    def __init__(self, scale: float = 30.0, margin: float = 0.2) -> None:
        super().__init__(alpha=1.0, scale=scale, margin=margin)


class AAMLoss(_CosineLoss):
    """ArcFace / additive angular margin: cross-entropy with ``cos(theta_y + margin)`` at the target.

    Like SpeechBrain's ``AdditiveAngularMargin`` (same fallback ``cos - sin(pi - m) m`` past
    ``theta + m > pi``), but the margin is read at every forward so a scheduler can ramp it,
    and only the target column is modified (no dense one-hot).
    """

    alpha = 1.0
    name = "aam"
    SETTINGS = ("scale", "margin")

    def __init__(self, scale: float = 30.0, margin: float = 0.2, easy_margin: bool = False) -> None:
        super().__init__(scale, margin)
        self.easy_margin = easy_margin

    def _loss(self, cosines: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        validate_inputs(cosines, targets, self.alpha)
        targets = targets.long()
        cosines = cosines.float() if cosines.dtype in (torch.float16, torch.bfloat16) else cosines
        logits = self.scale * self._margin_cosines(cosines, targets)
        log_p = F.log_softmax(logits, dim=1)
        with torch.no_grad():
            p_target = log_p.gather(1, targets.unsqueeze(1)).exp()
            self.stats = full_support_statistics(p_target, cosines.shape[1])
        return F.nll_loss(log_p, targets)

    def _margin_cosines(self, cosines: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``cosines`` with the target's replaced by ``cos(theta_y + margin)`` (subclasses change others too)."""
        target_cos = cosines.gather(1, targets.unsqueeze(1)).clamp(-1 + 1e-7, 1 - 1e-7)
        sine = torch.sqrt(1.0 - target_cos * target_cos)
        shifted = target_cos * math.cos(self.margin) - sine * math.sin(self.margin)
        if self.easy_margin:
            shifted = torch.where(target_cos > 0, shifted, target_cos)
        else:
            threshold = math.cos(math.pi - self.margin)
            shifted = torch.where(
                target_cos > threshold, shifted, target_cos - math.sin(math.pi - self.margin) * self.margin
            )
        return cosines.scatter(1, targets.unsqueeze(1), shifted)
