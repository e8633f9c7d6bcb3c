"""Audio shorter than the model can embed: the probed minimum, and every door refusing it in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from conftest import DEMO_HPARAMS, SR, TINY, package_recipe_model, recipe_hparams, write_wav
from qmargin_spk.cli import main as cli_main
from qmargin_spk.data.batching import TooShortError
from qmargin_spk.data.prepare import PrepareError, prepare
from qmargin_spk.inference import SpeakerModel
from qmargin_spk.inference.package import MODEL_JSON
from qmargin_spk.models import shortest_input
from qmargin_spk.scoring.pipeline import score_trial_lists

DEMO_MIN = 640  # the demo ECAPA (channels 128): 639 samples give 4 frames, too few for the reflect padding


def _noise_wav(path: Path, samples: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, 0.1 * np.random.default_rng(seed).normal(size=samples), SR, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def demo_hparams():
    torch.manual_seed(0)
    return recipe_hparams({})


def test_probe_finds_the_demo_ecapa_minimum_where_639_samples_fail_and_640_work(demo_hparams):
    embedder = demo_hparams["embedder"].eval()
    assert demo_hparams["channels"] == 128
    assert shortest_input(embedder, SR) == DEMO_MIN
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="[Pp]adding"):
            embedder(torch.randn(1, DEMO_MIN - 1), torch.ones(1))
        assert embedder(torch.randn(1, DEMO_MIN), torch.ones(1)).shape == (1, 128)


def test_probe_leaves_weights_batchnorm_statistics_training_flag_and_rng_untouched(demo_hparams):
    embedder = demo_hparams["embedder"].train()
    before = {key: value.clone() for key, value in embedder.state_dict().items()}
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    shortest_input(embedder, SR)
    assert embedder.training and torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)
    after = embedder.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # BatchNorm running stats included


def test_onnx_export_carries_the_minimum_and_refuses_shorter_waveforms_naming_them(tmp_path):
    from qmargin_spk.inference.export import export_onnx
    from qmargin_spk.inference.onnx_runtime import OnnxSpeakerModel

    folder, _ = package_recipe_model(tmp_path / "model", {}, {"min_samples": DEMO_MIN})
    onnx = OnnxSpeakerModel(export_onnx(SpeakerModel.from_folder(folder), tmp_path / "model.onnx"))
    assert onnx.min_samples == DEMO_MIN
    with pytest.raises(Exception, match="Pad"):  # the graph itself fails where the eager model does
        onnx.embed_batch(np.zeros((1, DEMO_MIN - 1), np.float32))
    assert onnx.embed([np.ones(DEMO_MIN, np.float32)]).shape == (1, 128)
    with pytest.raises(
        ValueError, match=r"^waveform 1 \(0.0399375 s\) is shorter than the model's minimum input of 0.04 s"
    ):
        onnx.embed([np.ones(SR, np.float32), np.ones(DEMO_MIN - 1, np.float32)])


def test_a_folder_without_min_samples_is_probed_once_and_a_stored_one_is_trusted(tiny_model, tmp_path, monkeypatch):
    calls = []

    def counting(embedder, sample_rate):
        calls.append(sample_rate)
        return shortest_input(embedder, sample_rate)

    monkeypatch.setattr("qmargin_spk.inference.model.shortest_input", counting)
    old = SpeakerModel.from_folder(tiny_model[0])
    assert "min_samples" not in old.info
    assert (old.min_samples, old.min_samples) == (DEMO_MIN, DEMO_MIN) and calls == [SR]
    stored, _ = package_recipe_model(tmp_path / "stored", TINY, {"min_samples": 800})
    assert SpeakerModel.from_folder(stored).min_samples == 800 and calls == [SR]
    with pytest.raises(ValueError, match=r"waveform 0 \(0.045 s\) is shorter than the model's minimum input of 0.05 s"):
        SpeakerModel.from_folder(stored).embed(np.ones(720, np.float32))


def test_chunks_shorter_than_the_minimum_are_refused_with_a_hint(tiny_model):
    model = SpeakerModel.from_folder(tiny_model[0])
    with pytest.raises(TooShortError, match=r"waveform 0 \(0.03\d* s chunks\).*raise chunk_seconds"):
        model.embed(np.ones(SR, np.float32), chunk_seconds=0.03)


@pytest.fixture()
def model_dir(tiny_model, tmp_path):
    return Path(shutil.copytree(tiny_model[0], tmp_path / "model"))


def test_cli_embed_and_verify_name_the_short_file_and_the_minimum_in_one_line(model_dir, tmp_path, capsys):
    short = _noise_wav(tmp_path / "short.wav", DEMO_MIN - 1)
    good = write_wav(tmp_path / "good.wav", 1.0)
    out = tmp_path / "emb.npz"
    assert cli_main(["embed", "--model", str(model_dir), str(good), str(short), "--out", str(out)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"qmargin-spk: error: {short} (0.0399375 s) is shorter than the model's minimum input of 0.04 s "
        "(640 samples at 16000 Hz)"
    )
    assert not out.exists()
    assert cli_main(["verify", "--model", str(model_dir), str(good), str(short)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(short) in line and "minimum input of 0.04 s" in line


def _test_tree(root: Path, short: int, lengths: tuple[int, ...] = (SR, SR)) -> tuple[Path, list[str]]:
    """``root/wav`` with a full-length utterance per length and ``short`` too-short ones; a trial list of them."""
    utts = [f"id1/v/{i}.wav" for i in range(len(lengths))] + [f"id2/v/{i}.wav" for i in range(short)]
    for i, utt in enumerate(utts):
        _noise_wav(root / "wav" / utt, lengths[i] if i < len(lengths) else DEMO_MIN - 1 - i, seed=i)
    lines = [f"1 {utts[0]} {utts[1]}"] + [f"0 {utts[0]} {utt}" for utt in utts[len(lengths) :]]
    trials = root / "trials.txt"
    trials.write_text("\n".join(lines) + "\n")
    return trials, utts


def test_a_trial_list_with_short_files_fails_whole_listing_ten_before_any_embedding(tmp_path):
    trials, utts = _test_tree(tmp_path, short=12)
    calls = []

    def embed(wavs, rel_lens):
        calls.append(wavs.shape)
        return torch.ones(wavs.shape[0], 4)

    with pytest.raises(TooShortError) as caught:
        score_trial_lists(embed, "m", tmp_path / "wav", [trials], tmp_path / "out", min_samples=DEMO_MIN)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("12 inputs are shorter than the model's minimum input of 0.04 s")
    assert message.count(str(tmp_path / "wav" / "id2")) == 10 and message.endswith(" and 2 more")
    assert calls == [] and not list((tmp_path / "out").glob("*.scores"))


def test_cli_score_refuses_a_list_naming_a_short_file(model_dir, tmp_path, capsys):
    trials, utts = _test_tree(tmp_path / "test", short=1)
    out = tmp_path / "out"
    args = ["score", "--model", str(model_dir), "--trials", str(trials), "--root", str(tmp_path / "test" / "wav")]
    assert cli_main([*args, "--out", str(out)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert utts[-1] in line and "minimum input of 0.04 s" in line
    assert not list(out.glob("*.scores"))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """An experiment folder as stage 2 leaves it (record, one checkpoint of random weights), without training."""
    from qmargin_spk.data.manifest import ManifestRow, write_manifest
    from qmargin_spk.stages.experiment import Experiment

    folder = tmp_path_factory.mktemp("exp")
    wav = write_wav(folder / "train.wav", 1.0)
    write_manifest(folder / "data" / "train.csv", [ManifestRow("id9/v/1", str(wav), 1.0, "id9")])
    torch.manual_seed(0)
    experiment = Experiment.for_training(folder, DEMO_HPARAMS, None, dict(TINY, number_of_epochs=1))
    experiment.write_record()
    experiment.hparams["checkpointer"].save_checkpoint(end_of_epoch=True)
    return folder


@pytest.mark.e2e
def test_stage_3_refuses_short_test_files_and_stage_4_records_the_minimum(experiment, tmp_path, monkeypatch):
    from qmargin_spk.stages.package import package_stage
    from qmargin_spk.stages.score import score_stage

    trials, utts = _test_tree(tmp_path, short=1)
    overrides = {"test_root": str(tmp_path), "trial_files": [str(trials)]}
    with pytest.raises(TooShortError, match=f"{utts[-1]} .* shorter than the model's minimum input of 0.04 s"):
        score_stage(experiment, overrides=overrides, device="cpu")
    assert not list((experiment / "scores").glob("*.scores"))
    folder = package_stage(experiment)
    assert json.loads((folder / MODEL_JSON).read_text())["min_samples"] == DEMO_MIN
    monkeypatch.setattr("qmargin_spk.inference.model.shortest_input", None)  # a stored minimum is not probed again
    assert SpeakerModel.from_folder(folder).min_samples == DEMO_MIN


def _voxceleb_tree(root: Path, speakers: tuple[str, ...], lengths: dict[str, int] | None = None) -> Path:
    for s, speaker in enumerate(speakers):
        for utt in range(2):
            _noise_wav(root / "wav" / speaker / "v" / f"{utt}.wav", (lengths or {}).get(f"{speaker}/{utt}", SR), s)
    return root


def test_prepare_skips_test_files_shorter_than_the_model_and_refuses_trials_naming_them(tmp_path):
    train = _voxceleb_tree(tmp_path / "train", ("id1", "id2"))
    test = _voxceleb_tree(tmp_path / "test", ("id8", "id9"), {"id9/1": DEMO_MIN - 1})
    good = tmp_path / "good.txt"
    good.write_text("1 id8/v/0.wav id8/v/1.wav\n0 id8/v/0.wav id9/v/0.wav\n")
    result = prepare([train], test, [good], tmp_path / "out", num_workers=1, test_min_samples=DEMO_MIN)
    assert result.num_test_utterances == 3
    skipped = (tmp_path / "out" / "skipped.txt").read_text()
    assert skipped == f"{test / 'wav/id9/v/1.wav'}\ttoo short for the model (0.0399375 s < its minimum 0.04 s)\n"
    bad = tmp_path / "bad.txt"
    bad.write_text("1 id8/v/0.wav id8/v/1.wav\n0 id8/v/0.wav id9/v/1.wav\n")
    with pytest.raises(PrepareError, match=rf"{bad}:2: id9/v/1.wav is unusable \(too short for the model"):
        prepare([train], test, [bad], tmp_path / "out2", num_workers=1, test_min_samples=DEMO_MIN)


def test_recipe_prepare_probes_the_experiment_given_with_hparams(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_recipe", DEMO_HPARAMS.parents[1] / "recipes/voxceleb/prepare.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    train = _voxceleb_tree(tmp_path / "train", ("id1", "id2"))
    test = _voxceleb_tree(tmp_path / "test", ("id8", "id9"), {"id9/1": DEMO_MIN - 1})
    trials = tmp_path / "trials.txt"
    trials.write_text("1 id8/v/0.wav id8/v/1.wav\n0 id8/v/0.wav id9/v/1.wav\n")
    where = ["--train_root", str(train), "--test_root", str(test), "--num_workers", "1"]
    assert recipe.main([*where, "--out", str(tmp_path / "plain"), "--trials", str(trials)]) == 0  # no model: kept
    argv = [*where, "--out", str(tmp_path / "out"), "--trials", str(trials), "--hparams", str(DEMO_HPARAMS)]
    capsys.readouterr()
    assert recipe.main([*argv, "--loss", "aam"]) == 1
    assert f"{trials}:2: id9/v/1.wav is unusable (too short for the model" in capsys.readouterr().err


def test_run_sh_passes_its_hparams_and_fragment_flags_to_stage_1(tmp_path):
    import os
    import subprocess

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    fake.chmod(0o755)
    run_sh = DEMO_HPARAMS.parents[1] / "recipes" / "voxceleb" / "run.sh"
    common = [
        "--train_root",
        "T",
        "--test_root",
        "V",
        "--exp",
        str(tmp_path / "exp"),
        "--stage",
        "1",
        "--stop_stage",
        "1",
    ]
    env = {**os.environ, "PYTHON": str(fake), "ARGS_FILE": str(tmp_path / "args")}
    given = ["--hparams", str(DEMO_HPARAMS), "--loss", "aam"]
    subprocess.run(["bash", str(run_sh), *common, *given], env=env, check=True, capture_output=True)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[0].endswith("prepare.py") and args[-4:] == given
    subprocess.run(["bash", str(run_sh), *common], env=env, check=True, capture_output=True)
    assert "--hparams" not in (tmp_path / "args").read_text().splitlines()
