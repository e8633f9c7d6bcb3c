"""The losses and heads that exist, the head contract, and the one place a loss fragment becomes a head.

A loss fragment (``hparams/losses/<name>.yaml``) names its loss (``loss_name``), its head
(``head: dense | sparse | sharded``) and the loss's hyper-parameters; its ``classifier`` entry is
``!name:qmargin_spk.losses.build_head`` with those keys, and the training stage calls it with the
number of classes of the training data. Every head implements :class:`SpeakerHead`; what a head
reports through ``loss_settings()`` is what logs, ``model.json`` and comparison tables show.
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch

from qmargin_spk.losses.heads import DenseHead
from qmargin_spk.losses.margin_losses import AAMLoss, AlphaEntmaxLoss, CosFaceLoss, QMarginLoss
from qmargin_spk.losses.sharded_head import ShardedQMarginHead
from qmargin_spk.losses.sparse_head import SparseQMarginHead
from qmargin_spk.losses.stats import PosteriorStats
from qmargin_spk.losses.wespeaker_losses import SphereFace2Loss, SubCenterAAMLoss

LOSSES: dict[str, type[torch.nn.Module]] = {
    cls.name: cls for cls in (QMarginLoss, AAMLoss, CosFaceLoss, AlphaEntmaxLoss, SubCenterAAMLoss, SphereFace2Loss)
}
HEADS: dict[str, type[torch.nn.Module]] = {cls.kind: cls for cls in (DenseHead, SparseQMarginHead, ShardedQMarginHead)}
FUSED_LOSS = "qmargin"  # the sparse and sharded heads compute this loss themselves


@runtime_checkable
class SpeakerHead(Protocol):
    """What the training loop holds between the embeddings and the loss.

    ``forward(embeddings [B, D] or [B, 1, D], labels [B] or [B, 1])`` returns the mean loss and
    leaves the batch's :class:`PosteriorStats` in ``stats``; ``margin`` and ``scale`` are set by the
    schedules between steps; ``weight`` holds this process's prototypes. A ``model_parallel`` head
    holds different rows on every process: it is never wrapped in DDP and gets its own optimiser
    (set as its ``optimizer`` attribute) whose state its checkpoint hooks store.
    """

    num_classes: int
    model_parallel: bool
    stats: PosteriorStats | None
    margin: float
    scale: float

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def load_full_weight(self, weight: torch.Tensor) -> None: ...

    def loss_settings(self) -> dict: ...


class HeadSettingsError(ValueError):
    """A loss fragment names a head, loss or setting that does not exist."""


def build_head(
    num_classes: int, embedding_dim: int, head: str = "dense", loss: str = "qmargin", **settings: float
) -> SpeakerHead:
    """The head ``head`` computing ``loss`` with ``settings`` (the loss's hyper-parameters) for ``num_classes``."""
    if head not in HEADS:
        raise HeadSettingsError(f"unknown head {head!r}: expected one of {sorted(HEADS)}")
    if loss not in LOSSES:
        raise HeadSettingsError(f"unknown loss {loss!r}: expected one of {sorted(LOSSES)}")
    if head != "dense" and loss != FUSED_LOSS:
        raise HeadSettingsError(f"head {head!r} computes the {FUSED_LOSS} loss only, not {loss!r}: use head 'dense'")
    accepted = _keywords(LOSSES[loss] if head == "dense" else HEADS[head])
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise HeadSettingsError(f"loss {loss!r} with head {head!r} takes no {unknown} (it takes {sorted(accepted)})")
    if head == "dense":
        return DenseHead(num_classes, embedding_dim, LOSSES[loss](**settings))
    return HEADS[head](num_classes, embedding_dim, **settings)


def _keywords(cls: type) -> set[str]:
    """Keyword parameters of ``cls``'s constructor, less the shapes the training stage passes."""
    parameters = inspect.signature(cls.__init__).parameters
    return {name for name in parameters if name not in ("self", "num_classes", "embedding_dim", "process_group")}
