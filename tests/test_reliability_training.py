"""Training runs that go wrong (too few steps, crafted checkpoints, busy save folders, bad keys), kept fixed."""

import errno
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from qmargin_spk.data.prepare import prepare
from qmargin_spk.losses import QMarginLoss, SparseQMarginHead
from qmargin_spk.stages.experiment import Experiment, StageError
from qmargin_spk.stages.train import choose_threads, steps_per_epoch, train_stage
from qmargin_spk.training import checkpointing
from qmargin_spk.training.brain import SpeakerBrain
from qmargin_spk.training.checkpointing import AtomicCheckpointer, RNGState, SaveFolderBusyError
from qmargin_spk.training.epoch_log import EpochLog

REPO = Path(__file__).resolve().parents[1]
HPARAMS = str(REPO / "hparams" / "demo_cpu_qmargin.yaml")
RUN_OPTS = {"device": "cpu", "noprogressbar": True}


@pytest.fixture(scope="module")
def data_folder(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare([corpus.train_root], corpus.test_root, [corpus.trials], out, num_workers=1)
    return out


def overrides(data_folder, exp, **extra):
    return {
        "output_folder": str(exp),
        "data_folder": str(data_folder),
        "batch_size": 8,
        "channels": 16,
        "embedding_dim": 16,
        "num_workers": 0,
        "number_of_epochs": 2,
        "warmup_epochs": 1,
        **extra,
    }


# --- a run that would train nothing ---------------------------------------------------------------


@pytest.mark.e2e
def test_batch_larger_than_the_data_is_an_error_before_training(data_folder, tmp_path):
    with pytest.raises(StageError, match="batch_size 1000 x 1 processes exceeds the 48 training utterances"):
        train_stage(
            tmp_path / "exp", HPARAMS, RUN_OPTS, None, overrides(data_folder, tmp_path / "exp", batch_size=1000)
        )
    assert not list((tmp_path / "exp" / "save").glob("CKPT+*"))
    with pytest.raises(StageError, match="2 processes"):
        steps_per_epoch(48, 32, 2)


def test_an_epoch_of_few_optimiser_steps_warns(caplog):
    with caplog.at_level("WARNING"):
        assert steps_per_epoch(48, 8, 1) == 6
    assert "only 6 optimiser steps" in caplog.text


# --- no pickle on resume --------------------------------------------------------------------------


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + str(Path(os.environ["EXPLOIT_TARGET"])),))


def test_crafted_rng_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    target = tmp_path / "exploited"
    monkeypatch.setenv("EXPLOIT_TARGET", str(target))
    path = tmp_path / "rng_state.ckpt"
    torch.save({"python": _Exploit()}, path)
    with pytest.raises(pickle.UnpicklingError):
        RNGState().load(path)
    assert not target.exists()


def test_rng_state_round_trips_as_plain_tensors(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    RNGState().save(tmp_path / "rng.ckpt")
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    RNGState().load(tmp_path / "rng.ckpt")
    assert random.random() == expected[0] and np.random.standard_normal() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])
    torch.load(tmp_path / "rng.ckpt", weights_only=True)  # plain tensors only


# --- only the owner cleans the save folder --------------------------------------------------------


def test_loading_an_experiment_keeps_a_save_in_progress(data_folder, tmp_path):
    partial = tmp_path / "exp" / "save" / ".partial-CKPT+2026"
    partial.mkdir(parents=True)
    (partial / "CKPT.yaml").write_text("end-of-epoch: true\n")
    hparams = Experiment.for_training(tmp_path / "exp", HPARAMS, None, overrides(data_folder, tmp_path / "exp")).hparams
    assert "checkpointer" in hparams  # loaded, as every stage loads it
    assert (partial / "CKPT.yaml").is_file()


def test_one_owner_cleans_the_save_folder_and_others_are_refused(tmp_path):
    partial = tmp_path / ".partial-CKPT+x"
    partial.mkdir()
    owner, intruder = AtomicCheckpointer(tmp_path), AtomicCheckpointer(tmp_path)
    owner.claim()
    assert not partial.exists()
    with pytest.raises(SaveFolderBusyError, match="in use by another training run"):
        intruder.claim()
    owner.release()
    intruder.claim()
    intruder.release()


# --- mid-epoch resume is the uninterrupted run ----------------------------------------------------


class _Interrupt(Exception):
    pass


@pytest.mark.e2e
def test_interrupted_and_resumed_training_equals_uninterrupted(data_folder, tmp_path, monkeypatch):
    run_opts = {**RUN_OPTS, "ckpt_interval_steps": 2}
    whole = train_stage(tmp_path / "whole", HPARAMS, run_opts, None, overrides(data_folder, tmp_path / "whole"))
    original = SpeakerBrain.fit_batch

    def interrupted(self, batch):
        if self.hparams.lr_scheduler.step_count == 3:  # inside epoch 1, after the intra-epoch checkpoint of step 2
            raise _Interrupt
        return original(self, batch)

    monkeypatch.setattr(SpeakerBrain, "fit_batch", interrupted)
    with pytest.raises(_Interrupt):
        train_stage(tmp_path / "resumed", HPARAMS, run_opts, None, overrides(data_folder, tmp_path / "resumed"))
    monkeypatch.setattr(SpeakerBrain, "fit_batch", original)
    resumed = train_stage(tmp_path / "resumed", HPARAMS, run_opts, None, overrides(data_folder, tmp_path / "resumed"))
    for name in ("embedder", "classifier"):
        for key, value in whole.modules[name].state_dict().items():
            assert torch.equal(value, resumed.modules[name].state_dict()[key]), f"{name}.{key} differs"
    # The epoch statistics count every batch of the resumed epoch: the logs are identical.
    assert (tmp_path / "whole" / "train_log.txt").read_text() == (tmp_path / "resumed" / "train_log.txt").read_text()


def test_relogging_an_epoch_replaces_its_line(tmp_path):
    log = EpochLog(tmp_path / "train_log.txt")
    log.log_stats({"epoch": 1}, {"loss": 2.0})
    log.log_stats({"epoch": 2}, {"loss": 1.5})
    log.log_stats({"epoch": 2}, {"loss": 1.25})  # epoch 2 replayed after a kill between logging and saving
    lines = (tmp_path / "train_log.txt").read_text().splitlines()
    assert lines == ["epoch: 1 - train loss: 2", "epoch: 2 - train loss: 1.25"]


# --- bad settings and failing writes (training side) and threads ----------------------------------


@pytest.mark.e2e
def test_non_numeric_hparam_error_names_its_key(data_folder, tmp_path):
    with pytest.raises(StageError, match="'number_of_epochs' must be an integer >= 1, got 'abc'"):
        train_stage(
            tmp_path / "exp", HPARAMS, RUN_OPTS, None, overrides(data_folder, tmp_path / "exp", number_of_epochs="abc")
        )


@pytest.mark.e2e
def test_zero_crop_seconds_is_refused_before_training_starts(data_folder, tmp_path):
    exp = tmp_path / "exp"
    with pytest.raises(StageError, match=r"^hparams key 'crop_seconds' must be a number > 0, got 0$"):
        train_stage(exp, HPARAMS, RUN_OPTS, None, overrides(data_folder, exp, crop_seconds=0))
    assert not (exp / "hyperparams.yaml").exists() and not list((exp / "save").glob("*"))


@pytest.fixture(scope="module")
def demo_hparams():
    from qmargin_spk.stages.experiment import composed_hparams

    return composed_hparams(HPARAMS, overrides={"channels": 16, "embedding_dim": 16})


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("crop_seconds", 0, "a number > 0"),
        ("crop_seconds", None, "a number > 0"),
        ("crop_seconds", float("nan"), "a number > 0"),
        ("lm_crop_seconds", -1.0, "a number > 0"),
        ("extract_chunk_seconds", 0.0, "null or a number > 0"),
        ("extract_max_batch_seconds", 0, "a number > 0"),
        ("extract_batch_size", 0, "an integer >= 1"),
        ("extract_batch_size", 2.5, "an integer >= 1"),
        ("cohort_utts_per_speaker", 0, "an integer >= 1"),
        ("asnorm_top_n", 1, "an integer >= 2"),
        ("bootstrap_resamples", -1, "an integer >= 0"),
        ("shuffle_buffer", 0, "an integer >= 1"),
        ("average_checkpoints", 0, "an integer >= 1"),
        ("keep_checkpoints", 0, "an integer >= 1"),
        ("warmup_epochs", -0.5, "a number >= 0"),
        ("final_lr", 0, "a number > 0"),
        ("num_threads", 0, "null or an integer >= 1"),
        ("batch_size", True, "an integer >= 1"),
    ],
)
def test_each_duration_and_size_key_is_refused_naming_key_value_and_rule(demo_hparams, key, value, rule):
    from qmargin_spk.stages.numeric_hparams import check_numeric_hparams

    with pytest.raises(StageError) as caught:
        check_numeric_hparams({**demo_hparams, key: value})
    assert str(caught.value) == f"hparams key {key!r} must be {rule}, got {value!r}"


def test_zero_is_allowed_where_the_rule_is_not_strict_and_null_where_it_is_optional(demo_hparams):
    from qmargin_spk.stages.numeric_hparams import check_numeric_hparams

    allowed = {"warmup_epochs": 0, "bootstrap_resamples": 0, "margin": 0.0, "num_workers": 0}
    check_numeric_hparams({**demo_hparams, **allowed, "extract_chunk_seconds": None, "num_threads": None})
    check_numeric_hparams({**demo_hparams, "extract_chunk_seconds": 1.5, "crop_seconds": 1e-3})


@pytest.mark.e2e
def test_scoring_stage_checks_its_keys_before_loading_the_model(data_folder, tmp_path):
    from qmargin_spk.stages.score import score_stage

    exp = tmp_path / "exp"
    Experiment.for_training(exp, HPARAMS, None, overrides(data_folder, exp)).write_record()  # no checkpoint
    for key, value, rule in [("extract_batch_size", 0, "an integer >= 1"), ("asnorm_top_n", 0, "an integer >= 2")]:
        with pytest.raises(StageError, match=rf"^hparams key '{key}' must be {rule}, got {value}$"):
            score_stage(exp, overrides={key: value}, device="cpu")
    with pytest.raises(StageError, match="no trained model"):  # with valid keys, the next problem is the model
        score_stage(exp, device="cpu")


def test_huge_alpha_is_a_clear_error():
    for make in (lambda: QMarginLoss(alpha=50.0), lambda: SparseQMarginHead(10, 4, alpha=50.0)):
        with pytest.raises(ValueError, match=r"alpha must lie in \[1, 10.0\], got 50.0"):
            make()
    # the largest allowed alpha still gives a finite loss at the paper's scale and margin
    cosines = torch.rand(4, 6) * 2 - 1
    assert torch.isfinite(QMarginLoss(alpha=10.0, scale=30.0, margin=0.2)(cosines, torch.arange(4)))


def test_full_disk_during_a_checkpoint_names_the_os_error(tmp_path, monkeypatch):
    checkpointer = AtomicCheckpointer(tmp_path, recoverables={"model": torch.nn.Linear(2, 2)})

    def full_disk(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 0})())
    with pytest.raises(OSError) as caught:
        checkpointer.save_checkpoint()
    assert caught.value.errno == errno.ENOSPC and "No space left on device" in str(caught.value)
    assert not list(tmp_path.glob("CKPT+*"))


def test_threads_follow_cores_processes_and_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert choose_threads(None, num_workers=1) == 3
    assert choose_threads(None, num_workers=8) == 1
    assert choose_threads(2, num_workers=8) == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert choose_threads(None, num_workers=0) == 8


@pytest.mark.e2e
def test_stage_logs_its_thread_choice(data_folder, tmp_path, capfd):
    train_stage(
        tmp_path / "exp",
        HPARAMS,
        RUN_OPTS,
        None,
        overrides(data_folder, tmp_path / "exp", number_of_epochs=1, num_threads=1),
    )
    assert torch.get_num_threads() == 1
    assert "; 1 threads per process" in "".join(capfd.readouterr())  # SpeechBrain's log handler writes to stdout
