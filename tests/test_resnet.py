"""ResNet34 (WeSpeaker layout): published sizes, parity with WeSpeaker's own class, registry and YAML entries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from conftest import randomise_batchnorm
from qmargin_spk.models import build_backbone, build_embedder, count_parameters
from qmargin_spk.models.registry import check_compatible, embedding_dim, speechbrain_hparams
from qmargin_spk.models.resnet import ResNetSpeaker, wespeaker_state_dict

FULL_PARAMETERS = 6_634_336  # WeSpeaker ResNet34-TSTP-emb256 (feat_dim 80, 32 base channels)
DEMO_PARAMETERS = 662_296  # the same with 8 base channels
SMALL = {"architecture": "resnet34", "feat_dim": 80, "embedding_dim": 256, "base_channels": 8}
TINY = {**SMALL, "embedding_dim": 32, "base_channels": 4, "num_blocks": [1, 1, 1, 1]}  # fast plumbing checks
FBANK = {"name": "fbank", "sample_rate": 16000, "n_mels": 80, "normalisation": "sentence_mean"}
WESPEAKER_FBANK = {
    "name": "kaldi_fbank",
    "sample_rate": 16000,
    "n_mels": 80,
    "window_type": "hamming",
    "scale_to_int16": True,
}
HPARAMS = Path(__file__).resolve().parents[1] / "hparams"


@pytest.fixture(scope="module")
def wespeaker_resnet(wespeaker_models):
    """WeSpeaker's ``wespeaker.models.resnet`` module (conftest imports it without its CLI dependencies)."""
    return wespeaker_models.resnet


def as_wespeaker_checkpoint(state_dict: dict, classes: int = 7) -> dict:
    """What WeSpeaker's averaged checkpoints hold: the loss's projection too, float ``num_batches_tracked``."""
    out = {key: value.float() if key.endswith("num_batches_tracked") else value for key, value in state_dict.items()}
    embedding = state_dict["seg_1.weight"].shape[0]
    return {**out, "projection.weight": torch.randn(classes, embedding)}


def assert_same_embeddings(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cosine.min().item() >= 0.99999
    assert ((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max().item() <= 1e-4


def test_resnet34_has_the_published_parameter_counts():
    assert count_parameters(ResNetSpeaker(feat_dim=80, embedding_dim=256, base_channels=32)) == FULL_PARAMETERS
    assert count_parameters(build_backbone(SMALL)) == DEMO_PARAMETERS


def test_resnet34_state_dict_matches_wespeaker_keys_and_shapes(wespeaker_resnet):
    reference = wespeaker_resnet.ResNet34(feat_dim=80, embed_dim=256, pooling_func="TSTP", two_emb_layer=False)
    theirs = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    ours = {key: tuple(value.shape) for key, value in ResNetSpeaker().state_dict().items()}
    assert ours == theirs
    assert count_parameters(reference) == FULL_PARAMETERS


@pytest.mark.parametrize(
    ("base_channels", "batch", "frames"),
    [(32, 1, [100, 237]), (8, 2, [100, 237, 400])],  # full size on two short inputs, the demo size on more
    ids=["full", "demo"],
)
def test_resnet34_with_wespeaker_weights_gives_wespeaker_embeddings(wespeaker_resnet, base_channels, batch, frames):
    torch.manual_seed(base_channels)
    reference = wespeaker_resnet.ResNet(
        wespeaker_resnet.BasicBlock, [3, 4, 6, 3], m_channels=base_channels, feat_dim=80, embed_dim=256
    )
    randomise_batchnorm(reference, seed=base_channels, frames=100)
    ours = ResNetSpeaker(feat_dim=80, embedding_dim=256, base_channels=base_channels).eval()
    ours.load_state_dict(wespeaker_state_dict(as_wespeaker_checkpoint(reference.state_dict())), strict=True)
    with torch.no_grad():
        for length in frames:
            feats = torch.randn(batch, length, 80)
            _, expected = reference(feats.clone())
            assert_same_embeddings(ours(feats).squeeze(1), expected)
            if base_channels == 8:  # full relative lengths pool every frame, as no lengths do
                assert_same_embeddings(ours(feats, torch.ones(batch)).squeeze(1), expected)


def test_resnet34_pools_only_the_frames_within_each_length():
    model = build_backbone(TINY).eval()
    randomise_batchnorm(model, seed=3, frames=100)
    feats = torch.randn(2, 160, 80)
    with torch.no_grad():
        embeddings = model(feats, torch.tensor([1.0, 0.5])).squeeze(1).numpy()
        maps = model.frame_features(feats).flatten(1, 2).numpy().astype(np.float64)  # [B, C * F/8, 20 frames]
        weight, bias = model.seg_1.weight.numpy().astype(np.float64), model.seg_1.bias.numpy().astype(np.float64)
    for item, kept in ((0, 20), (1, 10)):
        frames = maps[item, :, :kept]
        stats = np.concatenate([frames.mean(axis=1), np.sqrt(frames.var(axis=1, ddof=1) + 1e-7)])
        np.testing.assert_allclose(embeddings[item], weight @ stats + bias, rtol=1e-4, atol=1e-4)


def test_registry_describes_resnet34_sizes_and_input():
    assert embedding_dim(SMALL) == 256
    check_compatible(FBANK, SMALL)
    with pytest.raises(ValueError, match="feat_dim"):
        check_compatible({**FBANK, "n_mels": 40}, SMALL)
    embedder = build_embedder(FBANK, build_backbone(TINY)).eval()
    with torch.no_grad():
        assert embedder(torch.randn(3, 8000), torch.ones(3)).shape == (3, 32)


@pytest.mark.parametrize("frontend", [FBANK, WESPEAKER_FBANK], ids=["speechbrain_fbank", "kaldi_fbank"])
def test_speechbrain_hparams_build_the_registered_resnet34(frontend):
    loaded = load_hyperpyyaml(speechbrain_hparams(frontend, TINY))
    model = loaded["embedding_model"]
    assert isinstance(model, ResNetSpeaker)
    assert count_parameters(model) == count_parameters(build_backbone(TINY))
    reference = build_backbone(TINY).eval()
    model.load_state_dict(reference.state_dict())
    wavs = torch.randn(2, 8000)
    with torch.no_grad():
        feats = loaded["mean_var_norm"](loaded["compute_features"](wavs), torch.ones(2))
        expected = build_embedder(frontend, reference).eval()(wavs, torch.ones(2))
        torch.testing.assert_close(model.eval()(feats, torch.ones(2)).squeeze(1), expected)


@pytest.mark.parametrize("loss", ["qmargin", "aam"])
def test_resnet34_demo_experiment_composes_and_takes_a_training_step(loss):
    from conftest import assert_demo_experiment_takes_a_training_step

    experiment = HPARAMS / f"demo_cpu_resnet34_{loss}.yaml"
    assert_demo_experiment_takes_a_training_step(experiment, loss, SMALL, ResNetSpeaker, DEMO_PARAMETERS)


@pytest.mark.parametrize("frontend", [FBANK, WESPEAKER_FBANK], ids=["speechbrain_fbank", "kaldi_fbank"])
def test_packaged_resnet34_gives_the_same_embedding_in_speaker_model_and_speechbrain(frontend, tmp_path, monkeypatch):
    from speechbrain.inference.speaker import EncoderClassifier

    from qmargin_spk.inference import SpeakerModel, package_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    backbone = build_backbone(TINY)
    randomise_batchnorm(backbone, seed=1, frames=100)
    folder = package_model(tmp_path / "resnet", frontend, TINY, backbone.state_dict(), {"code_version": "test"})
    wav = 0.1 * torch.randn(12000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = build_embedder(frontend, backbone).eval()(wav[None], torch.ones(1))[0].numpy()
    ours = SpeakerModel.from_folder(folder).embed(wav.numpy())[0]
    classifier = EncoderClassifier.from_hparams(source=str(folder), savedir=str(tmp_path / "sb"))
    theirs = classifier.encode_batch(wav[None]).squeeze(1)[0].detach().numpy()
    for embedding in (ours, theirs):
        cosine = float(embedding @ expected / np.linalg.norm(embedding) / np.linalg.norm(expected))
        assert cosine >= 0.9999


def test_resnet34_on_kaldi_fbank_needs_two_pooled_frames():
    from qmargin_spk.models import shortest_input

    # 9 Kaldi frames (400 + 8 * 160 samples) give 2 frames after the three stride-2 stages: a standard deviation.
    embedder = build_embedder(WESPEAKER_FBANK, build_backbone(TINY))
    assert shortest_input(embedder, 16000) == 400 + 8 * 160


def test_resnet34_on_kaldi_fbank_exports_to_onnx_with_the_same_embedding(tmp_path):
    pytest.importorskip("onnxruntime")
    from qmargin_spk.inference import SpeakerModel, package_model
    from qmargin_spk.inference.export import export_onnx
    from qmargin_spk.inference.onnx_runtime import OnnxSpeakerModel

    torch.manual_seed(4)
    backbone = build_backbone(TINY)
    randomise_batchnorm(backbone, seed=4, frames=100)
    folder = package_model(tmp_path / "resnet", WESPEAKER_FBANK, TINY, backbone.state_dict(), {"min_samples": 1680})
    model = SpeakerModel.from_folder(folder)
    path = export_onnx(model, tmp_path / "resnet.onnx")
    wavs = [0.1 * torch.randn(n, generator=torch.Generator().manual_seed(n)).numpy() for n in (4000, 9000)]
    cosines = np.sum(OnnxSpeakerModel(path).embed(wavs) * model.embed(wavs), axis=1)  # both unit rows
    assert cosines.min() >= 0.9999


def test_resnet34_embedder_on_kaldi_fbank_reproduces_wespeakers_pipeline(wespeaker_resnet):
    kaldi = pytest.importorskip("torchaudio.compliance.kaldi")
    torch.manual_seed(5)
    reference = wespeaker_resnet.ResNet(
        wespeaker_resnet.BasicBlock, [3, 4, 6, 3], m_channels=8, feat_dim=80, embed_dim=256
    )
    randomise_batchnorm(reference, seed=5, frames=100)
    ours = build_backbone(SMALL)
    ours.load_state_dict(wespeaker_state_dict(reference.state_dict()))
    wav = 0.1 * torch.randn(16000, generator=torch.Generator().manual_seed(5))
    wav[3000:9000] = 0.0  # digital silence: where a wrong amplitude scale would show through the energy floor
    # WeSpeaker's extraction: int16-range samples, Kaldi fbank (hamming, no dither), per-utterance mean subtraction.
    feats = kaldi.fbank(
        wav[None] * 32768, num_mel_bins=80, frame_length=25, frame_shift=10, dither=0.0, window_type="hamming"
    )
    with torch.no_grad():
        _, expected = reference((feats - feats.mean(dim=0))[None])
        embedding = build_embedder(WESPEAKER_FBANK, ours).eval()(wav[None], torch.ones(1))
    assert torch.nn.functional.cosine_similarity(embedding, expected).item() >= 0.99999
