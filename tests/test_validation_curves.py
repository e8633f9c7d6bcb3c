"""Validation during training: stage 1's held-out split, the per-epoch metrics, the best checkpoints, the curves."""

from __future__ import annotations

import csv
import hashlib
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from speechbrain.utils.checkpoints import Checkpointer

from conftest import REPO, stage_script
from qmargin_spk.data.audio import load_audio
from qmargin_spk.data.manifest import read_manifest
from qmargin_spk.data.trials import read_trial_list
from qmargin_spk.data.validation_split import ValidationSplitError, split_validation
from qmargin_spk.metrics import compute_metrics
from qmargin_spk.stages.experiment import read_record
from qmargin_spk.stages.prepare import prepare_stage
from qmargin_spk.training.learning_curves import plot_available, plot_learning_curves, read_curve, write_curve_row
from qmargin_spk.training.validation import best_valid_checkpoints, retention

FAST = {
    "number_of_epochs": 2,
    "warmup_epochs": 1,
    "batch_size": 8,
    "channels": 16,
    "embedding_dim": 16,
    "num_workers": 0,
    "num_threads": 1,  # a loaded 2-core machine: two intra-op threads can be many times slower
}


def prepare_with_validation(corpus, folder: Path, **validation) -> dict:
    return prepare_stage([corpus.train_root], corpus.test_root, [corpus.trials], folder, num_workers=1, **validation)


def speakers_of(manifest: Path) -> set[str]:
    return {row.spk_id for row in read_manifest(manifest)}


def test_valid_speakers_are_held_out_and_the_same_for_the_same_data_seed(corpus, tmp_path):
    first = prepare_with_validation(corpus, tmp_path / "a", valid_speakers=2, data_seed=0)["validation"]
    prepare_with_validation(corpus, tmp_path / "b", valid_speakers=2, data_seed=0)
    every = sorted(speakers_of(tmp_path / "a" / "train_full.csv"))
    assert len(every) == 8
    # The documented rule, written out: the N speakers with the smallest SHA-256 of "<seed>\0<speaker>".
    expected = sorted(sorted(every, key=lambda s: hashlib.sha256(f"0\0{s}".encode()).hexdigest())[:2])
    for folder in (tmp_path / "a", tmp_path / "b"):
        assert (folder / "valid_speakers.txt").read_text().split() == expected
        assert speakers_of(folder / "train.csv") == set(every) - set(expected)
        assert speakers_of(folder / "valid.csv") == set(expected)
    assert (tmp_path / "a" / "valid_trials.txt").read_bytes() == (tmp_path / "b" / "valid_trials.txt").read_bytes()
    # Every pair of the validation utterances is a trial; a target pairs one speaker's utterances across videos.
    trials = read_trial_list(tmp_path / "a" / "valid_trials.txt")
    ids = sorted(row.id for row in read_manifest(tmp_path / "a" / "valid.csv"))
    pairs = {tuple(sorted((a.removesuffix(".wav"), b.removesuffix(".wav")))) for a, b in zip(trials.enrol, trials.test)}

    def same_video(a: str, b: str) -> bool:
        return a.split("/")[:2] == b.split("/")[:2]

    cross_video = {(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :] if not same_video(a, b)}
    assert pairs == cross_video and len(trials) == len(cross_video)
    for label, enrol, test in zip(trials.labels, trials.enrol, trials.test):
        assert label == (enrol.split("/")[0] == test.split("/")[0])
    assert first["valid_target_trials"] == int(trials.labels.sum()) > 0 and first["valid_nontarget_trials"] > 0

    # Idempotent: a second prepare of the same folder reuses the split and rewrites nothing.
    before = {path.name: path.read_bytes() for path in (tmp_path / "a").iterdir()}
    again = prepare_with_validation(corpus, tmp_path / "a", valid_speakers=2, data_seed=0)["validation"]
    assert again["reused"] and {path.name: path.read_bytes() for path in (tmp_path / "a").iterdir()} == before
    # Another data_seed draws from the full manifest again (not from the reduced train.csv) ...
    draws = set()
    for seed in (1, 2, 3):
        prepare_with_validation(corpus, tmp_path / "a", valid_speakers=2, data_seed=seed)
        drawn = (tmp_path / "a" / "valid_speakers.txt").read_text().split()
        assert speakers_of(tmp_path / "a" / "train.csv") == set(every) - set(drawn)
        draws.add(tuple(drawn))
    assert len(draws | {tuple(expected)}) > 1
    # ... and no validation setting undoes the split: train.csv holds every speaker again.
    prepare_with_validation(corpus, tmp_path / "a")
    assert speakers_of(tmp_path / "a" / "train.csv") == set(every)
    assert not (tmp_path / "a" / "valid.csv").exists() and not (tmp_path / "a" / "valid_trials.txt").exists()


def test_a_test_list_is_refused_as_validation_list_and_a_training_side_list_is_held_out(corpus, tmp_path, capsys):
    prepare = stage_script("prepare")
    common = ["--train_root", str(corpus.train_root), "--test_root", str(corpus.test_root), "--num_workers", "1"]
    argv = [*common, "--trials", str(corpus.trials), "--out", str(tmp_path / "data")]
    assert prepare([*argv, "--valid_trials", str(corpus.trials)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is the test list" in error
    copy = tmp_path / "copy_of_test.txt"
    copy.write_bytes(corpus.trials.read_bytes())
    assert prepare([*argv, "--valid_trials", str(copy)]) == 1
    assert "is the test list" in capsys.readouterr().err
    with pytest.raises(ValidationSplitError, match="validation root is the test root"):
        split_validation(tmp_path / "data", trial_file=copy, valid_root=corpus.test_root, test_root=corpus.test_root)
    # A hand-made list over two training speakers: they leave train.csv.
    rows = read_manifest(tmp_path / "data" / "train_full.csv")
    a, b = sorted({row.spk_id for row in rows})[:2]
    first = [row.id for row in rows if row.spk_id == a][:2]
    other = [row.id for row in rows if row.spk_id == b][0]
    given = tmp_path / "valid.txt"
    given.write_text(f"1 {first[0]}.wav {first[1]}.wav\n0 {first[0]}.wav {other}.wav\n")
    assert prepare([*argv, "--valid_trials", str(given)]) == 0
    assert speakers_of(tmp_path / "data" / "train.csv") == {row.spk_id for row in rows} - {a, b}
    assert (tmp_path / "data" / "valid_speakers.txt").read_text().split() == [a, b]
    assert {row.id for row in read_manifest(tmp_path / "data" / "valid.csv")} == {*first, other}


def test_keep_best_valid_keeps_and_averages_the_best_checkpoints(tmp_path):
    checkpointer = Checkpointer(tmp_path, {"model": torch.nn.Linear(1, 1)})
    eers = [0.30, 0.10, 0.20, 0.40, None]  # the last epoch was not validated
    for epoch, eer in enumerate(eers, start=1):
        meta = {"epoch": epoch, **({} if eer is None else {"valid_eer": eer})}
        checkpointer.save_and_keep_only(meta=meta, **retention(2, keep_best_valid=True))
    kept = sorted(ckpt.meta["epoch"] for ckpt in checkpointer.find_checkpoints(max_num_checkpoints=None))
    assert kept == [2, 3, 4, 5]  # the 2 best (epochs 2, 3) and the 2 most recent (4, 5)
    assert [ckpt.meta["epoch"] for ckpt in best_valid_checkpoints(checkpointer, 2)] == [2, 3]  # oldest first
    assert [ckpt.meta["epoch"] for ckpt in best_valid_checkpoints(checkpointer, 1)] == [2]
    for epoch in range(6, 8):  # without keep_best_valid only recency counts
        checkpointer.save_and_keep_only(meta={"epoch": epoch, "valid_eer": 0.0}, **retention(2, keep_best_valid=False))
    assert sorted(ckpt.meta["epoch"] for ckpt in checkpointer.find_checkpoints(max_num_checkpoints=None)) == [6, 7]


def test_learning_curve_rows_replace_replayed_epochs_and_runs_overlay(tmp_path):
    curve = tmp_path / "a.csv"
    write_curve_row(curve, 1, 5.0, {"eer": 0.4, "min_dcf_0.01": 0.9})
    write_curve_row(curve, 2, 4.0, {})  # not validated
    write_curve_row(curve, 3, 3.0, {"eer": 0.3, "min_dcf_0.01": 0.8})
    write_curve_row(curve, 2, 3.9, {"eer": 1 / 3, "min_dcf_0.01": 0.85})  # a resumed run replays epoch 2
    rows = read_curve(curve)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[1] == {"epoch": 2, "train_loss": 3.9, "valid_eer": 1 / 3, "valid_min_dcf_0.01": 0.85}
    with open(curve, newline="") as handle:
        assert next(csv.reader(handle)) == ["epoch", "train_loss", "valid_eer", "valid_min_dcf_0.01"]
    loss_only = tmp_path / "b.csv"
    write_curve_row(loss_only, 1, 6.0, {})
    png = tmp_path / "overlay.png"
    drawn = plot_learning_curves({"qmargin": curve, "aam": loss_only}, png)
    assert drawn == plot_available()
    if drawn:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


OPENED: list[str] | None = None


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.path.abspath(os.fsdecode(args[0])))


@pytest.mark.e2e
def test_validation_metrics_per_epoch_match_an_independent_scoring_and_no_test_list_is_opened(corpus, tmp_path):
    global OPENED
    from qmargin_spk.stages.train import train_stage

    prepare_with_validation(corpus, tmp_path / "data", valid_speakers=2, data_seed=0)
    overrides = {"output_folder": str(tmp_path), **FAST, "keep_best_valid": True, "average_checkpoints": 1}
    if not getattr(_record_opens, "installed", False):
        sys.addaudithook(_record_opens)  # audit hooks cannot be removed: it records only while OPENED is a list
        _record_opens.installed = True
    OPENED = []
    try:
        brain = train_stage(tmp_path, REPO / "hparams" / "demo_cpu_qmargin.yaml", {"device": "cpu"}, None, overrides)
        opened = OPENED
    finally:
        OPENED = None
    test_data = [str(corpus.trials.resolve()), str((tmp_path / "data" / "test.csv").resolve())]
    assert str((tmp_path / "data" / "valid_trials.txt").resolve()) in opened  # the hook sees what training opens
    assert not [path for path in opened if path in test_data or path.startswith(str(corpus.test_root.resolve()))]

    log = (tmp_path / "train_log.txt").read_text().splitlines()
    curve = read_curve(tmp_path / "valid_curve.csv")
    assert [row["epoch"] for row in curve] == [1, 2] and len(log) == 2
    # Independent scoring: each epoch's checkpoint, each utterance embedded alone, float64 cosine, compute_metrics.
    manifest = {row.id: row.wav for row in read_manifest(tmp_path / "data" / "valid.csv")}
    trials = read_trial_list(tmp_path / "data" / "valid_trials.txt")
    embedder = brain.hparams.embedder.eval()
    checkpoints = {ckpt.meta["epoch"]: ckpt for ckpt in brain.checkpointer.find_checkpoints(max_num_checkpoints=None)}
    for row, line in zip(curve, log):
        state = torch.load(checkpoints[row["epoch"]].paramfiles["embedding_model"], weights_only=True)
        brain.hparams.embedding_model.load_state_dict(state)
        with torch.no_grad():
            vectors = {
                utt: embedder(load_audio(wav, 16000)[None], torch.ones(1)).reshape(-1).double().numpy()
                for utt, wav in manifest.items()
            }
        unit = {utt: vector / np.linalg.norm(vector) for utt, vector in vectors.items()}
        scores = [
            float(unit[e.removesuffix(".wav")] @ unit[t.removesuffix(".wav")])
            for e, t in zip(trials.enrol, trials.test)
        ]
        expected = compute_metrics(np.array(scores), trials.labels)
        assert row["valid_eer"] == pytest.approx(expected.eer, abs=1e-9)
        assert row["valid_min_dcf_0.01"] == pytest.approx(expected.min_dcf_at(0.01).value, abs=1e-9)
        assert row["valid_min_dcf_0.05"] == pytest.approx(expected.min_dcf_at(0.05).value, abs=1e-9)
        logged = float(re.search(r"valid eer: ([0-9.e+-]+)", line).group(1))
        assert logged == pytest.approx(expected.eer, rel=1e-5)
        assert checkpoints[row["epoch"]].meta["valid_eer"] == row["valid_eer"]
    if plot_available():
        assert (tmp_path / "valid_curve.png").read_bytes()[:4] == b"\x89PNG"
    # Validating leaves the training run as it was: generators restored, the embedder back in training mode.
    embedder.train()
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    brain.validation.score(embedder)
    assert embedder.training and random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all() and torch.equal(torch.get_rng_state(), states[2])
    # keep_best_valid: the stages average the best-validation checkpoint, not the last one.
    (chosen,) = read_record(tmp_path).last_checkpoints()
    assert chosen.meta["valid_eer"] == min(row["valid_eer"] for row in curve)
