"""A received model folder runs no code and is what it claims: hashes, identities, calibrations and thresholds."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEMO_HPARAMS, write_wav
from qmargin_spk.calibration import Calibration, bayes_threshold
from qmargin_spk.cli import main
from qmargin_spk.data.audio import load_audio
from qmargin_spk.inference import ModelFolderError, SpeakerModel, model_description, package_model, read_model_info
from qmargin_spk.inference.package import model_card
from qmargin_spk.metrics import compute_metrics
from qmargin_spk.models.identity import model_identity
from qmargin_spk.scoring import read_score_file
from qmargin_spk.stages.experiment import Experiment, StageError
from qmargin_spk.stages.package import package_stage
from qmargin_spk.stages.score import score_stage

REPO = Path(__file__).resolve().parents[1]
TRIALS = ["1 a/1.wav a/4.wav", "0 a/1.wav b/1.wav", "0 a/4.wav b/1.wav"]  # the short files of ``audio_dir``


class OpensAFile:
    """Unpickled without ``weights_only``, this creates ``path``: a stand-in for any code in a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture()
def folder(tiny_model, tmp_path):
    """A private copy of the tiny model folder."""
    return Path(shutil.copytree(tiny_model[0], tmp_path / "model"))


@pytest.fixture()
def trials(tmp_path):
    path = tmp_path / "mini.txt"
    path.write_text("\n".join(TRIALS) + "\n")
    return path


def run_cli(capsys, *argv):
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def edit_model_json(folder: Path, **changes) -> dict:
    """Set (value) or remove (None) keys of the folder's ``model.json``; returns the new content."""
    info = json.loads((folder / "model.json").read_text())
    info.update(changes)
    info = {key: value for key, value in info.items() if value is not None}
    (folder / "model.json").write_text(json.dumps(info))
    return info


def write_weights(folder: Path, weights) -> str:
    """Replace the folder's weights file; returns its SHA-256."""
    torch.save(weights, folder / "embedding_model.ckpt")
    return hashlib.sha256((folder / "embedding_model.ckpt").read_bytes()).hexdigest()


def perturbed(folder: Path) -> dict:
    weights = torch.load(folder / "embedding_model.ckpt", weights_only=True)
    return {key: value + 0.05 if value.is_floating_point() else value for key, value in weights.items()}


def cosine_entry(threshold: float, **extra) -> dict:
    """A cosine-scored result entry whose minDCF threshold at P = 0.01 is ``threshold``."""
    metrics = compute_metrics([0.1, 0.5, 0.2, 0.9], [0, 1, 0, 1], p_targets=(0.01,)).to_dict()
    metrics["min_dcf"]["0.01"]["threshold"] = threshold
    return {"list": "veri", "backend": "cosine", "n_trials": 4, "metrics": metrics, **extra}


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("qmargin-spk: error: ") and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- item 1: nothing in a folder runs


def test_a_poisoned_hyperparams_yaml_runs_nothing_through_the_loader_or_any_model_command(
    folder, audio_dir, trials, tmp_path, capsys
):
    from hyperpyyaml import load_hyperpyyaml

    marker = tmp_path / "PWNED"
    with open(folder / "hyperparams.yaml", "a", encoding="utf-8") as handle:
        handle.write(f'\npwned: !apply:os.system ["touch {marker}"]\n')
    a, b = audio_dir / "a/1.wav", audio_dir / "b/1.wav"
    SpeakerModel.from_folder(folder).embed(a)
    scores = tmp_path / "fit.scores"
    scores.write_text("".join(f"e{i} t{i} {0.1 * i} {int(i % 3 == 0)}\n" for i in range(12)))
    commands = [
        ["embed", "--model", folder, a, b, "--out", tmp_path / "e.npz"],
        ["verify", "--model", folder, a, b],
        ["score", "--model", folder, "--trials", trials, "--root", audio_dir, "--out", tmp_path / "s"],
        ["calibrate", "--model", folder, "--scores", scores],
        ["export", "--model", folder, "--format", "torchscript", "--out", tmp_path / "m.pt"],
    ]
    for command in commands:
        status, _, err = run_cli(capsys, *command)
        assert status == 0, err
        assert not marker.exists(), f"{command[0]} ran the folder's YAML"
    with open(folder / "hyperparams.yaml", encoding="utf-8") as handle:
        load_hyperpyyaml(handle)  # the oracle: evaluating the file does run the payload
    assert marker.exists()


def test_an_unknown_architecture_or_setting_in_model_json_is_one_error_naming_the_file(folder, capsys):
    info = read_model_info(folder)
    model_json = str(folder / "model.json")
    for backbone, message in (
        ({**info["backbone"], "architecture": "os.system"}, "unknown architecture 'os.system'"),
        ({**info["backbone"], "exec": "print(1)"}, "has no setting ['exec']"),
    ):
        edit_model_json(folder, backbone=backbone)
        with pytest.raises(ModelFolderError) as refused:
            SpeakerModel.from_folder(folder)
        assert str(refused.value).startswith(f"{model_json}: ") and message in str(refused.value)
        status, _, err = run_cli(capsys, "verify", "--model", folder, "a.wav", "b.wav")
        assert status == 1 and model_json in one_error_line(err) and message in err


def test_a_checkpoint_holding_python_objects_is_refused_without_running_them(folder, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    weights = torch.load(folder / "embedding_model.ckpt", weights_only=True)
    edit_model_json(folder, checkpoint_sha256=write_weights(folder, {**weights, "payload": OpensAFile(marker)}))
    with pytest.raises(ModelFolderError, match="embedding_model.ckpt: cannot load: not a weights-only checkpoint"):
        SpeakerModel.from_folder(folder)
    status, _, err = run_cli(capsys, "embed", "--model", folder, "x.wav", "--out", tmp_path / "e.npz")
    assert status == 1 and "not a weights-only checkpoint" in one_error_line(err)
    assert not marker.exists()
    torch.load(folder / "embedding_model.ckpt", weights_only=False)  # the oracle: a full unpickling runs it
    assert marker.exists()


# ---------------------------------------------------------------- item 2: the weights are what model.json says


def test_weights_that_differ_from_the_recorded_hash_or_identity_are_refused_naming_both(folder, capsys):
    info = read_model_info(folder)
    changed = perturbed(folder)
    new_hash = write_weights(folder, changed)
    with pytest.raises(ModelFolderError) as refused:
        SpeakerModel.from_folder(folder)
    assert new_hash in str(refused.value) and info["checkpoint_sha256"] in str(refused.value)
    status, _, err = run_cli(capsys, "verify", "--model", folder, "a.wav", "b.wav")
    assert status == 1 and new_hash in one_error_line(err)
    edit_model_json(folder, checkpoint_sha256=new_hash)  # the hash edited to match: the identity still differs
    with pytest.raises(ModelFolderError) as refused:
        SpeakerModel.from_folder(folder)
    assert info["model_identity"] in str(refused.value) and model_identity(changed) in str(refused.value)


def test_tampered_weights_do_not_reuse_the_embeddings_cached_for_the_old_weights(
    folder, audio_dir, trials, tmp_path, capsys
):
    out = tmp_path / "scores"
    assert run_cli(capsys, "score", "--model", folder, "--trials", trials, "--root", audio_dir, "--out", out)[0] == 0
    _, _, old, _ = read_score_file(out / "mini.cosine.scores")
    # Weights swapped, the hash edited to match and the claimed identity removed: the folder loads.
    edit_model_json(folder, checkpoint_sha256=write_weights(folder, perturbed(folder)), model_identity=None)
    assert run_cli(capsys, "score", "--model", folder, "--trials", trials, "--root", audio_dir, "--out", out)[0] == 0
    _, _, again, _ = read_score_file(out / "mini.cosine.scores")
    model = SpeakerModel.from_folder(folder)
    rows = {name: row for row, name in enumerate(("a/1.wav", "a/4.wav", "b/1.wav"))}
    embeddings = model.embed([audio_dir / name for name in rows])
    expected = [float(embeddings[rows[e]] @ embeddings[rows[t]]) for _, e, t in map(str.split, TRIALS)]
    np.testing.assert_allclose(again, expected, atol=1e-5)
    assert np.abs(again - old).max() > 1e-3


# ---------------------------------------------------------------- items 4 and 11: thresholds and calibrations


def test_verify_takes_stored_thresholds_only_from_results_of_this_model(tiny_model, audio_dir, tmp_path, capsys):
    source, embedder = tiny_model
    settings = model_description(read_model_info(source))
    weights = embedder.embedding_model.state_dict()
    a, b = audio_dir / "a/1.wav", audio_dir / "b/1.wav"
    score = SpeakerModel.from_folder(source).verify(a, b).score
    entry = cosine_entry(-1.0)
    other = package_model(tmp_path / "other", *settings, weights, {"results": [{**entry, "model_id": "f" * 64}]})
    result = SpeakerModel.from_folder(other).verify(a, b)
    assert result.decision is None and result.threshold is None and score > -1
    unnamed = package_model(tmp_path / "unnamed", *settings, weights, {"results": [entry]})
    with pytest.raises(ModelFolderError, match="results name no model.*re-run stage 4"):
        SpeakerModel.from_folder(unnamed).verify(a, b)
    status, _, err = run_cli(capsys, "verify", "--model", unnamed, a, b)
    assert status == 1 and str(unnamed / "model.json") in one_error_line(err)
    own = {**entry, "model_id": model_identity(weights)}
    named = package_model(tmp_path / "named", *settings, weights, {"results": [own, entry]})
    assert SpeakerModel.from_folder(named).verify(a, b).decision is True  # the score is above -1


def test_a_calibration_counts_only_for_the_model_it_names(folder, audio_dir, capsys):
    info = read_model_info(folder)
    a, b = audio_dir / "a/1.wav", audio_dir / "b/1.wav"

    def calibrated(**fit):
        Calibration(inputs=("score",), weights=(10.0,), offset=-2.0, prior=0.5, fit=fit).save(
            folder / "calibration.json"
        )
        return SpeakerModel.from_folder(folder)

    assert calibrated(model_identity=info["model_identity"]).calibration is not None
    assert calibrated(model_sha256=info["checkpoint_sha256"]).calibration is not None  # a folder made before
    for fit in (
        {},
        {"model_identity": "0" * 64, "model_sha256": info["checkpoint_sha256"]},
        {"model_sha256": "1" * 64},
    ):
        with pytest.raises(ModelFolderError, match="calibration.json was fitted for model .*recalibrate"):
            calibrated(**fit)
        for command in (["verify", "--model", folder, a, b], ["embed", "--model", folder, a, "--out", "x.npz"]):
            status, _, err = run_cli(capsys, *command)
            assert status == 1 and "recalibrate" in one_error_line(err)
    scores = folder.parent / "fit.scores"
    scores.write_text("".join(f"e{i} t{i} {0.1 * i} {int(i % 3 == 0)}\n" for i in range(12)))
    assert run_cli(capsys, "calibrate", "--model", folder, "--scores", scores)[0] == 0  # replaces the stray one
    assert SpeakerModel.from_folder(folder).verify(a, b).llr is not None
    stray = Calibration(inputs=("score",), weights=(1.0,), offset=0.0, prior=0.5, fit={"model_identity": "0" * 64})
    with pytest.raises(ModelFolderError, match="fitted for model 0+, not the packaged one"):
        package_model(folder.parent / "m2", *model_description(info), perturbed(folder), {}, calibration=stray)


# ---------------------------------------------------------------- SpeechBrain's threshold


def card_threshold(folder: Path, p_target: str) -> float:
    match = re.search(rf"^\| {re.escape(p_target)} \| (-?[0-9.]+) \|$", (folder / "README.md").read_text(), re.M)
    assert match, (folder / "README.md").read_text()
    return float(match.group(1))


def test_speechbrain_with_the_cards_threshold_decides_like_verify(tiny_model, tmp_path, monkeypatch):
    from speechbrain.inference.speaker import SpeakerRecognition

    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network access attempted"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, embedder = tiny_model
    settings, weights = model_description(read_model_info(source)), embedder.embedding_model.state_dict()
    files = [write_wav(tmp_path / f"{seed}.wav", 1.0, seed=seed) for seed in range(4)]  # equal lengths: one batch
    embeddings = SpeakerModel.from_folder(source).embed(files)
    pairs = [(i, j) for i in range(len(files)) for j in range(i + 1, len(files))]
    scores = np.array([float(embeddings[i] @ embeddings[j]) for i, j in pairs])
    ranked = np.sort(scores)
    gap = int(np.argmax(np.diff(ranked)[1:-1])) + 1  # the widest gap between scores, with pairs on each side
    middle, away = float(ranked[gap : gap + 2].mean()), float(np.diff(ranked)[gap] / 2)
    assert away > 1e-5
    entry = cosine_entry(middle, model_id=model_identity(weights))
    plain = package_model(tmp_path / "plain", *settings, weights, {"results": [entry]})
    slope = 20.0  # calibrated: LLR = slope * (score - middle) + Bayes threshold at P = 0.01
    calibration = Calibration(("score",), (slope,), bayes_threshold(0.01) - slope * middle, 0.5)
    calibrated = package_model(tmp_path / "calibrated", *settings, weights, {}, calibration=calibration)
    for name in ("hyperparams.yaml", "embedding_model.ckpt"):  # what SpeechBrain loads: the same in both folders
        assert (plain / name).read_bytes() == (calibrated / name).read_bytes()
    speechbrain = SpeakerRecognition.from_hparams(source=str(plain), savedir=str(tmp_path / "sb"))
    wavs = torch.stack([load_audio(path, 16000) for path in files])
    first, second = zip(*pairs)
    for folder in (plain, calibrated):
        threshold = card_threshold(folder, "0.01")
        assert threshold == pytest.approx(middle, abs=1e-6) and np.abs(scores - threshold).min() > away - 1e-6
        _, theirs = speechbrain.verify_batch(wavs[list(first)], wavs[list(second)], threshold=threshold)
        theirs = theirs.reshape(-1).tolist()
        ours = SpeakerModel.from_folder(folder)
        assert theirs == [ours.verify(files[i], files[j], p_target=0.01).decision for i, j in pairs]
        assert 0 < sum(theirs) < len(theirs)  # both decisions occur


def test_calibrating_rewrites_the_cards_speechbrain_thresholds(folder, tmp_path, capsys):
    assert "No threshold is known" in (folder / "README.md").read_text()
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = rng.normal(np.where(labels, 0.6, 0.1), 0.15)
    score_file = tmp_path / "fit.scores"
    score_file.write_text("".join(f"e{i} t{i} {float(s)!r} {int(y)}\n" for i, (s, y) in enumerate(zip(scores, labels))))
    assert run_cli(capsys, "calibrate", "--model", folder, "--scores", score_file)[0] == 0
    stored = json.loads((folder / "calibration.json").read_text())
    for p_target in (0.01, 0.05):
        expected = (bayes_threshold(p_target) - stored["offset"]) / stored["weights"][0]
        assert card_threshold(folder, f"{p_target:g}") == pytest.approx(expected, abs=1e-6)
    quality = Calibration(("score", "log_duration_enrol"), (1.0, 0.5), 0.0, 0.5, cohort={"file": "c.npy", "top_n": 3})
    assert "no single cosine threshold" in model_card(read_model_info(folder), quality)


# ---------------------------------------------------------------- items 3 and 4: the recipe's stages 3 and 4


@pytest.fixture()
def experiment(tmp_path):
    """``(EXP, stage-3 overrides)``: a recorded experiment with one (untrained) checkpoint, and a tiny test set."""
    wav = tmp_path / "test" / "wav"
    for seed, name in enumerate(["s1/u1.wav", "s1/u2.wav", "s2/u1.wav"]):
        (wav / name).parent.mkdir(parents=True, exist_ok=True)
        write_wav(wav / name, 1.0, seed=seed)
    trials = tmp_path / "trials.txt"
    trials.write_text("1 s1/u1.wav s1/u2.wav\n0 s1/u1.wav s2/u1.wav\n0 s1/u2.wav s2/u1.wav\n")
    exp = tmp_path / "exp"
    (exp / "data").mkdir(parents=True)
    (exp / "data" / "train.csv").write_text(f"ID,wav,duration,spk_id\nu1,{wav / 's1/u1.wav'},1.0,s1\n")
    recorded = Experiment.for_training(exp, DEMO_HPARAMS, None, {"channels": 16, "embedding_dim": 16})
    recorded.write_record()
    recorded.hparams["checkpointer"].save_checkpoint(meta={"end-of-epoch": True}, end_of_epoch=True)
    overrides = {"test_root": str(tmp_path / "test"), "trial_files": [str(trials)], "bootstrap_resamples": 0}
    return exp, overrides


def test_packaging_takes_only_results_of_the_packaged_model(experiment, capsys):
    exp, overrides = experiment
    model_id = score_stage(exp, overrides=overrides, device="cpu")["model_id"]
    info = read_model_info(package_stage(exp))
    assert info["model_identity"] == model_id and [entry["model_id"] for entry in info["results"]] == [model_id]
    assert "uncalibrated: minDCF" in SpeakerModel.from_folder(exp / "model").verify(np.ones(8000), np.ones(9000)).source
    results = exp / "scores" / "results.cosine.json"
    run = json.loads(results.read_text())
    results.write_text(json.dumps({**run, "model_id": "f" * 64}))  # scored with another model
    with pytest.raises(StageError) as refused:
        package_stage(exp)
    message = str(refused.value)
    assert str(results) in message and "f" * 64 in message and "re-run stage 3" in message and "\n" not in message


def test_stage_3_applies_a_packaged_calibration_only_for_the_scored_model(experiment, capsys):
    exp, overrides = experiment
    model_id = score_stage(exp, overrides=overrides, device="cpu")["model_id"]
    info = read_model_info(package_stage(exp))
    calibrated = exp / "scores" / "results.cosine.calibrated.json"

    def score_with(**fit):
        calibrated.unlink(missing_ok=True)
        Calibration(("score",), (10.0,), -9.0, 0.5, fit=fit).save(exp / "model" / "calibration.json")
        return score_stage(exp, overrides=overrides, device="cpu")

    for fit in ({"model_identity": "0" * 64, "model_sha256": info["checkpoint_sha256"]}, {"model_sha256": "1" * 64}):
        with pytest.raises(StageError) as refused:
            score_with(**fit)
        message = str(refused.value)
        assert "calibration.json was fitted for model" in message and "qmargin-spk calibrate" in message
        assert "\n" not in message and not calibrated.exists()
    score_with(model_identity=model_id)
    assert json.loads(calibrated.read_text())["model_id"] == model_id
    score_with(model_sha256=info["checkpoint_sha256"])  # made before calibrations named their model: the folder's
    assert calibrated.is_file()
