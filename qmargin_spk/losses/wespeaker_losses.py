"""WeSpeaker's loss family beside Q-Margin: sub-center AAM with the inter-top-k penalty, and SphereFace2.

Both are loss modules for :class:`~qmargin_spk.losses.heads.DenseHead`, on the cosines of SpeechBrain's
``Classifier``; ``scale`` and ``margin`` are read at every forward, so ``MarginRamp`` ramps them like
AAM's. Formulas, sources and published settings: ``docs/loss.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qmargin_spk.losses.margin_losses import AAMLoss, _CosineLoss
from qmargin_spk.losses.stats import full_support_statistics
from qmargin_spk.losses.validation import validate_inputs


class SubCenterAAMLoss(AAMLoss):
    """Sub-center AAM (Deng et al., ECCV 2020) with the inter-top-k penalty (Zhao et al., ICASSP 2022).

    The head holds ``K = sub_centers`` prototypes per class, class-major (``prototypes_per_class``
    tells :class:`DenseHead` to build ``C * K`` rows); a class's cosine is the largest of its K.
    Then AAM's ``cos(theta_y + margin)`` at the target, and for the ``top_k`` non-target classes of
    largest cosine ``cos(theta_j - penalty')``: the angle shrinks, the negative gets harder (as
    WeSpeaker's ``ArcMarginProduct_intertopk_subcenter``). ``penalty' = penalty * min(1, margin / m0)``,
    ``m0`` the margin it was built with, so the penalty follows the margin's ramp (WeSpeaker scales it
    by ``margin / 0.2``, its configured margin). Cross-entropy on ``scale`` times these cosines.
    """

    name = "subcenter_aam"
    SETTINGS = ("scale", "margin", "sub_centers", "top_k", "penalty")

    def __init__(
        self,
        scale: float = 32.0,
        margin: float = 0.2,
        sub_centers: int = 3,
        top_k: int = 5,
        penalty: float = 0.06,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(scale, margin, easy_margin)
        if isinstance(sub_centers, bool) or not isinstance(sub_centers, int) or sub_centers < 1:
            raise ValueError(f"sub_centers must be an integer >= 1, got {sub_centers!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
        if penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {penalty}")
        self.sub_centers = sub_centers
        self.top_k = top_k
        self.penalty = float(penalty)
        self.reference_margin = self.margin

    @property
    def prototypes_per_class(self) -> int:
        """Rows of the classifier per class (read by :class:`DenseHead` when it builds its classifier)."""
        return self.sub_centers

    @property
    def current_penalty(self) -> float:
        """The penalty at the current margin: ``penalty * min(1, margin / m0)`` (all of it when ``m0 = 0``)."""
        if self.reference_margin <= 0:
            return self.penalty
        return self.penalty * min(1.0, self.margin / self.reference_margin)

    def class_cosines(self, cosines: torch.Tensor) -> torch.Tensor:
        """``[B, C * K]`` sub-center cosines (class-major) -> ``[B, C]``, the largest per class."""
        if cosines.shape[1] % self.sub_centers:
            raise ValueError(f"{cosines.shape[1]} cosines per row are not a multiple of sub_centers={self.sub_centers}")
        return cosines.unflatten(1, (-1, self.sub_centers)).amax(dim=2)

    def _loss(self, cosines: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super()._loss(self.class_cosines(cosines), targets)

    def _margin_cosines(self, cosines: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """AAM's target cosine, and ``cos(theta_j - penalty')`` at the ``top_k`` largest non-target cosines."""
        shifted = super()._margin_cosines(cosines, targets)
        top_k, penalty = min(self.top_k, cosines.shape[1] - 1), self.current_penalty
        if top_k == 0 or penalty == 0:
            return shifted
        others = cosines.detach().scatter(1, targets.unsqueeze(1), float("-inf"))
        hardest = others.topk(top_k, dim=1).indices
        hard = cosines.gather(1, hardest).clamp(-1 + 1e-7, 1 - 1e-7)
        harder = hard * math.cos(penalty) + torch.sqrt(1.0 - hard * hard) * math.sin(penalty)
        return shifted.scatter(1, hardest, harder)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sub_centers={self.sub_centers}, top_k={self.top_k}, penalty={self.penalty}"


class SphereFace2Loss(_CosineLoss):
    """SphereFace2 (Wen et al., ICLR 2022), WeSpeaker's ``SphereFace2`` with its "C" margin: C one-vs-all problems.

    With ``g(z) = 2 ((z + 1) / 2)^t - 1`` and a learnable bias ``b`` (starts at 0, as WeSpeaker's)::

        loss = mean_rows [ lanbuda * softplus(-(s (g(c_y) - m) + b))
                           + (1 - lanbuda) * sum_{j != y} softplus(s (g(c_j) + m) + b) ]

    ``stats``: ``p_target`` is ``sigmoid(s (g(c_y) - m) + b)``, the target's own binary posterior
    (the rows need not sum to one); the support is every class (each has a binary term).
    """

    alpha = 1.0
    name = "sphereface2"
    SETTINGS = ("scale", "margin", "lanbuda", "t", "margin_type")
    MARGIN_TYPES = ("C",)

    def __init__(
        self, scale: float = 32.0, margin: float = 0.2, lanbuda: float = 0.7, t: float = 3, margin_type: str = "C"
    ) -> None:
        super().__init__(scale, margin)
        if not 0.0 <= lanbuda <= 1.0:
            raise ValueError(f"lanbuda must lie in [0, 1], got {lanbuda}")
        if t <= 0:
            raise ValueError(f"t must be > 0, got {t}")
        if margin_type not in self.MARGIN_TYPES:
            raise ValueError(f"margin_type {margin_type!r} is not implemented (only {list(self.MARGIN_TYPES)})")
        self.lanbuda = float(lanbuda)
        self.t = t
        self.margin_type = margin_type
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def similarity(self, cosines: torch.Tensor) -> torch.Tensor:
        """``g(c) = 2 ((c + 1) / 2)^t - 1``: maps [-1, 1] onto itself, pulling low cosines down."""
        return 2.0 * ((cosines + 1.0) / 2.0).clamp(min=0.0).pow(self.t) - 1.0

    def _loss(self, cosines: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        validate_inputs(cosines, targets, self.alpha)
        targets = targets.long()
        cosines = cosines.float() if cosines.dtype in (torch.float16, torch.bfloat16) else cosines
        g = self.similarity(cosines)
        is_target = F.one_hot(targets, cosines.shape[1]).to(torch.bool)
        positive = self.scale * (g - self.margin) + self.bias
        negative = self.scale * (g + self.margin) + self.bias
        terms = torch.where(
            is_target, self.lanbuda * F.softplus(-positive), (1.0 - self.lanbuda) * F.softplus(negative)
        )
        with torch.no_grad():
            p_target = torch.sigmoid(positive.gather(1, targets.unsqueeze(1)))
            self.stats = full_support_statistics(p_target, cosines.shape[1])
        return terms.sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, lanbuda={self.lanbuda}, t={self.t}, type={self.margin_type}"
