"""Schedules and checkpoint plumbing of the training stage."""

import math
import random

import numpy as np
import pytest
import torch
from speechbrain.utils.checkpoints import average_checkpoints, mark_as_loader, mark_as_saver, register_checkpoint_hooks

from qmargin_spk.stages.experiment import last_checkpoints
from qmargin_spk.training.checkpointing import AtomicCheckpointer, RNGState
from qmargin_spk.training.schedulers import MarginRamp, WarmupExponentialLR


def test_warmup_then_exponential_decay_scaled_with_global_batch():
    schedule = WarmupExponentialLR(base_lr=0.1, final_lr=5e-5, warmup_epochs=6, total_epochs=150, reference_batch=128)
    schedule.configure(global_batch=512, steps_per_epoch=100)
    peak = 0.1 * 512 / 128
    assert schedule.lr_at(0) == 0.0
    assert schedule.lr_at(300) == pytest.approx(peak / 2)  # half-way through warm-up
    assert schedule.lr_at(600) == pytest.approx(peak)
    assert schedule.lr_at(15000) == pytest.approx(5e-5)
    # Exponential: the log-LR is linear in the epoch after warm-up.
    middle = 600 + (15000 - 600) // 2
    assert math.log(schedule.lr_at(middle)) == pytest.approx(0.5 * (math.log(peak) + math.log(5e-5)))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert schedule.step(optimizer) == optimizer.param_groups[0]["lr"] == pytest.approx(peak / 600)


def test_warmup_longer_than_the_run_is_clamped_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        schedule = WarmupExponentialLR(base_lr=0.2, final_lr=0.002, warmup_epochs=2, total_epochs=1)
    assert "warmup_epochs (2) exceeds number_of_epochs (1)" in caplog.text
    schedule.configure(global_batch=256, steps_per_epoch=10)
    assert schedule.lr_at(5) == pytest.approx(0.1)  # half of the single warm-up epoch
    assert schedule.lr_at(10) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="'number_of_epochs' must be an integer >= 1, got 0"):
        WarmupExponentialLR(base_lr=0.2, final_lr=0.002, warmup_epochs=1, total_epochs=0)


def test_margin_ramp():
    ramp = MarginRamp(final=0.2, initial=0.0, start_epoch=20, end_epoch=40)
    assert [ramp(e) for e in (1, 20, 30, 40, 100)] == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.2])
    assert MarginRamp(final=0.3)(1) == 0.3


@register_checkpoint_hooks
class _FailingSaver:
    @mark_as_saver
    def save(self, path):
        with open(path, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        raise AssertionError("never loaded")


def test_interrupted_save_leaves_no_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 3)
    good = AtomicCheckpointer(tmp_path, recoverables={"model": model})
    good.save_checkpoint(meta={"n": 1})
    broken = AtomicCheckpointer(tmp_path, recoverables={"model": model, "bad": _FailingSaver()})
    with pytest.raises(OSError):
        broken.save_checkpoint(meta={"n": 2})
    checkpoints = good.find_checkpoints(max_num_checkpoints=None)
    assert [c.meta["n"] for c in checkpoints] == [1]
    assert any(p.name.startswith(".partial-") for p in tmp_path.iterdir())
    restarted = AtomicCheckpointer(tmp_path, recoverables={"model": model})
    assert any(p.name.startswith(".partial-") for p in tmp_path.iterdir())  # merely loading cleans nothing
    restarted.claim()  # a restarted training run, owner of the folder, cleans up
    restarted.release()
    assert not any(p.name.startswith(".partial-") for p in tmp_path.iterdir())


def test_rng_state_round_trip(tmp_path):
    checkpointer = AtomicCheckpointer(tmp_path, recoverables={"rng": RNGState()})
    checkpointer.save_checkpoint()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpointer.recover_if_possible()
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_average_of_the_last_checkpoints(tmp_path):
    model = torch.nn.Linear(2, 2)
    checkpointer = AtomicCheckpointer(tmp_path, recoverables={"model": model})
    weights = []
    for step in range(3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        weights.append(model.weight.detach().clone())
        checkpointer.save_checkpoint(meta={"unixtime": float(step)}, name=f"e{step}")
    averaged = average_checkpoints(last_checkpoints(checkpointer, 2), "model")["weight"]
    torch.testing.assert_close(averaged, (weights[1] + weights[2]) / 2)
