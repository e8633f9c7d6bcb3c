"""ONNX / TorchScript export: parity with the PyTorch model, features in the graph, int8, onnxruntime without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from conftest import speech_like  # noqa: E402
from qmargin_spk.inference import SpeakerModel, export_onnx, export_torchscript  # noqa: E402
from qmargin_spk.inference.export import ExportableFbank  # noqa: E402
from qmargin_spk.inference.onnx_runtime import OnnxSpeakerModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SR = 16000
# Every batch size and every duration at least once, without the slow 8 x 20 s corner.
GRID = [(1, 0.5), (1, 20.0), (3, 2.7), (3, 20.0), (8, 0.5), (8, 2.7)]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    model = SpeakerModel.from_folder(tiny_model[0])
    return {
        "model": model,
        "onnx": export_onnx(model, out / "m.onnx"),
        "int8": export_onnx(model, out / "m.int8.onnx", quantize="int8"),
        "torchscript": torch.jit.load(str(export_torchscript(model, out / "m.pt"))),
    }


def raw_pytorch(model, wavs):
    return model.embed_batch(torch.from_numpy(wavs), torch.ones(len(wavs))).numpy()


def assert_parity(reference, candidate, min_cosine):
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cosines = np.sum(unit(reference.astype(np.float64)) * unit(candidate.astype(np.float64)), axis=1)
    assert cosines.min() >= min_cosine
    return cosines


def test_the_exportable_front_end_equals_speechbrain_fbank(exported):
    fbank = exported["model"].embedder.compute_features
    wavs = torch.from_numpy(np.r_[speech_like(2, 1.3, 0), 1e-4 * speech_like(1, 1.3, 1)])
    expected = fbank(wavs)
    got = ExportableFbank(fbank)(wavs)
    assert got.shape == expected.shape == (3, 1 + wavs.shape[1] // 160, 80)
    assert (got - expected).abs().max().item() < 5e-3  # dB, on values spanning 80 dB


@pytest.mark.parametrize("batch, seconds", GRID)
def test_onnx_matches_pytorch(exported, batch, seconds):
    model = exported["model"]
    wavs = speech_like(batch, seconds, seed=batch)
    runtime = OnnxSpeakerModel(exported["onnx"], threads=1)
    reference = raw_pytorch(model, wavs)
    onnx_raw = runtime.embed_batch(wavs)
    assert onnx_raw.shape == (batch, model.embedding_dim)
    assert_parity(reference, onnx_raw, 0.9999)
    # Random weights put all embeddings close together, so also bound the raw difference.
    assert np.abs(onnx_raw - reference).max() <= 1e-3 * np.abs(reference).max()
    np.testing.assert_allclose(runtime.embed(list(wavs)), model.embed(list(wavs)), atol=1e-4)


@pytest.mark.parametrize("batch, seconds", GRID)
def test_torchscript_matches_pytorch(exported, batch, seconds):
    model = exported["model"]
    wavs = speech_like(batch, seconds, seed=10 + batch)
    with torch.no_grad():
        got = exported["torchscript"](torch.from_numpy(wavs)).numpy()
    reference = raw_pytorch(model, wavs)
    assert_parity(reference, got, 0.9999)
    assert np.abs(got - reference).max() <= 1e-3 * np.abs(reference).max()


def test_int8_quantises_the_network_but_not_the_front_end(exported):
    import onnx

    graph = onnx.load(str(exported["int8"])).graph
    front_end = [node.op_type for node in graph.node if node.name.startswith("/front_end/")]
    assert "Conv" in front_end and "ConvInteger" not in front_end
    assert any(node.op_type in ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear") for node in graph.node)
    runtime = OnnxSpeakerModel(exported["int8"])
    assert runtime.metadata["quantization"] == "int8"
    wavs = speech_like(3, 2.0, seed=5)
    assert_parity(raw_pytorch(exported["model"], wavs), runtime.embed_batch(wavs), 0.999)


def test_onnx_metadata_and_unequal_lengths(exported):
    runtime = OnnxSpeakerModel(exported["onnx"])
    assert runtime.sample_rate == SR and runtime.embedding_dim == 16
    assert runtime.metadata["checkpoint_sha256"] == exported["model"].info["checkpoint_sha256"]
    wavs = [speech_like(1, seconds, seed=i)[0] for i, seconds in enumerate((0.5, 20.0, 3.0, 0.5))]
    np.testing.assert_allclose(runtime.embed(wavs, batch_size=3), exported["model"].embed(wavs), atol=1e-4)
    with pytest.raises(ValueError, match="waveform 1"):
        runtime.embed([wavs[0], np.zeros((2, 10), np.float32)])


def test_exports_carry_the_identity_of_the_model_folder(tiny_model, exported, tmp_path):
    identity = json.loads((tiny_model[0] / "model.json").read_text())["model_identity"]
    assert OnnxSpeakerModel(exported["onnx"]).identity == identity
    assert OnnxSpeakerModel(exported["int8"]).identity == identity  # the model it was quantised from
    extra = {"model.json": ""}
    torch.jit.load(str(export_torchscript(exported["model"], tmp_path / "m.pt")), _extra_files=extra)
    assert json.loads(extra["model.json"])["model_identity"] == identity


def test_onnx_runs_with_torch_blocked(exported, tmp_path):
    wavs = speech_like(2, 1.0, seed=7)
    np.save(tmp_path / "wavs.npy", wavs)
    np.save(tmp_path / "expected.npy", exported["model"].embed(list(wavs)))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        from qmargin_spk.inference.onnx_runtime import OnnxSpeakerModel
        model = OnnxSpeakerModel({str(exported["onnx"])!r}, threads=1)
        got = model.embed(list(np.load({str(tmp_path / "wavs.npy")!r})))
        expected = np.load({str(tmp_path / "expected.npy")!r})
        assert np.abs(got - expected).max() < 1e-4, np.abs(got - expected).max()
        assert not [name for name, module in sys.modules.items() if name.startswith("torch") and module is not None]
        print("ok without torch")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "ok without torch" in result.stdout


def test_export_rejects_unknown_quantisation(exported, tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        export_onnx(exported["model"], tmp_path / "x.onnx", quantize="int4")
