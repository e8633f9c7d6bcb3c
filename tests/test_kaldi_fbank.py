"""The exportable Kaldi filterbank against torchaudio's Kaldi port, in PyTorch and through ONNX Runtime."""

from __future__ import annotations

import pytest
import torch

from qmargin_spk.models import build_frontend
from qmargin_spk.models.kaldi_fbank import KaldiFbank

kaldi = pytest.importorskip("torchaudio.compliance.kaldi", reason="torchaudio is the reference Kaldi fbank")

SR = 16000


def speech_like(samples: int, seed: int, silence: tuple[int, int] | None = None) -> torch.Tensor:
    """Tones, noise and a DC offset in [-1, 1]; ``silence`` = (start, end) set to exact zeros."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / SR
    wav = 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.1 * torch.sin(2 * torch.pi * 3100 * t + 1.0)
    wav = wav + 0.05 * torch.randn(samples, generator=generator) + 0.01
    if silence is not None:
        wav[silence[0] : silence[1]] = 0.0
    return wav


def reference(wav: torch.Tensor, window_type: str, scale: float) -> torch.Tensor:
    return kaldi.fbank((wav * scale)[None], num_mel_bins=80, window_type=window_type, dither=0.0)


def assert_close_features(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours.shape == expected.shape
    assert ((ours - expected).norm() / expected.norm()).item() <= 1e-5
    assert (ours - expected).abs().max().item() <= 1e-3


@pytest.mark.parametrize(
    ("window_type", "scale_to_int16"),
    [("hamming", True), ("povey", False)],  # WeSpeaker's and 3D-Speaker's front-ends
)
def test_kaldi_fbank_matches_torchaudio_with_digital_silence(window_type, scale_to_int16):
    module = KaldiFbank(sample_rate=SR, n_mels=80, window_type=window_type, scale_to_int16=scale_to_int16).eval()
    wavs = [speech_like(8000, 0, silence=(2000, 5500)), speech_like(8000, 1)]
    ours = module(torch.stack(wavs))
    for row, wav in zip(ours, wavs):
        assert_close_features(row, reference(wav, window_type, 32768.0 if scale_to_int16 else 1.0))
    floor = torch.log(torch.tensor(torch.finfo(torch.float32).eps))
    assert torch.isclose(ours[0, 20], floor.expand(80)).all()  # a frame inside the silence sits on the energy floor


@pytest.mark.parametrize("samples", [400, 559, 560, 4321])
def test_kaldi_fbank_frame_count_follows_snip_edges(samples):
    ours = KaldiFbank(window_type="hamming").eval()(speech_like(samples, 2)[None])
    assert ours.shape[1] == reference(speech_like(samples, 2), "hamming", 1.0).shape[0] == 1 + (samples - 400) // 160


def test_kaldi_fbank_dithers_only_in_training():
    module = KaldiFbank(window_type="hamming", dither=1.0, scale_to_int16=True)
    wav = speech_like(3200, 3)[None]
    assert not torch.equal(module.train()(wav), module(wav))
    assert torch.equal(module.eval()(wav), module(wav))
    assert_close_features(module(wav)[0], reference(wav[0], "hamming", 32768.0))


def test_registry_builds_kaldi_fbank_with_sentence_mean():
    description = {"name": "kaldi_fbank", "sample_rate": SR, "n_mels": 80, "window_type": "povey"}
    features, norm = build_frontend({**description, "normalisation": "sentence_mean"})
    wav = speech_like(4000, 4)
    feats = norm(features.eval()(wav[None]), torch.ones(1))[0]
    expected = reference(wav, "povey", 1.0)
    assert_close_features(feats + expected.mean(dim=0), expected)
    assert feats.mean(dim=0).abs().max().item() < 1e-4


def test_kaldi_fbank_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    module = KaldiFbank(window_type="hamming", scale_to_int16=True).eval()
    path = tmp_path / "fbank.onnx"
    with torch.no_grad():
        torch.onnx.export(
            module,
            (torch.zeros(2, 4000),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["wav"],
            output_names=["feats"],
            dynamic_axes={"wav": {0: "batch", 1: "samples"}, "feats": {0: "batch", 1: "frames"}},
        )
    wavs = torch.stack([speech_like(6000, 5, silence=(1000, 3000)), speech_like(6000, 6)])
    (onnx_feats,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"wav": wavs.numpy()})
    expected = torch.stack([reference(wav, "hamming", 32768.0) for wav in wavs])
    assert onnx_feats.shape == tuple(expected.shape)
    assert (torch.from_numpy(onnx_feats) - expected).abs().max().item() <= 1e-3
