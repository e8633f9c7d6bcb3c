"""The packaged model folder and SpeakerModel against the recipe's own embedder, SpeechBrain and closed forms."""

from __future__ import annotations

import hashlib
import json
import math
import socket

import numpy as np
import pytest
import soundfile
import torch

from conftest import SR, write_wav
from qmargin_spk.calibration import Calibration, fit_calibration
from qmargin_spk.data.audio import AudioError, load_audio, pad_waveforms
from qmargin_spk.inference import ModelFolderError, SpeakerModel, model_description, package_model, read_model_info
from qmargin_spk.inference.package import CALIBRATION_FILE, COHORT_FILE
from qmargin_spk.metrics import compute_metrics
from qmargin_spk.scoring import extract_embeddings


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def unit_rows(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stage_embed_fn(embedder):
    return lambda wavs, rel_lens: embedder(wavs, rel_lens)


# ---------------------------------------------------------------- the folder


def test_folder_contents(tiny_model):
    folder, embedder = tiny_model
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "embedding_model.ckpt",
        "hyperparams.yaml",
        "model.json",
    ]
    info = read_model_info(folder)
    assert info["frontend"] == {"name": "fbank", "normalisation": "sentence_mean", "sample_rate": SR, "n_mels": 80}
    assert info["backbone"] == {
        "architecture": "ecapa_tdnn",
        "input_size": 80,
        "channels": [32, 32, 32, 32, 96],
        "kernel_sizes": [5, 3, 3, 3, 1],
        "dilations": [1, 2, 3, 4, 1],
        "attention_channels": 64,
        "lin_neurons": 16,
    }
    assert info["loss"] == "qmargin" and info["n_training_speakers"] == 3 and info["embedding_dim"] == 16
    weights = torch.load(folder / "embedding_model.ckpt", weights_only=True)
    for key, value in embedder.embedding_model.state_dict().items():
        assert torch.equal(weights[key], value)
    card = (folder / "README.md").read_text()
    assert "qmargin loss (alpha 1.5, scale 10.0, margin 0.2)" in card and "16000 Hz" in card
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_package_rejects_settings_that_do_not_fit_the_weights(tmp_path, tiny_model):
    _, embedder = tiny_model
    frontend, backbone = model_description(read_model_info(tiny_model[0]))
    weights = embedder.embedding_model.state_dict()
    wider = {**backbone, "channels": [64, 64, 64, 64, 192]}
    with pytest.raises(ModelFolderError, match="does not fit the backbone"):
        package_model(tmp_path / "m", frontend, wider, weights, {})
    with pytest.raises(ModelFolderError, match="needs"):
        package_model(tmp_path / "m", frontend, {"architecture": "ecapa_tdnn", "input_size": 80}, weights, {})
    with pytest.raises(ModelFolderError, match="unknown architecture"):
        package_model(tmp_path / "m", frontend, {**backbone, "architecture": "resnet_999"}, weights, {})
    with pytest.raises(TypeError):
        package_model(tmp_path / "m", frontend, backbone, weights, {"x": object()})
    with pytest.raises(ModelFolderError, match="must not set"):
        package_model(tmp_path / "m", frontend, backbone, weights, {"format": 7})
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.txt").write_text("keep")
    with pytest.raises(ModelFolderError, match="not a model folder"):
        package_model(tmp_path / "precious", frontend, backbone, weights, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_repackaging_keeps_a_calibration_only_for_the_same_weights(tmp_path, tiny_model):
    _, embedder = tiny_model
    settings = model_description(read_model_info(tiny_model[0]))
    weights = embedder.embedding_model.state_dict()
    calibration = Calibration(inputs=("score",), weights=(10.0,), offset=-5.0, prior=0.5)
    folder = package_model(tmp_path / "m", *settings, weights, {}, calibration=calibration)
    assert (
        Calibration.load(folder / CALIBRATION_FILE).fit["model_sha256"] == read_model_info(folder)["checkpoint_sha256"]
    )
    package_model(folder, *settings, weights, {"note": "again"})
    assert (folder / CALIBRATION_FILE).is_file() and read_model_info(folder)["note"] == "again"
    changed = {key: value + 1 if value.is_floating_point() else value for key, value in weights.items()}
    package_model(folder, *settings, changed, {})
    assert not (folder / CALIBRATION_FILE).exists()


def test_broken_folders_are_clear_errors(tmp_path, tiny_model):
    folder, _ = tiny_model
    with pytest.raises(ModelFolderError, match="no such model folder"):
        SpeakerModel.from_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="missing"):
        SpeakerModel.from_folder(tmp_path / "empty")
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in folder.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    info = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**info, "format": 99}))
    with pytest.raises(ModelFolderError, match="format 99"):
        SpeakerModel.from_folder(copy)
    (copy / "model.json").write_text(json.dumps(info))
    (copy / "embedding_model.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFolderError, match="embedding_model.ckpt: SHA-256 .* differs"):
        SpeakerModel.from_folder(copy)
    (copy / "model.json").write_text(
        json.dumps({**info, "checkpoint_sha256": hashlib.sha256(b"not a checkpoint").hexdigest()})
    )
    with pytest.raises(ModelFolderError, match="embedding_model.ckpt: cannot load"):
        SpeakerModel.from_folder(copy)


# ---------------------------------------------------------------- embeddings


def test_embeddings_equal_the_scoring_stage(tiny_model, audio_dir):
    folder, embedder = tiny_model
    model = SpeakerModel.from_folder(folder)
    names = sorted(str(p.relative_to(audio_dir)) for p in audio_dir.rglob("*.wav"))
    paths = {name: audio_dir / name for name in names}
    for chunk_seconds in (None, 2.0):
        stage = extract_embeddings(
            paths, stage_embed_fn(embedder), None, "m", batch_size=1, chunk_seconds=chunk_seconds
        )
        ours = model.embed([paths[name] for name in stage.utt_ids], batch_size=8, chunk_seconds=chunk_seconds)
        np.testing.assert_allclose(ours, unit_rows(stage.vectors.numpy()), atol=1e-5)
    # The stage's own batches of equal-length files are no different.
    equal = {name: paths[name] for name in ("a/2.wav", "a/3.wav")}
    stage = extract_embeddings(equal, stage_embed_fn(embedder), None, "m", batch_size=16)
    np.testing.assert_allclose(model.embed(list(equal.values())), unit_rows(stage.vectors.numpy()), atol=1e-5)


def test_an_utterance_embeds_the_same_alone_and_among_very_different_lengths(tiny_model):
    model = SpeakerModel.from_folder(tiny_model[0])
    rng = np.random.default_rng(0)
    lengths = [8000, 320000, 8000, 24000, 160000, 8000, 47000, 320000, 12345]
    wavs = [rng.normal(0, 0.1, n).astype(np.float32) for n in lengths]
    together = model.embed(wavs, batch_size=4)
    for wav, embedding in zip(wavs, together):
        assert cosine(model.embed(wav)[0], embedding) >= 0.9999
    # What the batching avoids: the short item zero-padded next to a 20 s one moves far away.
    padded = model.embed_batch(*pad_waveforms([torch.from_numpy(wavs[0]), torch.from_numpy(wavs[1])]))[0]
    assert cosine(padded, together[0]) < 0.999


def test_speechbrain_encoder_classifier_loads_the_folder_offline(tiny_model, audio_dir, tmp_path, monkeypatch):
    from speechbrain.inference.classifiers import EncoderClassifier

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, _ = tiny_model
    classifier = EncoderClassifier.from_hparams(
        source=str(folder), savedir=str(tmp_path / "sb"), run_opts={"device": "cpu"}
    )
    files = [audio_dir / "a/1.wav", audio_dir / "b/3.wav"]
    model = SpeakerModel.from_folder(folder)
    for path in files:
        wav = load_audio(path, SR)[None]
        sb = classifier.encode_batch(wav).squeeze(1).detach().numpy()
        np.testing.assert_allclose(unit_rows(sb)[0], model.embed(path)[0], atol=1e-5)


def test_waveforms_and_files_agree_and_bad_inputs_are_named(tiny_model, audio_dir, tmp_path):
    model = SpeakerModel.from_folder(tiny_model[0])
    path = audio_dir / "b/1.wav"
    np.testing.assert_allclose(model.embed(load_audio(path, SR).numpy()), model.embed(path), atol=1e-6)
    with pytest.raises(ValueError, match="waveform 1: expected a non-empty 1-D"):
        model.embed([np.zeros(100, np.float32), np.zeros((2, 100), np.float32)])
    with pytest.raises(ValueError, match="waveform 0: contains NaN"):
        model.embed(np.full(100, np.nan, np.float32))
    stereo = write_wav(tmp_path / "stereo.wav", 0.5, channels=2)
    with pytest.raises(AudioError, match="stereo.wav: 2 channels"):
        model.embed([path, stereo])
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0), SR)
    with pytest.raises(AudioError, match="empty.wav: empty audio"):
        model.embed(empty)
    (tmp_path / "junk.wav").write_bytes(b"RIFF junk")
    with pytest.raises(AudioError, match="junk.wav: unreadable"):
        model.embed(tmp_path / "junk.wav")


def test_other_sample_rates_are_resampled(tiny_model, tmp_path):
    model = SpeakerModel.from_folder(tiny_model[0])
    path = write_wav(tmp_path / "8k.wav", 1.0, rate=8000)
    expected = model.embed(load_audio(path, SR))  # load_audio is the recipe's policy: resample to 16 kHz
    np.testing.assert_allclose(model.embed(path), expected, atol=1e-6)


def test_enroll_score(tiny_model, audio_dir):
    model = SpeakerModel.from_folder(tiny_model[0])
    files = [audio_dir / "a/1.wav", audio_dir / "a/2.wav", audio_dir / "a/4.wav"]
    embeddings = model.embed(files).astype(np.float64)
    mean = embeddings.mean(axis=0)
    np.testing.assert_allclose(model.enroll(files), mean / np.linalg.norm(mean), atol=1e-6)
    assert model.score(embeddings[0], embeddings[1]) == pytest.approx(float(embeddings[0] @ embeddings[1]), abs=1e-6)
    np.testing.assert_allclose(
        model.score(embeddings, embeddings[::-1]), np.sum(embeddings * embeddings[::-1], 1), atol=1e-6
    )
    with pytest.raises(ValueError, match="same shape|one shape"):
        model.score(embeddings[0], embeddings)


# ---------------------------------------------------------------- decisions


def test_verify_without_calibration(tiny_model, audio_dir, tmp_path):
    folder, embedder = tiny_model
    a, b = audio_dir / "a/1.wav", audio_dir / "b/1.wav"
    plain = SpeakerModel.from_folder(folder).verify(a, b)
    assert plain.llr is None and plain.decision is None and "uncalibrated" in plain.source
    # With a cosine-scored list in model.json, its minDCF threshold at the same prior decides.
    metrics = compute_metrics([0.1, 0.5, 0.2, 0.9], [0, 1, 0, 1], p_targets=(0.01,)).to_dict()
    asnorm = json.loads(json.dumps(metrics))
    asnorm["min_dcf"]["0.01"]["threshold"] = -9.0
    metrics["min_dcf"]["0.01"]["threshold"] = plain.score + 1e-3
    identity = SpeakerModel.from_folder(folder).identity  # stored thresholds count for results of this model only
    results = [
        {"list": "asn", "backend": "asnorm", "n_trials": 4, "metrics": asnorm, "model_id": identity},
        {"list": "veri", "backend": "cosine", "n_trials": 4, "metrics": metrics, "model_id": identity},
    ]
    other = package_model(
        tmp_path / "m",
        *model_description(read_model_info(tiny_model[0])),
        embedder.embedding_model.state_dict(),
        {"results": results},
    )
    result = SpeakerModel.from_folder(other).verify(a, b, p_target=0.01)
    assert result.score == pytest.approx(plain.score) and result.decision is False
    assert result.threshold == plain.score + 1e-3 and "veri" in result.source
    assert SpeakerModel.from_folder(other).verify(a, b, p_target=0.05).decision is None


def test_verify_with_calibration_decides_at_the_bayes_threshold(tiny_model, audio_dir, tmp_path):
    folder, embedder = tiny_model
    a, b = audio_dir / "a/2.wav", audio_dir / "b/3.wav"
    score = SpeakerModel.from_folder(folder).verify(a, b).score
    # An LLR of +1 at this trial's score: accepted at P = 0.5 (threshold 0), rejected at P = 0.01 (4.6).
    calibration = Calibration(inputs=("score",), weights=(20.0,), offset=1.0 - 20.0 * score, prior=0.5)
    other = package_model(
        tmp_path / "m",
        *model_description(read_model_info(tiny_model[0])),
        embedder.embedding_model.state_dict(),
        {},
        calibration=calibration,
    )
    model = SpeakerModel.from_folder(other)
    high = model.verify(a, b, p_target=0.5)
    assert high.llr == pytest.approx(1.0, abs=1e-4) and high.decision is True and high.threshold == 0.0
    low = model.verify(a, b, p_target=0.01)
    assert low.decision is False and low.threshold == pytest.approx(math.log(99))


def test_verify_with_quality_calibration(tiny_model, audio_dir, tmp_path):
    folder, embedder = tiny_model
    rng = np.random.default_rng(0)
    cohort = rng.normal(size=(20, 16)).astype(np.float32)
    n = 400
    labels = rng.random(n) < 0.5
    quality = {
        name: rng.normal(size=n)
        for name in ("log_duration_enrol", "log_duration_test", "imposter_mean_enrol", "imposter_mean_test")
    }
    calibration = fit_calibration(
        rng.normal(labels * 1.0, 1.0), labels, quality=quality, cohort={"file": COHORT_FILE, "top_n": 5}
    )
    other = package_model(
        tmp_path / "m",
        *model_description(read_model_info(tiny_model[0])),
        embedder.embedding_model.state_dict(),
        {},
        calibration=calibration,
    )
    np.save(other / COHORT_FILE, cohort)
    model = SpeakerModel.from_folder(other)
    a, b = audio_dir / "a/1.wav", [audio_dir / "b/1.wav", audio_dir / "b/3.wav"]
    result = model.verify(a, b)
    ea, eb = model.enroll(a), model.enroll(b)
    top = lambda e: np.sort(unit_rows(cohort) @ (e / np.linalg.norm(e)))[-5:].mean()  # noqa: E731
    values = [result.score, math.log(0.5), math.log(1.3 + 7.1), top(ea), top(eb)]
    expected = float(np.dot(calibration.weights, values) + calibration.offset)
    assert result.llr == pytest.approx(expected, abs=1e-4)
    (other / COHORT_FILE).unlink()
    with pytest.raises(ModelFolderError, match="calibration cohort"):
        SpeakerModel.from_folder(other)
