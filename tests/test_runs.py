"""Runs across restarts and how stages end: what a resume may change, starting afresh, the epoch log after a
resume, and one line naming the file when an error lists many files or the disk is full."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from conftest import fill_the_disk, stage_script, write_leftovers
from qmargin_spk.stages.experiment import StageError
from qmargin_spk.stages.train import train_stage

REPO = Path(__file__).resolve().parents[1]
HPARAMS = str(REPO / "hparams" / "demo_cpu_qmargin.yaml")
RUN_OPTS = {"device": "cpu", "noprogressbar": True}
TINY = {"batch_size": 8, "channels": 16, "embedding_dim": 16, "num_workers": 0, "warmup_epochs": 1}


@pytest.fixture(scope="module")
def whole(trained, tmp_path_factory) -> Path:
    """The same experiment trained for two epochs without a stop."""
    exp = tmp_path_factory.mktemp("whole") / "exp"
    shutil.copytree(trained / "data", exp / "data")
    train_stage(exp, HPARAMS, RUN_OPTS, None, {**TINY, "number_of_epochs": 2})
    return exp


@pytest.fixture()
def run(trained, tmp_path) -> Path:
    """A private copy of the finished one-epoch run."""
    return Path(shutil.copytree(trained, tmp_path / "exp"))


# --- what a resume may change ---------------------------------------------------------------------


@pytest.mark.e2e
def test_training_a_finished_run_again_with_other_model_settings_is_refused_naming_each_and_keeps_its_record(run):
    changes = {
        "channels": 32,  # backbone fragment
        "margin": 0.3,  # loss fragment
        "n_mels": 40,  # features
        "speed_factors": [0.9, 1.0],
        "batch_size": 4,  # per process
    }
    record = (run / "hyperparams.yaml").read_bytes()
    with pytest.raises(StageError) as refused:
        train_stage(run, HPARAMS, RUN_OPTS, None, {**TINY, "number_of_epochs": 2, **changes})
    message = str(refused.value)
    for named in (
        "channels: 16 in the record, 32 from training again",
        "margin: 0.2 in the record, 0.3 from training again",
        "n_mels: 80 in the record, 40 from training again",
        "speed_factors: [1.0] in the record, [0.9, 1.0] from training again",
        "batch_size: 8 in the record, 4 from training again",
        "--start_afresh",
    ):
        assert named in message
    assert (run / "hyperparams.yaml").read_bytes() == record
    assert len((run / "train_log.txt").read_text().splitlines()) == 1  # nothing trained


@pytest.mark.e2e
def test_a_resume_on_a_training_manifest_changed_in_place_is_refused(run):
    manifest = run / "data" / "train.csv"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:-1]))  # one utterance fewer
    record = (run / "hyperparams.yaml").read_bytes()
    with pytest.raises(StageError, match=r"training data: .*train\.csv had SHA-256 \w+\.\.\. when training started"):
        train_stage(run, HPARAMS, RUN_OPTS, None, {**TINY, "number_of_epochs": 2})
    assert (run / "hyperparams.yaml").read_bytes() == record


@pytest.mark.e2e
def test_running_a_finished_run_again_may_change_loader_checkpoint_and_scoring_keys_and_rewrites_the_record(run):
    import torch

    allowed = {"num_workers": 1, "num_threads": torch.get_num_threads(), "keep_checkpoints": 2}
    allowed |= {"score_backend": "asnorm", "extract_batch_size": 4}
    train_stage(run, HPARAMS, {**RUN_OPTS, "ckpt_interval_steps": 4}, None, {**TINY, "number_of_epochs": 1, **allowed})
    record = (run / "hyperparams.yaml").read_text()
    for line in ("num_workers: 1", "keep_checkpoints: 2", "score_backend: asnorm", "extract_batch_size: 4"):
        assert f"\n{line}" in record
    assert len((run / "train_log.txt").read_text().splitlines()) == 1  # nothing trained
    assert not write_leftovers(run)


@pytest.mark.e2e
def test_a_resume_may_not_lower_number_of_epochs_below_those_trained(whole, tmp_path):
    exp = Path(shutil.copytree(whole, tmp_path / "exp"))
    record = (exp / "hyperparams.yaml").read_bytes()
    with pytest.raises(StageError, match="holds 2 trained epochs, more than number_of_epochs=1.*--start_afresh"):
        train_stage(exp, HPARAMS, RUN_OPTS, None, {**TINY, "number_of_epochs": 1})
    assert (exp / "hyperparams.yaml").read_bytes() == record


@pytest.mark.e2e
def test_start_afresh_moves_the_previous_run_aside_and_trains_the_new_settings(run, capsys):
    train = stage_script("train")
    argv = [HPARAMS, "--exp", str(run), "--device=cpu", "--noprogressbar", "--number_of_epochs=1"]
    argv += ["--channels=16", "--embedding_dim=16", "--num_workers=0", "--warmup_epochs=1", "--batch_size=16"]
    record = (run / "hyperparams.yaml").read_bytes()
    assert train(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("train.py: error: ") and "batch_size: 8 in the record, 16" in line
    assert "--start_afresh" in line and (run / "hyperparams.yaml").read_bytes() == record

    assert train([*argv, "--start_afresh"]) == 0
    (previous,) = run.glob("previous-*")
    assert (previous / "hyperparams.yaml").read_bytes() == record
    assert list((previous / "save").glob("CKPT+*")) and (previous / "train_log.txt").is_file()
    assert "\nbatch_size: 16" in (run / "hyperparams.yaml").read_text()
    assert len(list((run / "save").glob("CKPT+*"))) == 1


# --- the epoch log after a resume -----------------------------------------------------------------


@pytest.mark.e2e
def test_the_epoch_after_an_end_of_epoch_resume_logs_its_own_loss_and_statistics(run, whole):
    train_stage(run, HPARAMS, RUN_OPTS, None, {**TINY, "number_of_epochs": 2})  # a resume may raise the epochs
    assert "\nnumber_of_epochs: 2" in (run / "hyperparams.yaml").read_text()
    resumed = (run / "train_log.txt").read_text().splitlines()
    uninterrupted = (whole / "train_log.txt").read_text().splitlines()
    assert resumed[1].split(", ")[0] == uninterrupted[1].split(", ")[0]  # "epoch: 2 - train loss: ..."
    assert resumed == uninterrupted  # LR, margin and the head's statistics too


# --- one line naming the file ---------------------------------------------------------------------


@pytest.mark.e2e
def test_a_stage_error_listing_missing_trial_files_names_the_first_with_its_list_line(run, corpus, capsys):
    trials = run / "trials.txt"
    trials.write_text("1 a/1.wav a/2.wav\n0 a/1.wav b/9.wav\n")
    argv = ["--exp", str(run), "--test_root", str(corpus.test_root), "--trials", str(trials), "--device=cpu"]
    assert stage_script("score")(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("score.py: error: 3 of 3 utterances in the trial lists are missing under ")
    assert line.endswith(f"{trials}:1: a/1.wav (and 2 more)")


@pytest.mark.e2e
@pytest.mark.parametrize("part", [".pt", ".scores"])  # the embedding cache, a score file (results: test_cli.py)
def test_a_full_disk_in_stage_3_is_one_line_naming_the_file_not_written(run, corpus, capsys, monkeypatch, part):
    lines = corpus.trials.read_text().splitlines()
    trials = run / "few.txt"  # one target and one non-target trial: little to embed
    trials.write_text("\n".join(next(line for line in lines if line[0] == label) for label in "10") + "\n")
    fill_the_disk(monkeypatch, part)
    argv = ["--exp", str(run), "--test_root", str(corpus.test_root), "--trials", str(trials), "--device=cpu"]
    assert stage_script("score")([*argv, "--bootstrap_resamples=0"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"score.py: error: {run / 'scores'}/") and part in line.split(": ")[2]
    assert line.endswith(": not written (No space left on device)")
    assert not write_leftovers(run)


@pytest.mark.e2e
def test_a_full_disk_in_stage_4_is_one_line_naming_the_model_folder(run, capsys, monkeypatch):
    def full_disk(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert stage_script("package")(["--exp", str(run)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"package.py: error: {run / 'model'}: not written (No space left on device)"
    assert not (run / "model").exists() and not write_leftovers(run)
