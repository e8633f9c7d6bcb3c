"""Q-Margin for very many classes: a cosine classifier fused with its loss, exact and sparse.

``SparseQMarginHead`` owns the prototypes ``weight [C, D]`` (initialised like SpeechBrain's ECAPA
``Classifier``) and returns the same loss and gradients as ``QMarginLoss`` on the dense cosines,
without ever holding the ``B x C`` logits (``docs/loss.md``, "Candidates"):

- forward streams over class chunks (``candidate_stream.py``), computes ``theta = s cos`` of one
  chunk at a time and keeps per row a running lower bound ``lo`` of tau and the candidates
  ``theta_j > lo - 1/(alpha - 1)``, the only classes that can be in the support, at most
  ``capacity`` of them; a row with more is recomputed alone, chunk by chunk, and counted in
  ``overflow_count``;
- tau is solved exactly on the candidates (``solve_on_candidates``) and only ``(class, p)`` pairs
  are kept;
- backward touches only the rows ``S ∪ {y}`` of the weight: ``dL/dx_n = s/B sum_j (p_j - e_yj) w_j``
  and ``dL/dw_j = s/B sum_b (p_bj - e_yj) x_b``, then through both L2 normalisations. The weight
  gradient is dense (zero off the touched rows) or, with ``sparse_grad=True``, a sparse COO tensor
  for optimisers that take one (SGD without weight decay, ``SparseAdam``).

It keeps the head contract (:class:`~qmargin_spk.losses.registry.SpeakerHead`: embeddings, labels
-> loss; ``margin``, ``scale``, ``stats``); an experiment selects it with ``head: sparse`` on the
qmargin loss fragment (``hparams/*_qmargin_sparse.yaml``), and ``build_head`` builds it.

``[B, 1, D]`` embeddings and ``[B, 1]`` labels are accepted. A margin scheduler sets ``margin``;
``stats`` holds the :class:`PosteriorStats` of the last batch. The ``weight`` entry of the state dict
has the layout of ``Classifier.weight``, so prototypes load either way and checkpoints keep their
``classifier`` key. For several GPUs, keep the head out of
DDP and use ``ShardedQMarginHead`` (``sharded_head.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from qmargin_spk.losses.candidate_stream import Combiner, HeadSettings, SingleProcess, stream_candidates
from qmargin_spk.losses.fenchel_young import fy_loss_on_candidates
from qmargin_spk.losses.posterior import SparsePosterior, candidates_from_pairs, solve_on_candidates
from qmargin_spk.losses.shapes import flatten_batch
from qmargin_spk.losses.stats import PosteriorStats, posterior_statistics
from qmargin_spk.losses.threshold import solver_dtype
from qmargin_spk.losses.validation import validate_alpha, validate_finite, validate_targets


@dataclass(frozen=True)
class _Solved:
    """A forward's result, computed without autograd: the mean loss, the gradient's non-zeros, statistics."""

    loss: torch.Tensor
    touched: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    stats: PosteriorStats


@torch.no_grad()
def _solve(
    x_n: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, settings: HeadSettings, combiner: Combiner
) -> _Solved:
    """Stream the candidates, agree on tau across shards, and solve the posterior exactly."""
    batch = x_n.shape[0]
    log_q_target = torch.full((batch,), -settings.scale * settings.margin, dtype=x_n.dtype, device=x_n.device)
    stream = stream_candidates(x_n, weight, labels, log_q_target, settings)
    lo, target_theta = combiner.max(torch.stack([stream.lo, stream.target_theta]))
    local_pairs, overflow = stream.finish(lo, x_n, weight)
    pairs = combiner.gather_pairs(local_pairs).sorted_by_row()
    floor = lo - stream.gap
    cand_theta, cand_idx, log_q = candidates_from_pairs(
        pairs.rows, pairs.cols, pairs.theta, labels, log_q_target, floor
    )
    sparse = solve_on_candidates(cand_theta, cand_idx, log_q, settings.alpha)
    per_row = fy_loss_on_candidates(cand_theta, target_theta, labels, log_q_target, sparse, settings.alpha)
    stats = posterior_statistics(sparse.values, sparse.indices, sparse.support_size, labels)
    return _Solved(
        loss=per_row.mean(),
        touched=_owned_gradient_pairs(sparse, labels, settings.class_offset, weight.shape[0]),
        stats=replace(stats, overflow_rows=int(overflow.numel())),
    )


class _SparseQMarginFunction(torch.autograd.Function):
    """Mean Q-Margin loss of normalised embeddings against (a shard of) raw prototypes, from a solved forward."""

    @staticmethod
    def forward(ctx, x_n, weight, solved, settings):  # noqa: D102
        ctx.save_for_backward(x_n, weight, *solved.touched)
        ctx.settings = settings
        return solved.loss.clone()

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x_n, weight, rows, cols, coef = ctx.saved_tensors
        settings = ctx.settings
        coef = coef * (grad_out * (settings.scale / x_n.shape[0]))
        classes, inverse = torch.unique(cols, return_inverse=True)
        # G [B, U]: the non-zero entries of dL/dtheta restricted to the touched prototypes.
        shape = (x_n.shape[0], classes.shape[0])
        grad_theta = torch.sparse_coo_tensor(
            torch.stack([rows, inverse]), coef, shape, check_invariants=False
        ).coalesce()
        raw = weight[classes].to(x_n.dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            prototypes = F.normalize(raw, dim=1)
        grad_x = torch.sparse.mm(grad_theta, prototypes.detach()) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_prototypes = torch.sparse.mm(grad_theta.t(), x_n)
            (grad_rows,) = torch.autograd.grad(prototypes, raw, grad_prototypes)
            grad_weight = _weight_gradient(classes, grad_rows.to(weight.dtype), weight.shape, settings.sparse_grad)
        return grad_x, grad_weight, None, None


def _owned_gradient_pairs(
    sparse: SparsePosterior, labels: torch.Tensor, class_offset: int, num_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-zero ``p - e_y`` entries on this shard's classes as (row, local class, value) triples."""
    local = sparse.indices - class_offset
    rows, slots = ((sparse.values > 0) & (local >= 0) & (local < num_local)).nonzero(as_tuple=True)
    local_labels = labels - class_offset
    target_rows = ((local_labels >= 0) & (local_labels < num_local)).nonzero().squeeze(1)
    return (
        torch.cat([rows, target_rows]),
        torch.cat([local[rows, slots], local_labels[target_rows]]),
        torch.cat([sparse.values[rows, slots], sparse.values.new_full(target_rows.shape, -1.0)]),
    )


def _weight_gradient(classes: torch.Tensor, grad_rows: torch.Tensor, shape: torch.Size, sparse: bool) -> torch.Tensor:
    """The prototype gradient with ``grad_rows`` at ``classes`` (unique, sorted), dense or sparse COO."""
    if sparse:
        return torch.sparse_coo_tensor(
            classes.unsqueeze(0), grad_rows, shape, is_coalesced=True, check_invariants=False
        )
    return grad_rows.new_zeros(shape).index_copy_(0, classes, grad_rows)


def checked_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, D]`` embeddings (finite) and ``[B]`` labels from SpeechBrain's shapes."""
    embeddings, labels = flatten_batch(embeddings, labels, name="embeddings")
    validate_finite(embeddings, "embeddings")
    return embeddings, labels


class QMarginHeadBase(torch.nn.Module):
    """Hyper-parameters, statistics and the loss call shared by the single-process and sharded heads."""

    kind = "sparse"
    model_parallel = False

    def __init__(
        self, alpha: float, scale: float, margin: float, chunk_size: int, capacity: int, sparse_grad: bool
    ) -> None:
        super().__init__()
        validate_alpha(alpha, sparse=True)
        if scale <= 0 or chunk_size <= 0 or capacity <= 0:
            raise ValueError(f"scale, chunk_size and capacity must be > 0, got {scale}, {chunk_size}, {capacity}")
        self.alpha = float(alpha)
        self.scale = float(scale)
        self.margin = float(margin)
        self.chunk_size = int(chunk_size)
        self.capacity = int(capacity)
        self.sparse_grad = bool(sparse_grad)
        self.overflow_count = 0
        self.stats: PosteriorStats | None = None

    def settings(self, class_offset: int = 0) -> HeadSettings:
        """A snapshot of the hyper-parameters for one forward (a scheduler may change them between steps)."""
        return HeadSettings(
            self.alpha, self.scale, self.margin, self.chunk_size, self.capacity, self.sparse_grad, class_offset
        )

    def loss_settings(self) -> dict:
        """Loss name, head kind and the Q-Margin hyper-parameters (model.json, logs and tables show these)."""
        return {"loss": "qmargin", "head": self.kind, "alpha": self.alpha, "scale": self.scale, "margin": self.margin}

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy a full ``[C, D]`` prototype matrix (the sharded head keeps its own rows)."""
        self.weight.copy_(weight)

    def sparse_loss(
        self, x_n: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, class_offset: int, combiner: Combiner
    ) -> torch.Tensor:
        """Mean loss of normalised embeddings (float32/64) whose logits this process sees for its shard."""
        settings = self.settings(class_offset)
        solved = _solve(x_n, weight, labels, settings, combiner)
        self.stats = solved.stats
        self.overflow_count += solved.stats.overflow_rows
        return _SparseQMarginFunction.apply(x_n, weight, solved, settings)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, scale={self.scale}, margin={self.margin}, chunk_size={self.chunk_size}, "
            f"capacity={self.capacity}, sparse_grad={self.sparse_grad}"
        )


def without_autocast(tensor: torch.Tensor) -> torch.autocast:
    """Autocast off: the head computes in float32 (float64 for float64 inputs) whatever the Brain runs under."""
    return torch.autocast(tensor.device.type, enabled=False)


def normalized_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """L2-normalised embeddings in the solver dtype (float32 for half precision and autocast inputs)."""
    return F.normalize(embeddings.to(solver_dtype(embeddings.dtype)), dim=1)


class SparseQMarginHead(QMarginHeadBase):
    """Prototypes ``weight [C, D]`` and the Q-Margin loss on their cosines, exact, without ``B x C`` memory.

    ``chunk_size`` classes are scored at a time (memory ``B x chunk_size``); ``capacity`` bounds the
    candidates kept per row (rows needing more take the exact fallback, counted in ``overflow_count``);
    ``sparse_grad=True`` gives ``weight`` a sparse COO gradient. ``alpha`` must be > 1.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        alpha: float = 1.5,
        scale: float = 10.0,
        margin: float = 0.2,
        chunk_size: int = 8192,
        capacity: int = 1024,
        sparse_grad: bool = False,
    ) -> None:
        super().__init__(alpha, scale, margin, chunk_size, capacity, sparse_grad)
        self.num_classes = int(num_classes)
        self.weight = torch.nn.Parameter(torch.empty(num_classes, embedding_dim))
        torch.nn.init.xavier_uniform_(self.weight)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch: ``embeddings [B, D]`` or ``[B, 1, D]``, ``labels [B]`` or ``[B, 1]``."""
        embeddings, labels = checked_batch(embeddings, labels)
        validate_targets(labels, embeddings.shape[0], self.num_classes)
        with without_autocast(embeddings):
            return self.sparse_loss(normalized_embeddings(embeddings), labels.long(), self.weight, 0, SingleProcess())
