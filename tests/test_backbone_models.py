"""ResNet34 and CAM++ end to end: trained on the tiny corpus, packaged, embedded, exported with ECAPA's parity."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from conftest import speech_like  # noqa: E402
from qmargin_spk.cli import main as cli_main  # noqa: E402
from qmargin_spk.data.prepare import prepare  # noqa: E402
from qmargin_spk.data.synthetic import PRESETS, generate_corpus  # noqa: E402
from qmargin_spk.inference import SpeakerModel, export_onnx, export_torchscript  # noqa: E402
from qmargin_spk.inference.onnx_runtime import OnnxSpeakerModel  # noqa: E402
from qmargin_spk.stages.package import package_stage  # noqa: E402
from qmargin_spk.stages.train import train_stage  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")]

REPO = Path(__file__).resolve().parents[1]
BACKBONES = {"resnet34": 256, "campplus": 128}  # demo-size embedding dimension
# Batch sizes 1, 3, 8 and durations 0.5 to 20 s, as tests/test_export.py checks ECAPA.
GRID = [(1, 0.5), (1, 20.0), (3, 2.7), (8, 0.5)]


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory) -> Path:
    """The tiny synthetic corpus (4 utterances per training speaker), prepared once for every backbone."""
    sizes = {**PRESETS["tiny"], "utts_per_train_speaker": 4}
    corpus = generate_corpus(tmp_path_factory.mktemp("corpus"), seed=3, num_workers=1, **sizes)
    data = tmp_path_factory.mktemp("prepared") / "data"
    prepare([corpus.train_root], corpus.test_root, [corpus.trials], data, num_workers=1)
    return data


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def trained(request, prepared_data, tmp_path_factory) -> dict:
    """One demo-size run per backbone (3 epochs of 4 batches of 8 x 0.5 s), packaged at stage 4, exported once."""
    backbone = request.param
    exp = tmp_path_factory.mktemp(backbone)
    overrides = {
        "output_folder": str(exp),
        "data_folder": str(prepared_data),
        "number_of_epochs": 3,
        "warmup_epochs": 1,
        "batch_size": 8,
        "crop_seconds": 0.5,
        "num_workers": 0,
        "num_threads": 1,
    }
    experiment_file = REPO / "hparams" / f"demo_cpu_{backbone}_qmargin.yaml"
    train_stage(exp, experiment_file, {"device": "cpu", "noprogressbar": True}, None, overrides)
    model = SpeakerModel.from_folder(package_stage(exp))
    return {
        "backbone": backbone,
        "exp": exp,
        "model": model,
        "onnx": export_onnx(model, exp / "m.onnx"),
        "torchscript": torch.jit.load(str(export_torchscript(model, exp / "m.pt"))),
    }


def min_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return float(np.sum(unit(reference.astype(np.float64)) * unit(candidate.astype(np.float64)), axis=1).min())


def test_training_lowers_the_loss_and_packages_the_backbone(trained):
    log = (trained["exp"] / "train_log.txt").read_text().splitlines()
    losses = [float(re.search(r"train loss: ([0-9.e+-]+)", line).group(1)) for line in log]
    assert len(losses) == 3 and losses[-1] < losses[0]
    model = trained["model"]
    assert model.info["backbone"]["architecture"] == trained["backbone"]
    assert model.embedding_dim == BACKBONES[trained["backbone"]]


def test_packaged_model_embeds_through_speaker_model_and_cli(trained, audio_dir, tmp_path, capsys):
    model = trained["model"]
    files = [audio_dir / "a/1.wav", audio_dir / "b/2.wav", audio_dir / "b/1.wav"]
    expected = model.embed(files)
    assert expected.shape == (3, model.embedding_dim) and np.isfinite(expected).all()
    status = cli_main(["embed", "--model", str(model.folder), *map(str, files), "--out", str(tmp_path / "e.npz")])
    assert status == 0 and f"3 embeddings of size {model.embedding_dim}" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "e.npz")["embeddings"], expected, atol=1e-6)
    assert model.verify(files[0], files[0]).score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("batch, seconds", GRID)
def test_onnx_and_torchscript_match_pytorch(trained, batch, seconds):
    model = trained["model"]
    wavs = speech_like(batch, seconds, seed=batch)
    reference = model.embed_batch(torch.from_numpy(wavs), torch.ones(batch)).numpy()
    onnx_raw = OnnxSpeakerModel(trained["onnx"], threads=1).embed_batch(wavs)
    with torch.no_grad():
        scripted = trained["torchscript"](torch.from_numpy(wavs)).numpy()
    for got in (onnx_raw, scripted):
        assert got.shape == (batch, model.embedding_dim)
        assert min_cosine(reference, got) >= 0.9999
        assert np.abs(got - reference).max() <= 1e-3 * np.abs(reference).max()
