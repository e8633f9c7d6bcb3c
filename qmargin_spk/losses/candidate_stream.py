"""Streaming search for the support candidates of Q-Margin over class chunks (``docs/loss.md``, "Candidates").

Per row, a running lower bound ``lo`` of tau and the candidates ``theta_j > lo - 1/(alpha - 1)``: no
other class can be in the support. ``lo`` is raised two ways, both exact: by
``max_j (theta_j - f'(1/q_j))`` of each chunk, and by tau solved on a subset of the classes seen so
far (adding classes only adds mass, so any subset's tau is a lower bound): the largest logits of the
first chunk, then all the candidates of a row whenever its buffer fills up. A buffer holding more
than ``capacity`` candidates keeps the largest ones and remembers the largest it dropped; if that
one is above the final floor, the row is recomputed alone over the whole shard (the exact fallback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from qmargin_spk.losses.posterior import candidates_from_pairs, posterior_on_candidates
from qmargin_spk.losses.threshold import f_prime_inv_q, group_maxima_tau, tau_lower_bound_in


@dataclass(frozen=True)
class HeadSettings:
    """What one forward of a head needs to know; ``class_offset`` is the first class of this shard."""

    alpha: float
    scale: float
    margin: float
    chunk_size: int
    capacity: int
    sparse_grad: bool
    class_offset: int = 0


@dataclass
class CandidatePairs:
    """Candidate classes of a batch as flat ``(row, class, logit)`` triples."""

    rows: torch.Tensor
    cols: torch.Tensor
    theta: torch.Tensor

    def select(self, mask: torch.Tensor) -> CandidatePairs:
        return CandidatePairs(self.rows[mask], self.cols[mask], self.theta[mask])

    def sorted_by_row(self) -> CandidatePairs:
        order = torch.argsort(self.rows, stable=True)
        return CandidatePairs(self.rows[order], self.cols[order], self.theta[order])

    @staticmethod
    def cat(parts: list[CandidatePairs]) -> CandidatePairs:
        return CandidatePairs(*(torch.cat(tensors) for tensors in zip(*((p.rows, p.cols, p.theta) for p in parts))))


class Combiner(Protocol):
    """How the per-shard results of a forward are combined across the processes holding the classes."""

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over the shards."""

    def gather_pairs(self, pairs: CandidatePairs) -> CandidatePairs:
        """Every shard's candidates, in the same order on every process."""


class SingleProcess:
    """Combination of per-shard results when one process holds every class: nothing to combine."""

    def max(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def gather_pairs(self, pairs: CandidatePairs) -> CandidatePairs:
        return pairs


def chunk_logits(x_n: torch.Tensor, weight: torch.Tensor, start: int, stop: int, scale: float) -> torch.Tensor:
    """``scale * cos`` of the normalised embeddings against prototypes ``start:stop``, in ``x_n``'s dtype."""
    prototypes = F.normalize(weight[start:stop].to(x_n.dtype), dim=1)
    return torch.mm(x_n, prototypes.T).mul_(scale)


# Probe of the first chunk (docs/loss.md, "Candidates"): the maxima of this many groups of its
# classes. Every later chunk is filtered by the bound it sets before the buffers are first
# tightened, so it is larger than the dense path's probe.
STREAM_PROBE_GROUPS = 128
_FIRST_TIGHTEN = 256  # buffer size that triggers the first pass of _tighten


class CandidateStream:
    """Running lower bound of tau and bounded candidate buffers over the class chunks of one shard."""

    def __init__(self, labels: torch.Tensor, log_q_target: torch.Tensor, settings: HeadSettings, dtype: torch.dtype):
        batch = labels.shape[0]
        device = labels.device
        self.labels = labels
        self.log_q_target = log_q_target
        self.settings = settings
        self.gap = 1.0 / (settings.alpha - 1.0)  # theta_j <= tau - gap  <=>  p_j = 0
        self.target_bound_shift = f_prime_inv_q(log_q_target, settings.alpha)
        self.lo = torch.full((batch,), float("-inf"), dtype=dtype, device=device)
        self.target_theta = torch.full((batch,), float("-inf"), dtype=dtype, device=device)
        self.dropped_max = torch.full((batch,), float("-inf"), dtype=dtype, device=device)
        self.counts = torch.zeros(batch, dtype=torch.long, device=device)
        self.tighten_above = min(_FIRST_TIGHTEN, settings.capacity)  # buffer size that triggers _tighten
        empty = torch.empty(0, dtype=torch.long, device=device)
        self.pairs = CandidatePairs(empty, empty, torch.empty(0, dtype=dtype, device=device))

    def add_chunk(self, theta: torch.Tensor, start: int) -> None:
        """Take the logits of classes ``start:start + n`` of the shard (``theta`` is modified and restored)."""
        offset = self.settings.class_offset + start
        local = self.labels - offset
        rows = ((local >= 0) & (local < theta.shape[1])).nonzero().squeeze(1)
        cols = local[rows]
        target = theta[rows, cols]
        self.target_theta[rows] = target
        if start == 0:  # a tight bound from the start keeps the first chunk's candidates few
            target_x = theta.new_full((theta.shape[0], 1), float("nan"))
            target_x[rows, 0] = target
            bound = group_maxima_tau(theta, target_x, self.log_q_target, self.settings.alpha, 1.0, STREAM_PROBE_GROUPS)
            self.lo = torch.fmax(self.lo, bound)
        # tau >= theta_j - f'(1/q_j): the target enters the bound with its own prior.
        theta[rows, cols] = target - self.target_bound_shift[rows]
        self.lo = torch.maximum(self.lo, theta.amax(dim=1))
        theta[rows, cols] = target
        new_rows, new_cols = (theta > (self.lo - self.gap).unsqueeze(1)).nonzero(as_tuple=True)
        new = CandidatePairs(new_rows, new_cols + offset, theta[new_rows, new_cols])
        self.pairs = CandidatePairs.cat([self.pairs, new])
        self.counts.scatter_add_(0, new_rows, torch.ones_like(new_rows))
        if int(self.counts.max()) > self.tighten_above:
            self._tighten()

    def _raise_lo(self, subset_tau: torch.Tensor) -> None:
        """``lo = max(lo, tau of a subset of the classes)``: a lower bound of tau."""
        self.lo = torch.fmax(self.lo, tau_lower_bound_in(subset_tau, self.lo.dtype))

    def _padded(self, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's candidates (its ``limit`` largest), sorted, as ``solve_on_candidates`` takes them."""
        pairs = self.pairs.sorted_by_row()
        return candidates_from_pairs(
            pairs.rows, pairs.cols, pairs.theta, self.labels, self.log_q_target, self.lo - self.gap, limit
        )

    def _tighten(self) -> None:
        """Raise ``lo`` to tau of every candidate seen so far, prune, and cap the buffers."""
        self._raise_lo(posterior_on_candidates(*self._padded(), self.settings.alpha, self.lo).tau)
        self.pairs = self.pairs.select(self.pairs.theta > (self.lo - self.gap)[self.pairs.rows])
        self.counts = torch.zeros_like(self.counts).scatter_add_(0, self.pairs.rows, torch.ones_like(self.pairs.rows))
        if int(self.counts.max()) > self.settings.capacity:
            self._cap()
        # Large supports stay large: let the buffers double before the next pass.
        self.tighten_above = min(max(_FIRST_TIGHTEN, 2 * int(self.counts.max())), self.settings.capacity)

    def _cap(self) -> None:
        """Keep the ``capacity`` largest candidates of each row; remember the largest logit dropped."""
        capacity = self.settings.capacity
        cand_theta, cand_idx, log_q = self._padded(capacity + 1)
        live = torch.isfinite(log_q)
        dropped = torch.where(live[:, capacity], cand_theta[:, capacity], float("-inf"))
        self.dropped_max = torch.maximum(self.dropped_max, dropped)
        rows, slots = live[:, :capacity].nonzero(as_tuple=True)
        self.pairs = CandidatePairs(rows, cand_idx[rows, slots], cand_theta[rows, slots])
        self.counts = live[:, :capacity].sum(dim=1)

    def finish(self, lo: torch.Tensor, x_n: torch.Tensor, weight: torch.Tensor) -> tuple[CandidatePairs, torch.Tensor]:
        """Candidates above ``lo - gap`` (``lo`` a lower bound of tau, e.g. combined over shards).

        Rows whose buffer dropped a class above that floor are recomputed over the whole shard.
        Returns the pairs and the indices of those overflow rows.
        """
        floor = lo - self.gap
        pairs = self.pairs.select(self.pairs.theta > floor[self.pairs.rows])
        overflow = (self.dropped_max > floor).nonzero().squeeze(1)
        if overflow.numel():
            pairs = pairs.select(~torch.isin(pairs.rows, overflow))
            recomputed = _all_candidates(x_n[overflow], weight, floor[overflow], overflow, self.settings)
            pairs = CandidatePairs.cat([pairs, recomputed])
        return pairs, overflow


def _all_candidates(
    x_n: torch.Tensor, weight: torch.Tensor, floor: torch.Tensor, row_ids: torch.Tensor, settings: HeadSettings
) -> CandidatePairs:
    """Every class of the shard above ``floor`` for a few rows, without a capacity (the exact fallback)."""
    parts = []
    for start in range(0, weight.shape[0], settings.chunk_size):
        theta = chunk_logits(x_n, weight, start, start + settings.chunk_size, settings.scale)
        rows, cols = (theta > floor.unsqueeze(1)).nonzero(as_tuple=True)
        parts.append(CandidatePairs(row_ids[rows], cols + (settings.class_offset + start), theta[rows, cols]))
    return CandidatePairs.cat(parts)


def stream_candidates(
    x_n: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, log_q_target: torch.Tensor, settings: HeadSettings
) -> CandidateStream:
    """One pass over the prototypes of this shard, chunk by chunk: the only ``B x C`` work of a step."""
    stream = CandidateStream(labels, log_q_target, settings, x_n.dtype)
    for start in range(0, weight.shape[0], settings.chunk_size):
        stream.add_chunk(chunk_logits(x_n, weight, start, start + settings.chunk_size, settings.scale), start)
    return stream
