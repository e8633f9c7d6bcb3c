"""Running statistics of a training epoch, from the heads' per-batch :class:`PosteriorStats`."""

from __future__ import annotations

import json

from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from qmargin_spk.losses.stats import PosteriorStats
from qmargin_spk.utils.atomic import atomic_write_text


@register_checkpoint_hooks
class EpochStatistics:
    """Batch-averaged posterior statistics, the largest support, overflowing rows and accuracy of an epoch.

    Checkpointed (as JSON), so an epoch resumed from an intra-epoch checkpoint reports all its batches.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self.batches = 0
        self.samples = 0
        self.sums = {"support_mean": 0.0, "p_target_mean": 0.0, "p_target_zero_frac": 0.0}
        self.support_max = 0.0
        self.overflow_rows = 0
        self.correct: int | None = None

    def add(self, stats: PosteriorStats) -> None:
        """Count one batch."""
        self.batches += 1
        self.samples += stats.batch_size
        for key in self.sums:
            self.sums[key] += getattr(stats, key)
        self.support_max = max(self.support_max, stats.support_max)
        self.overflow_rows += stats.overflow_rows
        if stats.correct is not None:
            self.correct = (self.correct or 0) + stats.correct

    def summary(self) -> dict[str, float]:
        """Per-batch means, ``support_max``, ``overflow_rows`` and, where the head reports it, ``accuracy``."""
        batches = max(self.batches, 1)
        summary = {key: total / batches for key, total in self.sums.items()}
        summary["support_max"] = self.support_max
        summary["overflow_rows"] = self.overflow_rows
        if self.correct is not None and self.samples:
            summary["accuracy"] = self.correct / self.samples
        return summary

    @mark_as_saver
    def save(self, path) -> None:
        atomic_write_text(path, json.dumps(vars(self)))

    @mark_as_loader
    def load(self, path, end_of_epoch=False) -> None:
        with open(path, encoding="utf-8") as handle:
            vars(self).update(json.load(handle))
