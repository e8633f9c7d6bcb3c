"""Model-parallel Q-Margin head: each rank owns a contiguous shard of the prototypes.

The maths is in ``docs/loss.md``, "Heads and statistics".

Every rank all-gathers the normalised embeddings and labels of the whole batch and streams them
against its own shard exactly as ``SparseQMarginHead`` does. The per-rank lower bounds of tau are
combined with an all-reduce (max; each is a bound for the full problem), every rank prunes its
candidates with that common floor, and the candidates of all ranks are all-gathered, so every rank
solves the same tau on the same candidates: loss and ``p`` are those of one process holding all
prototypes. Backward needs no communication beyond returning the embedding gradients to their
owners: the all-gather's backward sums the per-shard gradients (all-reduce) and keeps this rank's
rows. The loss is the mean over the *global* batch, the same value on every rank, so the embedding
model's gradients must be *summed* over ranks, not averaged as DDP does by default: the recipe's
``SpeakerBrain`` keeps this head out of DDP and gives the other modules' DDP a summing hook
(``model_parallel`` marks such heads).

Launch with torchrun (gloo on CPU, nccl on GPU); build the head after ``init_process_group`` and keep
it out of DDP (its gradients are already exact per shard)::

    # torchrun --nproc_per_node 4 train.py
    dist.init_process_group("nccl")
    head = ShardedQMarginHead(num_classes, 192, alpha=1.5, scale=10.0, margin=0.2).cuda()
    loss = head(embeddings, labels)  # this rank's batch; the same global loss on every rank
    loss.backward()

``overflow_count`` and ``stats.overflow_rows`` count the rows that overflowed on this rank's shard.
``state_dict()`` holds this rank's rows (``weight [shard_size, D]``, classes ``[shard_start, shard_stop)``);
``full_weight()`` assembles ``[C, D]`` on rank 0 (loadable into a ``SparseQMarginHead`` or a
``Classifier``) and ``load_full_weight`` takes this rank's rows back from such a matrix.
``full_weight`` is a collective: call it on every rank. SpeechBrain checkpoints store the full
matrix (``{"weight": [C, D]}``, written by rank 0 while every rank takes part in the gather), so a
run resumes, and its prototypes load, with any number of processes. Without an initialised process
group the head is one shard holding every class.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from qmargin_spk.losses.candidate_stream import CandidatePairs, SingleProcess
from qmargin_spk.losses.sparse_head import QMarginHeadBase, checked_batch, normalized_embeddings, without_autocast
from qmargin_spk.losses.validation import validate_targets


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Classes ``[start, stop)`` of ``rank``: contiguous, sizes differing by at most one."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather_rows(tensor: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """All ranks' ``tensor`` concatenated along dim 0 (sizes may differ), and the size of each part."""
    world = dist.get_world_size(group)
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sizes


class _GatherRowsWithGradient(torch.autograd.Function):
    """``gather_rows`` whose backward sums the gradient over ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx, tensor, group):  # noqa: D102
        gathered, sizes = gather_rows(tensor, group)
        rank = dist.get_rank(group)
        ctx.group, ctx.start, ctx.stop = group, sum(sizes[:rank]), sum(sizes[: rank + 1])
        return gathered

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.stop], None


class ProcessGroupCombiner:
    """Combination of per-shard results across the ranks of a process group (exact, same on every rank)."""

    def __init__(self, group) -> None:
        self.group = group

    def max(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return values

    def gather_pairs(self, pairs: CandidatePairs) -> CandidatePairs:
        positions, _ = gather_rows(torch.stack([pairs.rows, pairs.cols], dim=1), self.group)
        theta, _ = gather_rows(pairs.theta, self.group)
        return CandidatePairs(positions[:, 0], positions[:, 1], theta)


class ShardedQMarginHead(QMarginHeadBase):
    """This rank's shard of the prototypes and the exact Q-Margin loss of the global batch."""

    kind = "sharded"
    model_parallel = True  # each rank holds different parameters: never wrap in DDP

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
        process_group=None,
    ) -> None:
        super().__init__(alpha, scale, margin, chunk_size, capacity, sparse_grad)
        self.process_group = process_group
        self.distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size(process_group) if self.distributed else 1
        if num_classes < world:
            raise ValueError(f"num_classes ({num_classes}) must be >= the world size ({world})")
        self.num_classes = int(num_classes)
        rank = dist.get_rank(process_group) if self.distributed else 0
        self.shard_start, self.shard_stop = shard_range(num_classes, rank, world)
        self.weight = torch.nn.Parameter(torch.empty(self.shard_stop - self.shard_start, embedding_dim))
        # xavier_uniform of the full [C, D] matrix, as SparseQMarginHead and Classifier.
        bound = math.sqrt(6.0 / (num_classes + embedding_dim))
        torch.nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batches of all ranks (``[B, D]`` or ``[B, 1, D]``, ``[B]`` or ``[B, 1]``)."""
        embeddings, labels = checked_batch(embeddings, labels)
        validate_targets(labels, embeddings.shape[0], self.num_classes)
        with without_autocast(embeddings):
            if not self.distributed:
                return self.sparse_loss(
                    normalized_embeddings(embeddings), labels.long(), self.weight, 0, SingleProcess()
                )
            x_n = _GatherRowsWithGradient.apply(normalized_embeddings(embeddings), self.process_group)
            all_labels, _ = gather_rows(labels.long(), self.process_group)
            combiner = ProcessGroupCombiner(self.process_group)
            return self.sparse_loss(x_n, all_labels, self.weight, self.shard_start, combiner)

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor | None:
        """The assembled ``[C, D]`` prototypes on rank 0, ``None`` elsewhere (a collective: call on every rank)."""
        return self._gather_shards(self.weight)

    def _gather_shards(self, shard: torch.Tensor) -> torch.Tensor | None:
        """Every rank's ``[shard_size, D]`` rows of a per-class tensor, assembled in class order on rank 0."""
        if not self.distributed:
            return shard.detach().clone()
        world = dist.get_world_size(self.process_group)
        rows = shard_range(self.num_classes, 0, world)[1]  # the largest shard
        padded = shard.new_zeros(rows, shard.shape[1])
        padded[: shard.shape[0]] = shard
        group = self.process_group or dist.group.WORLD
        is_root = dist.get_rank(group) == 0
        parts = [torch.empty_like(padded) for _ in range(world)] if is_root else None
        dist.gather(padded, parts, dst=dist.get_global_rank(group, 0), group=group)
        if not is_root:
            return None
        sizes = [stop - start for start, stop in (shard_range(self.num_classes, r, world) for r in range(world))]
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy this rank's rows of a full ``[C, D]`` prototype matrix (rank-local, no communication)."""
        if weight.shape[0] != self.num_classes or weight.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"expected a [{self.num_classes}, {self.weight.shape[1]}] matrix, got {tuple(weight.shape)}"
            )
        self.weight.copy_(weight[self.shard_start : self.shard_stop])

    def extra_repr(self) -> str:
        return f"shard=[{self.shard_start}, {self.shard_stop}) of {self.num_classes}, " + super().extra_repr()

    @mark_as_saver
    def save(self, path) -> None:
        """Checkpoint saver, run on every rank (the gathers are collectives); rank 0 writes the full matrices.

        ``{"weight": [C, D]}``, plus ``"momentum_buffer"`` ``[C, D]`` when an ``optimizer`` (SGD with
        momentum, set by the recipe's Brain) has one for the prototypes: each rank's optimizer state
        covers only its shard, so it is stored with the prototypes rather than by rank 0's optimizer.
        """
        state = {"weight": self.full_weight()}
        momentum = self._momentum_buffer()
        if momentum is not None:
            state["momentum_buffer"] = self._gather_shards(momentum)
        if state["weight"] is not None:
            torch.save({key: value.cpu() for key, value in state.items()}, path)

    @mark_as_loader
    def load(self, path, end_of_epoch=False) -> None:
        """Checkpoint loader: this rank's rows of the stored full matrices."""
        state = torch.load(path, map_location=self.weight.device, weights_only=True)
        self.load_full_weight(state["weight"])
        if "momentum_buffer" in state and getattr(self, "optimizer", None) is not None:
            self.optimizer.state[self.weight]["momentum_buffer"] = state["momentum_buffer"][
                self.shard_start : self.shard_stop
            ].clone()

    def _momentum_buffer(self) -> torch.Tensor | None:
        optimizer = getattr(self, "optimizer", None)
        return None if optimizer is None else optimizer.state.get(self.weight, {}).get("momentum_buffer")


register_checkpoint_hooks(ShardedQMarginHead, save_on_main_only=False)
