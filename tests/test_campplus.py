"""CAM++: published sizes, parity with WeSpeaker's and 3D-Speaker's own classes, both std modes, masking, registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import randomise_batchnorm
from qmargin_spk.models import build_backbone, build_embedder, count_parameters
from qmargin_spk.models.campplus import CAMPPlus, ContextMask, StatsPool
from qmargin_spk.models.registry import DescriptionError, check_compatible, embedding_dim

PAPER_PARAMETERS = 7_176_224  # CAM++ of both references, 80 features, 512-dim embedding
DEMO_PARAMETERS = 216_640  # hparams/backbones/campplus.yaml, setting demo_cpu
DEMO = {
    "architecture": "campplus",
    "feat_dim": 80,
    "embedding_dim": 128,
    "growth_rate": 16,
    "bn_size": 4,
    "init_channels": 64,
    "head_channels": 4,
    "block_layers": [3, 6, 4],
    "std_mode": "sqrt_var_eps",
}
FBANK = {"name": "fbank", "sample_rate": 16000, "n_mels": 80, "normalisation": "sentence_mean"}
HPARAMS = Path(__file__).resolve().parents[1] / "hparams"
# A narrow CAM++ on 24 features both references can build (their FCM head keeps 32 channels): parity on more
# lengths (segment-pooling boundaries at 100 frames after the stride-2 TDNN), fast.
NARROW = {"feat_dim": 24, "growth_rate": 4, "bn_size": 2, "init_channels": 16}


@pytest.fixture(scope="module")
def wespeaker_campplus(wespeaker_models) -> type:
    """WeSpeaker's ``CAMPPlus`` (conftest imports it without the package's CLI dependencies)."""
    return wespeaker_models.campplus.CAMPPlus


@pytest.fixture(scope="module")
def speakerlab_campplus() -> type:
    """3D-Speaker's ``CAMPPlus``."""
    module = pytest.importorskip(
        "speakerlab.models.campplus.DTDNN", reason="reference absent: pip install --no-deps speakerlab==0.0.6"
    )
    return module.CAMPPlus


def wespeaker_model(cls: type, **sizes) -> torch.nn.Module:
    return cls(embed_dim=sizes.pop("embedding_dim", 512), pooling_func="TSTP", **{"feat_dim": 80, **sizes})


def speakerlab_model(cls: type, **sizes) -> torch.nn.Module:
    return cls(embedding_size=sizes.pop("embedding_dim", 512), memory_efficient=False, **{"feat_dim": 80, **sizes})


def assert_same_embeddings(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert cosine.min().item() >= 0.99999
    assert ((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max().item() <= 1e-4


def test_campplus_has_the_published_parameter_count_and_both_references_keys(wespeaker_campplus, speakerlab_campplus):
    ours = CAMPPlus(feat_dim=80, embedding_dim=512)
    assert count_parameters(ours) == PAPER_PARAMETERS
    shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    for reference in (wespeaker_model(wespeaker_campplus), speakerlab_model(speakerlab_campplus)):
        assert count_parameters(reference) == PAPER_PARAMETERS
        assert {key: tuple(value.shape) for key, value in reference.state_dict().items()} == shapes


@pytest.mark.parametrize(
    ("family", "std_mode", "sizes", "frames"),
    [
        ("wespeaker", "sqrt_var_eps", {}, [100]),  # paper size on a short input
        ("speakerlab", "std", {}, [100]),
        ("wespeaker", "sqrt_var_eps", NARROW, [100, 237, 400]),
        ("speakerlab", "std", NARROW, [237]),
    ],
    ids=["wespeaker-paper", "3dspeaker-paper", "wespeaker-narrow", "3dspeaker-narrow"],
)
def test_campplus_with_reference_weights_gives_the_reference_embeddings(
    family, std_mode, sizes, frames, wespeaker_campplus, speakerlab_campplus
):
    torch.manual_seed(len(sizes))
    if family == "wespeaker":
        reference = wespeaker_model(wespeaker_campplus, **sizes)
    else:
        reference = speakerlab_model(speakerlab_campplus, **sizes)
    feat_dim = sizes.get("feat_dim", 80)
    randomise_batchnorm(reference, seed=len(frames), frames=60, feat_dim=feat_dim)
    ours = CAMPPlus(**{"feat_dim": 80, **sizes}, embedding_dim=512, std_mode=std_mode).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        for length in frames:
            feats = torch.randn(1, length, feat_dim)
            expected = reference(feats.clone())
            assert_same_embeddings(ours(feats).squeeze(1), expected)
            if not sizes:  # full relative lengths pool every frame, as no lengths do
                assert_same_embeddings(ours(feats, torch.ones(1)).squeeze(1), expected)


def test_std_modes_differ_only_where_a_pooled_channel_is_constant(wespeaker_campplus, speakerlab_campplus):
    from speakerlab.models.campplus.layers import statistics_pooling
    from wespeaker.models.pooling_layers import TSTP

    frames = torch.randn(2, 6, 50)
    frames[:, 3] = 0.7  # one constant channel
    for mode, oracle in (("sqrt_var_eps", TSTP()), ("std", statistics_pooling)):
        torch.testing.assert_close(StatsPool(mode)(frames), oracle(frames))
    eps_stats, plain_stats = StatsPool("sqrt_var_eps")(frames), StatsPool("std")(frames)
    assert torch.allclose(eps_stats[:, 6 + 3], torch.full((2,), 1e-7**0.5)) and (plain_stats[:, 6 + 3] == 0).all()
    varying = [i for i in range(12) if i != 6 + 3]
    torch.testing.assert_close(eps_stats[:, varying], plain_stats[:, varying], rtol=1e-4, atol=1e-6)

    # In the whole network: a last BatchNorm bias far below zero makes that channel 0 after the ReLU.
    torch.manual_seed(5)
    wespeaker, speakerlab = (
        wespeaker_model(wespeaker_campplus, **NARROW),
        speakerlab_model(speakerlab_campplus, **NARROW),
    )
    randomise_batchnorm(wespeaker, seed=5, feat_dim=24, frames=60)
    with torch.no_grad():
        wespeaker.xvector.out_nonlinear.batchnorm.bias[0] = -1e4
    speakerlab.load_state_dict(wespeaker.state_dict())
    speakerlab.eval()
    feats = torch.randn(2, 60, 24)
    with torch.no_grad():
        embeddings = {}
        for mode, reference in (("sqrt_var_eps", wespeaker), ("std", speakerlab)):
            ours = CAMPPlus(embedding_dim=512, std_mode=mode, **NARROW).eval()
            ours.load_state_dict(wespeaker.state_dict())
            embeddings[mode] = ours(feats).squeeze(1)
            torch.testing.assert_close(embeddings[mode], reference(feats), rtol=1e-4, atol=1e-5)
    gap = (embeddings["sqrt_var_eps"] - embeddings["std"]).abs().max().item()
    assert gap > 1e-5


def test_plain_std_mode_has_no_gradient_on_a_constant_channel_and_the_eps_mode_has_one():
    for mode, finite in (("sqrt_var_eps", True), ("std", False)):
        frames = torch.randn(1, 3, 20)
        frames[0, 1] = 0.0
        frames.requires_grad_(True)
        StatsPool(mode)(frames).sum().backward()
        assert bool(torch.isfinite(frames.grad).all()) is finite


def test_relative_lengths_make_a_zero_padded_input_act_as_the_unpadded_one():
    torch.manual_seed(0)
    layer = ContextMask(bn_channels=6, out_channels=4, kernel_size=3, dilation=2)
    kept, total = 130, 260  # the second segment is partial, the third all padding
    frames = torch.randn(1, 6, kept)
    padded = torch.cat([frames, torch.zeros(1, 6, total - kept)], dim=-1)
    mask = (torch.arange(total) < kept).float()[None, None]
    with torch.no_grad():
        torch.testing.assert_close(layer(padded, mask)[..., :kept], layer(frames), rtol=1e-5, atol=1e-6)
        stats = StatsPool("std")(padded + 3.0 * (1 - mask), mask)  # padding values are ignored
    reference = frames.double()
    expected = torch.cat([reference.mean(-1), reference.std(-1)], dim=1).float()
    torch.testing.assert_close(stats, expected, rtol=1e-5, atol=1e-6)


def test_registry_builds_the_demo_campplus_and_checks_its_settings():
    model = build_backbone(DEMO)
    assert isinstance(model, CAMPPlus) and count_parameters(model) == DEMO_PARAMETERS
    assert embedding_dim(DEMO) == 128
    check_compatible(FBANK, DEMO)
    with pytest.raises(DescriptionError, match="std_mode"):
        build_backbone({key: value for key, value in DEMO.items() if key != "std_mode"})
    with pytest.raises(DescriptionError, match="feat_dim"):
        check_compatible({**FBANK, "n_mels": 40}, DEMO)
    with pytest.raises(ValueError, match="std_mode"):
        build_backbone({**DEMO, "std_mode": "population"})
    embedder = build_embedder(FBANK, model).eval()
    with torch.no_grad():
        embeddings = embedder(torch.randn(3, 8000), torch.tensor([1.0, 0.8, 0.5]))
    assert embeddings.shape == (3, 128) and torch.isfinite(embeddings).all()


def test_campplus_backbone_fragment_composes_with_the_demo_setting():
    from qmargin_spk.stages.experiment import composed_hparams

    hparams = composed_hparams(HPARAMS / "demo_cpu_aam.yaml", choices={"backbone": "campplus"})
    assert hparams["backbone_description"] == DEMO
    assert count_parameters(hparams["embedding_model"]) == DEMO_PARAMETERS
    assert np.isclose(hparams["embedding_dim"], 128)


@pytest.mark.parametrize("loss", ["qmargin", "aam"])
def test_campplus_demo_experiment_composes_and_takes_a_training_step(loss):
    from conftest import assert_demo_experiment_takes_a_training_step

    experiment = HPARAMS / f"demo_cpu_campplus_{loss}.yaml"
    assert_demo_experiment_takes_a_training_step(experiment, loss, DEMO, CAMPPlus, DEMO_PARAMETERS)


def test_speechbrain_hparams_build_the_registered_campplus():
    from hyperpyyaml import load_hyperpyyaml

    from qmargin_spk.models.registry import speechbrain_hparams

    loaded = load_hyperpyyaml(speechbrain_hparams(FBANK, DEMO))
    model = loaded["embedding_model"]
    assert isinstance(model, CAMPPlus) and count_parameters(model) == DEMO_PARAMETERS
    assert model.xvector["stats"].std_mode == DEMO["std_mode"]
    reference = build_backbone(DEMO)
    randomise_batchnorm(reference, seed=4, frames=60)
    model.load_state_dict(reference.state_dict(), strict=True)
    wavs = torch.randn(2, 8000)
    with torch.no_grad():
        feats = loaded["mean_var_norm"](loaded["compute_features"](wavs), torch.ones(2))
        expected = build_embedder(FBANK, reference).eval()(wavs, torch.ones(2))
        torch.testing.assert_close(model.eval()(feats, torch.ones(2)).squeeze(1), expected)


@pytest.fixture(scope="module")
def packaged_demo(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A random-weight demo CAM++ (random BatchNorm statistics) packaged as a model folder."""
    from qmargin_spk.inference import package_model

    torch.manual_seed(1)
    backbone = build_backbone(DEMO)
    randomise_batchnorm(backbone, seed=1, frames=60)
    folder = package_model(
        tmp_path_factory.mktemp("campplus") / "model", FBANK, DEMO, backbone.state_dict(), {"code_version": "test"}
    )
    return folder, backbone


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_packaged_campplus_gives_the_same_embedding_in_speaker_model_and_speechbrain(
    packaged_demo, tmp_path, monkeypatch
):
    from speechbrain.inference.speaker import EncoderClassifier

    from qmargin_spk.inference import SpeakerModel, read_model_info

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, backbone = packaged_demo
    assert read_model_info(folder)["backbone"]["std_mode"] == "sqrt_var_eps"
    wav = 0.1 * torch.randn(12000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = build_embedder(FBANK, backbone).eval()(wav[None], torch.ones(1))[0].numpy()
    ours = SpeakerModel.from_folder(folder).embed(wav.numpy())[0]
    classifier = EncoderClassifier.from_hparams(source=str(folder), savedir=str(tmp_path / "sb"))
    theirs = classifier.encode_batch(wav[None]).squeeze(1)[0].detach().numpy()
    assert cosine(ours, expected) >= 0.9999 and cosine(theirs, expected) >= 0.9999


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_exported_onnx_campplus_gives_the_pytorch_embeddings(packaged_demo, tmp_path):
    pytest.importorskip("onnxruntime")
    from qmargin_spk.inference import SpeakerModel, export_onnx
    from qmargin_spk.inference.onnx_runtime import OnnxSpeakerModel

    model = SpeakerModel.from_folder(packaged_demo[0])
    runtime = OnnxSpeakerModel(export_onnx(model, tmp_path / "campplus.onnx"), threads=1)
    generator = np.random.default_rng(3)
    wavs = [0.1 * generator.standard_normal(samples).astype(np.float32) for samples in (8000, 27000)]
    for wav in wavs:  # 0.5 s and 1.7 s: the second crosses a context segment boundary
        expected = model.embed_batch(torch.from_numpy(wav)[None], torch.ones(1)).numpy()[0]
        assert cosine(runtime.embed([wav])[0], expected) >= 0.9999
