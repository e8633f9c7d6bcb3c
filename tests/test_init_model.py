"""Stage 2 from a model folder (``--init_model``): the folder's weights, a class-mean head, checks and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, package_recipe_model, recipe_hparams, stage_script
from qmargin_spk.data.dataset import SpeakerLabelEncoder
from qmargin_spk.data.manifest import read_manifest
from qmargin_spk.inference import SpeakerModel, package_model
from qmargin_spk.inference.package import model_card
from qmargin_spk.stages import init_model as init_model_module
from qmargin_spk.stages.experiment import Experiment, StageError
from qmargin_spk.stages.train import train_stage
from qmargin_spk.training.brain import SpeakerBrain

REPO = Path(__file__).resolve().parents[1]
HPARAMS = str(REPO / "hparams" / "demo_cpu_qmargin.yaml")
RUN_OPTS = {"device": "cpu", "noprogressbar": True}
RUN = {**TINY, "batch_size": 8, "num_workers": 0, "num_threads": 1, "number_of_epochs": 1, "warmup_epochs": 0}


def _first_step(monkeypatch) -> tuple[dict, list[float]]:
    """The embedding model's parameters and head as the first step finds them, and every step's loss."""
    start: dict = {}
    losses: list[float] = []
    original = SpeakerBrain.fit_batch

    def fit_batch(self, batch):
        if not start:
            start.update({k: v.detach().clone() for k, v in self.modules.embedder.embedding_model.named_parameters()})
            start["head"] = self.modules.classifier.weight.detach().clone()
        loss = original(self, batch)
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(SpeakerBrain, "fit_batch", fit_batch)
    return start, losses


@pytest.mark.e2e
def test_fine_tuning_starts_from_the_folder_and_class_means_and_its_loss_falls(prepared, tiny_model, monkeypatch):
    folder, _ = tiny_model
    start, losses = _first_step(monkeypatch)
    # Two speeds make a second block of classes, which starts from the same speakers' means.
    overrides = {**RUN, "number_of_epochs": 2, "base_lr": 0.5, "speed_factors": [1.0, 1.1]}
    train_stage(prepared, HPARAMS, RUN_OPTS, None, overrides, init_model=folder)
    model = SpeakerModel.from_folder(folder)
    for key, value in model.embedder.embedding_model.named_parameters():
        torch.testing.assert_close(start[key], value.detach(), rtol=0, atol=0)

    rows = read_manifest(prepared / "data" / "train.csv")
    labels = SpeakerLabelEncoder.from_rows(rows)
    embeddings = model.embed([row.wav for row in rows]).astype(np.float64)
    means = np.zeros((len(labels), embeddings.shape[1]))
    for index in range(len(labels)):
        mean = embeddings[[labels.encode(row.spk_id) == index for row in rows]].mean(axis=0)
        means[index] = mean / np.linalg.norm(mean)
    head = start["head"].double().numpy()
    assert head.shape == (2 * len(labels), embeddings.shape[1])
    np.testing.assert_allclose(head, np.concatenate([means, means]), rtol=0, atol=1e-6)

    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    recorded = json.loads((prepared / "init_model.json").read_text())
    assert recorded["folder"] == str(folder.resolve()) and recorded["model_identity"] == model.identity
    assert recorded["init_head"] == "class_means"
    described = Experiment.from_record(prepared).describe()  # what results and the model card name
    assert described["init_model"] == {"name": folder.name, "model_identity": model.identity}
    assert f"started from the model folder `{folder.name}`" in model_card({**model.info, "experiment": described})


def test_other_channels_or_front_end_are_one_line_errors_naming_both_values(prepared, tmp_path, capsys):
    narrow, _ = package_recipe_model(tmp_path / "narrow", {**TINY, "channels": 16})
    hparams = recipe_hparams(TINY)
    kaldi = {"name": "kaldi_fbank", "sample_rate": 16000, "n_mels": 80, "window_type": "hamming"}
    other_frontend = package_model(
        tmp_path / "kaldi", kaldi, hparams["backbone_description"], hparams["embedding_model"].state_dict(), {}
    )
    train = stage_script("train")
    common = [HPARAMS, "--exp", str(prepared), *(f"--{key}={value}" for key, value in RUN.items())]

    assert train([*common, "--init_model", str(narrow)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "backbone" in err
    assert "[16, 16, 16, 16, 48] in the folder" in err and "[32, 32, 32, 32, 96] in this run" in err

    assert train([*common, "--init_model", str(other_frontend)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "front-end" in err
    assert "'kaldi_fbank' in the folder" in err and "'fbank' in this run" in err
    assert not (prepared / "save").exists() or not list((prepared / "save").glob("CKPT+*"))


@pytest.mark.parametrize("init_head", ["fresh", "class_means"])
def test_init_head_fresh_keeps_the_random_head_and_sub_centers_start_at_the_mean(prepared, tiny_model, init_head):
    from qmargin_spk.stages.experiment import composed_hparams

    overrides = {**TINY, "init_head": init_head}
    hparams = composed_hparams(HPARAMS, {"loss": "subcenter_aam"}, overrides)
    rows = read_manifest(prepared / "data" / "train.csv")
    labels = SpeakerLabelEncoder.from_rows(rows)
    head = hparams["classifier"](num_classes=len(labels), embedding_dim=16)
    random_head = head.weight.detach().clone()
    model = SpeakerModel.from_folder(tiny_model[0])
    init_model_module.initialise_from_model(prepared, hparams, head, model, rows, labels)
    for key, value in hparams["embedding_model"].state_dict().items():
        torch.testing.assert_close(value, model.embedder.embedding_model.state_dict()[key], rtol=0, atol=0)
    if init_head == "fresh":
        torch.testing.assert_close(head.weight.detach(), random_head, rtol=0, atol=0)
        assert not (prepared / "init_class_means.pt").exists()
    else:
        means = torch.load(prepared / "init_class_means.pt", weights_only=True)["means"]
        assert head.weight.shape == (3 * len(labels), 16)
        torch.testing.assert_close(head.weight.detach(), means.repeat_interleave(3, dim=0), rtol=0, atol=0)


def test_settings_written_out_at_their_defaults_still_match_the_run(tmp_path):
    hparams = recipe_hparams(TINY)
    frontend = {**hparams["frontend_description"], "n_fft": 400}  # SpeechBrain Fbank's default
    backbone = {**hparams["backbone_description"], "res2net_scale": 8}  # ECAPA_TDNN's default
    folder = package_model(tmp_path / "explicit", frontend, backbone, hparams["embedding_model"].state_dict(), {})
    model = init_model_module.load_init_model(folder, hparams)
    assert model.info["backbone"]["res2net_scale"] == 8


@pytest.mark.e2e
def test_resume_skips_the_class_mean_pass_and_refuses_another_model(prepared, tiny_model, tmp_path, monkeypatch):
    folder, _ = tiny_model
    train_stage(prepared, HPARAMS, RUN_OPTS, None, {**RUN, "base_lr": 0.01}, init_model=folder)
    assert (prepared / "init_class_means.pt").is_file()

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the class-mean pass ran again on resume")

    monkeypatch.setattr(init_model_module, "class_means", no_second_pass)
    brain = train_stage(prepared, HPARAMS, RUN_OPTS, None, {**RUN, "number_of_epochs": 2}, init_model=folder)
    assert brain.hparams.epoch_counter.current == 2

    other, _ = package_recipe_model(tmp_path / "other", {**TINY, "seed": 7})  # same shapes, other weights
    with pytest.raises(StageError, match="started from .* not --init_model"):
        train_stage(prepared, HPARAMS, RUN_OPTS, None, {**RUN, "number_of_epochs": 3}, init_model=other)


def write_wespeaker_folder(folder: Path, base_channels: int = 8, embed_dim: int = 32) -> Path:
    """A WeSpeaker model-zoo folder (``avg_model.pt`` with its projection, ``config.yaml``) of a random ResNet34."""
    from qmargin_spk.models.resnet import ResNetSpeaker

    torch.manual_seed(5)
    model = ResNetSpeaker(feat_dim=80, embedding_dim=embed_dim, base_channels=base_channels)
    weights = {key: value.float() if "num_batches" in key else value for key, value in model.state_dict().items()}
    weights["projection.weight"] = torch.randn(5, embed_dim)
    folder.mkdir(parents=True)
    torch.save(weights, folder / "avg_model.pt")
    config = (
        f"model: ResNet34\nmodel_args:\n  feat_dim: 80\n  embed_dim: {embed_dim}\n  pooling_func: TSTP\n"
        "dataset_args:\n  resample_rate: 16000\n  fbank_args:\n    num_mel_bins: 80\n    frame_length: 25\n"
        "    frame_shift: 10\n    dither: 1.0\n"
    )
    (folder / "config.yaml").write_text(config, encoding="utf-8")
    return folder


@pytest.mark.e2e
def test_an_imported_wespeaker_resnet34_fine_tunes_with_qmargin(prepared, tmp_path, monkeypatch):
    from qmargin_spk.inference.importers import import_published

    imported = import_published("wespeaker", write_wespeaker_folder(tmp_path / "wespeaker"), tmp_path / "model").folder
    info = json.loads((imported / "model.json").read_text())
    start, losses = _first_step(monkeypatch)
    # The run takes WeSpeaker's front-end (an override of the setting's) and the folder's ResNet34 sizes.
    overrides = {
        **{key: value for key, value in RUN.items() if key not in TINY},
        "embedding_dim": 32,
        "base_channels": 8,
        "frontend_description": info["frontend"],
        "number_of_epochs": 2,
        "base_lr": 0.5,
    }
    hparams_file = str(REPO / "hparams" / "demo_cpu_resnet34_qmargin.yaml")
    train_stage(prepared, hparams_file, RUN_OPTS, None, overrides, init_model=imported)
    for key, value in SpeakerModel.from_folder(imported).embedder.embedding_model.named_parameters():
        torch.testing.assert_close(start[key], value.detach(), rtol=0, atol=0)
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses


@pytest.mark.e2e
def test_run_sh_passes_init_model_to_stage_2(prepared, tmp_path):
    narrow, _ = package_recipe_model(tmp_path / "narrow model", {**TINY, "channels": 16})
    command = ["bash", str(REPO / "recipes" / "voxceleb" / "run.sh"), "--exp", str(prepared), "--hparams", HPARAMS]
    command += ["--stage", "2", "--stop_stage", "2", "--init_model", str(narrow), "--channels=32", "--embedding_dim=16"]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert f"--init_model {narrow}: its backbone differs" in line and "[16, 16, 16, 16, 48] in the folder" in line
