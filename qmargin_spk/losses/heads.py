"""The dense head: SpeechBrain's cosine classifier followed by any loss module.

Every head (the contract is :class:`~qmargin_spk.losses.registry.SpeakerHead`) maps
``(embeddings [B, D] or [B, 1, D], labels [B] or [B, 1]) -> mean loss`` and exposes ``margin``
and ``scale`` (set by the schedules between steps) and ``stats``, the
:class:`~qmargin_spk.losses.stats.PosteriorStats` of its last batch. Its ``weight`` is the
``[C, D]`` prototype matrix. Three heads exist:

- :class:`DenseHead`: SpeechBrain's cosine ``Classifier`` followed by any loss module of
  ``margin_losses.py`` (Q-Margin, AAM, CosFace, entmax); it forms the ``B x C`` cosines;
- :class:`~qmargin_spk.losses.sparse_head.SparseQMarginHead`: Q-Margin fused with the classifier,
  never holding ``B x C``;
- :class:`~qmargin_spk.losses.sharded_head.ShardedQMarginHead`: the same with the prototypes split
  across processes.

Recipes build a head with :func:`~qmargin_spk.losses.registry.build_head`, the ``classifier`` entry
of a loss fragment, which the training stage calls with the number of classes of its data.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from speechbrain.lobes.models.ECAPA_TDNN import Classifier

from qmargin_spk.losses.shapes import flatten_batch
from qmargin_spk.losses.stats import PosteriorStats


class DenseHead(torch.nn.Module):
    """SpeechBrain's cosine ``Classifier`` and a loss module on its ``[B, 1, C]`` cosines."""

    kind = "dense"
    model_parallel = False

    def __init__(self, num_classes: int, embedding_dim: int, loss: torch.nn.Module) -> None:
        super().__init__()
        # A sub-center loss (wespeaker_losses.py) asks for K prototypes per class, stored class-major.
        self.prototypes_per_class = int(getattr(loss, "prototypes_per_class", 1))
        self.classifier = Classifier(input_size=embedding_dim, out_neurons=num_classes * self.prototypes_per_class)
        self.loss = loss
        self.num_classes = int(num_classes)
        self.stats: PosteriorStats | None = None

    @property
    def weight(self) -> torch.nn.Parameter:
        """The ``[C, D]`` prototypes (``[C * K, D]`` for K sub-centers per class: rows ``c K .. c K + K - 1``)."""
        return self.classifier.weight

    @property
    def margin(self) -> float:
        return self.loss.margin

    @margin.setter
    def margin(self, value: float) -> None:
        self.loss.margin = float(value)

    @property
    def scale(self) -> float:
        return self.loss.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.loss.scale = float(value)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of the batch; ``stats`` gains the number of rows whose largest cosine is the target."""
        embeddings, labels = flatten_batch(embeddings, labels, name="embeddings")
        cosines = self.classifier(embeddings.unsqueeze(1))
        loss = self.loss(cosines, labels.unsqueeze(1))
        # Rows are class-major, so the best prototype's class is its index // K.
        correct = int((cosines.squeeze(1).argmax(dim=-1) // self.prototypes_per_class == labels).sum())
        self.stats = replace(self.loss.stats, correct=correct)
        return loss

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy a full ``[C, D]`` (``[C * K, D]`` with sub-centers) prototype matrix into the classifier."""
        if weight.shape != self.weight.shape:
            hint = " (sub-centers are never started from one row per class)" if self.prototypes_per_class > 1 else ""
            raise ValueError(
                f"this head holds {self.prototypes_per_class} prototype(s) per class, a {list(self.weight.shape)} "
                f"matrix; cannot load a {list(weight.shape)} one{hint}"
            )
        self.weight.copy_(weight)

    def loss_settings(self) -> dict:
        """Loss name, head kind and the loss's hyper-parameters."""
        settings = self.loss.loss_settings()
        return {"loss": settings.pop("loss"), "head": self.kind, **settings}

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"
