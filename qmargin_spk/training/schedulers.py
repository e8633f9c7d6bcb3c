"""Step-wise learning-rate and epoch-wise margin schedules, both checkpointable.

LR: linear warm-up to the peak, then exponential decay to a final value (WeSpeaker-style, the
Q-Margin paper's speaker schedule). The peak is ``base_lr * global_batch / reference_batch``,
so changing the number of processes or the batch size rescales it.
"""

from __future__ import annotations

import logging
import math

import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

logger = logging.getLogger(__name__)


@register_checkpoint_hooks
class WarmupExponentialLR:
    """LR at optimizer step ``n``: linear warm-up over ``warmup_epochs``, then exponential decay to ``final_lr``.

    A warm-up longer than the run (e.g. ``--number_of_epochs=1`` with a 2-epoch warm-up) is
    shortened to the whole run, with a warning naming both hparams keys.
    """

    def __init__(
        self, base_lr: float, final_lr: float, warmup_epochs: float, total_epochs: int, reference_batch: int = 256
    ) -> None:
        if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
            raise ValueError(f"hparams key 'number_of_epochs' must be an integer >= 1, got {total_epochs!r}")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float)) or warmup_epochs < 0:
            raise ValueError(f"hparams key 'warmup_epochs' must be a number >= 0, got {warmup_epochs!r}")
        if warmup_epochs > total_epochs:
            logger.warning(
                "warmup_epochs (%s) exceeds number_of_epochs (%s): warming up over the whole run",
                warmup_epochs,
                total_epochs,
            )
            warmup_epochs = total_epochs
        self.base_lr = base_lr
        self.final_lr = final_lr
        self.warmup_epochs = warmup_epochs
        self.total_epochs = total_epochs
        self.reference_batch = reference_batch
        self.global_batch = reference_batch
        self.steps_per_epoch = 1
        self.step_count = 0

    def configure(self, global_batch: int, steps_per_epoch: int) -> None:
        """Set what only the training script knows: the global batch and the number of steps per epoch."""
        self.global_batch = global_batch
        self.steps_per_epoch = max(1, steps_per_epoch)

    @property
    def peak_lr(self) -> float:
        return self.base_lr * self.global_batch / self.reference_batch

    def lr_at(self, step: int) -> float:
        """Learning rate after ``step`` optimizer steps."""
        epoch = step / self.steps_per_epoch
        peak = self.peak_lr
        if epoch < self.warmup_epochs:
            return peak * epoch / self.warmup_epochs
        decay_epochs = max(self.total_epochs - self.warmup_epochs, 1e-9)
        progress = min((epoch - self.warmup_epochs) / decay_epochs, 1.0)
        final = min(self.final_lr, peak)
        return peak * math.exp(progress * math.log(final / peak))

    def step(self, *optimizers: torch.optim.Optimizer) -> float:
        """Advance one optimizer step and write the new LR into every one of ``optimizers``."""
        self.step_count += 1
        lr = self.lr_at(self.step_count)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        return lr

    @mark_as_saver
    def save(self, path) -> None:
        torch.save({"step_count": self.step_count}, path)

    @mark_as_loader
    def load(self, path, end_of_epoch=False) -> None:
        self.step_count = torch.load(path, weights_only=True)["step_count"]


class MarginRamp:
    """Margin per epoch: ``initial`` until ``start_epoch``, linear to ``final`` at ``end_epoch``, then ``final``.

    Stateless (a function of the epoch), so resuming needs nothing beyond the epoch counter.
    """

    def __init__(self, final: float, initial: float = 0.0, start_epoch: int = 0, end_epoch: int = 0) -> None:
        self.initial = initial
        self.final = final
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch

    def __call__(self, epoch: int) -> float:
        if epoch >= self.end_epoch:
            return self.final
        if epoch < self.start_epoch:
            return self.initial
        frac = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        return self.initial + frac * (self.final - self.initial)
