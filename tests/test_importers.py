"""`qmargin-spk import`: published SpeechBrain / WeSpeaker / 3D-Speaker folders give the references' embeddings.

Each published layout is built from the reference project's own class (random weights, BatchNorm statistics
randomised), written as the project publishes it, imported with the CLI, and the imported folder's
``SpeakerModel.embed`` is compared with the reference's own front-end + forward on the same waveforms
(one with a stretch of exact zeros, where the fbank energy floor shows a wrong amplitude scale).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import randomise_batchnorm
from qmargin_spk.cli import main
from qmargin_spk.inference import SpeakerModel
from qmargin_spk.models.resnet import ResNetSpeaker

SR = 16000
MIN_COSINE = 0.9999


def waveforms() -> list[torch.Tensor]:
    """1.2 s of a tone in noise, and the same with 0.3 s of exact zeros in the middle."""
    generator = torch.Generator().manual_seed(0)
    t = torch.arange(int(1.2 * SR)) / SR
    wav = 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.randn(t.shape, generator=generator)
    silent = wav.clone()
    silent[int(0.4 * SR) : int(0.7 * SR)] = 0.0
    return [wav, silent]


def import_cli(source_format: str, source: Path, out: Path, capsys) -> tuple[int, str, str]:
    status = main(["import", source_format, str(source), "--out", str(out)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def cosines(out: Path, reference) -> list[float]:
    """Cosine of the imported folder's embedding and ``reference(wav)`` for each test waveform."""
    model = SpeakerModel.from_folder(out)
    values = []
    for wav in waveforms():
        ours = torch.from_numpy(model.embed(wav.numpy())[0])
        with torch.no_grad():
            theirs = reference(wav).reshape(-1)
        values.append(torch.nn.functional.cosine_similarity(ours, theirs, dim=0).item())
    return values


def wespeaker_reference(model: torch.nn.Module, returns_pair: bool):
    """WeSpeaker's inference: Kaldi fbank of int16-range samples, hamming window, no dither, mean subtraction."""
    import torchaudio

    def embed(wav: torch.Tensor) -> torch.Tensor:
        feats = torchaudio.compliance.kaldi.fbank(
            wav[None] * 32768, num_mel_bins=80, frame_length=25, frame_shift=10, dither=0.0,
            sample_frequency=SR, window_type="hamming",
        )  # fmt: skip
        output = model((feats - feats.mean(0, keepdim=True))[None])
        return output[-1] if returns_pair else output

    return embed


def write_wespeaker(folder: Path, model: str, model_args: dict, state_dict: dict, classes: int = 5) -> Path:
    """A WeSpeaker model-zoo folder: ``avg_model.pt`` (projection, float counters) + ``config.yaml``."""
    folder.mkdir(parents=True)
    weights = {
        key: value.float() if key.endswith("num_batches_tracked") else value for key, value in state_dict.items()
    }
    weights["projection.weight"] = torch.randn(classes, model_args["embed_dim"])
    torch.save(weights, folder / "avg_model.pt")
    lines = [
        f"model: {model}",
        "model_args:",
        *[f"  {key}: {json.dumps(value)}" for key, value in model_args.items()],
        "dataset_args:",
        "  resample_rate: 16000",
        "  fbank_args:",
        "    num_mel_bins: 80",
        "    frame_length: 25",
        "    frame_shift: 10",
        "    dither: 1.0",
        "projection_args:",
        "  project_type: arc_margin",
        "  scale: 32.0",
    ]
    (folder / "config.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_wespeaker_resnet34_imports_and_gives_wespeaker_embeddings(wespeaker_models, tmp_path, capsys):
    torch.manual_seed(1)
    reference = wespeaker_models.resnet.ResNet(
        wespeaker_models.resnet.BasicBlock, [3, 4, 6, 3], m_channels=8, feat_dim=80, embed_dim=64
    )
    randomise_batchnorm(reference, seed=1)
    args = {"feat_dim": 80, "embed_dim": 64, "pooling_func": "TSTP", "two_emb_layer": False}
    source = write_wespeaker(tmp_path / "wespeaker_resnet34", "ResNet34", args, reference.state_dict())
    (source / "LICENSE").write_text("Apache License\nVersion 2.0\n", encoding="utf-8")
    status, out, err = import_cli("wespeaker", source, tmp_path / "model", capsys)
    assert status == 0, err
    digest = hashlib.sha256((source / "avg_model.pt").read_bytes()).hexdigest()
    assert f"source sha256: {digest}" in out and str(tmp_path / "model") in out
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["source"] == str(source) and info["source_format"] == "wespeaker"
    assert info["source_sha256"] == digest and info["license"] == "LICENSE: Apache License"
    assert info["frontend"]["window_type"] == "hamming" and info["frontend"]["scale_to_int16"] is True
    assert info["frontend"]["dither"] == 0.0 and info["backbone"]["base_channels"] == 8
    assert "licence: LICENSE: Apache License" in (tmp_path / "model" / "README.md").read_text()
    values = cosines(tmp_path / "model", wespeaker_reference(reference, returns_pair=True))
    print(f"wespeaker resnet34 cosines {values}")
    assert min(values) >= MIN_COSINE


def test_wespeaker_campplus_imports_and_gives_wespeaker_embeddings(wespeaker_models, tmp_path, capsys):
    torch.manual_seed(2)
    sizes = {"growth_rate": 8, "bn_size": 2, "init_channels": 32}
    reference = wespeaker_models.campplus.CAMPPlus(feat_dim=80, embed_dim=64, pooling_func="TSTP", **sizes)
    randomise_batchnorm(reference, seed=2)
    args = {"feat_dim": 80, "embed_dim": 64, "pooling_func": "TSTP", **sizes}
    source = write_wespeaker(tmp_path / "wespeaker_campplus", "CAMPPlus", args, reference.state_dict())
    status, _, err = import_cli("wespeaker", source, tmp_path / "model", capsys)
    assert status == 0, err
    values = cosines(tmp_path / "model", wespeaker_reference(reference, returns_pair=False))
    print(f"wespeaker campplus cosines {values}")
    assert min(values) >= MIN_COSINE


def write_3dspeaker(folder: Path, state_dict: dict, model_type: str = "cam++-sv", model_config: dict | None = None):
    """A ModelScope 3D-Speaker folder: ``configuration.json`` naming the type and the ``.bin`` state dict."""
    folder.mkdir(parents=True)
    torch.save(state_dict, folder / "campplus_cn_common.bin")
    configuration = {
        "framework": "pytorch",
        "task": "speaker-verification",
        "model": {
            "type": model_type,
            "model_config": model_config or {"sample_rate": 16000, "fbank_dim": 80},
            "pretrained_model": "campplus_cn_common.bin",
            "yesOrno_thr": 0.31,
        },
    }
    (folder / "configuration.json").write_text(json.dumps(configuration, indent=2), encoding="utf-8")
    return folder


def test_3dspeaker_campplus_imports_and_gives_3dspeaker_embeddings(tmp_path, capsys):
    dtdnn = pytest.importorskip(
        "speakerlab.models.campplus.DTDNN", reason="reference absent: pip install --no-deps speakerlab==0.0.6"
    )
    processor = pytest.importorskip("speakerlab.process.processor", reason="speakerlab's FBank needs scipy")
    torch.manual_seed(3)
    reference = dtdnn.CAMPPlus(
        feat_dim=80, embedding_size=48, growth_rate=8, bn_size=2, init_channels=32, memory_efficient=False
    )
    randomise_batchnorm(reference, seed=3)
    source = write_3dspeaker(tmp_path / "speech_campplus_sv", reference.state_dict())  # no emb_size: from shapes
    status, out, err = import_cli("3dspeaker", source, tmp_path / "model", capsys)
    assert status == 0, err
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["embedding_dim"] == 48 and info["backbone"]["std_mode"] == "std"
    assert info["frontend"]["window_type"] == "povey" and info["frontend"]["scale_to_int16"] is False
    assert info["source_sha256"] == hashlib.sha256((source / "campplus_cn_common.bin").read_bytes()).hexdigest()
    fbank = processor.FBank(80, SR, mean_nor=True)
    values = cosines(tmp_path / "model", lambda wav: reference(fbank(wav[None])[None]))
    print(f"3dspeaker campplus cosines {values}")
    assert min(values) >= MIN_COSINE


SPEECHBRAIN_HPARAMS = """\
# ECAPA for speaker verification, as spkrec-ecapa-voxceleb lays it out (small channels)
n_mels: 80
pretrained_path: speechbrain/spkrec-ecapa-voxceleb
out_n_neurons: 7

compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [64, 64, 64, 64, 192]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 16
    lin_neurons: 32

classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 32
    out_neurons: !ref <out_n_neurons>

mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False

side_effect: !apply:os.system ["touch {marker}"]

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
"""


@pytest.fixture()
def speechbrain_source(tmp_path) -> tuple[Path, torch.nn.Module, Path]:
    """An spkrec-ecapa-style folder from SpeechBrain's ECAPA (small), whose YAML would touch a marker if run."""
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    torch.manual_seed(4)
    reference = ECAPA_TDNN(
        80, channels=[64, 64, 64, 64, 192], kernel_sizes=[5, 3, 3, 3, 1], dilations=[1, 2, 3, 4, 1],
        attention_channels=16, lin_neurons=32,
    )  # fmt: skip
    randomise_batchnorm(reference, seed=4)
    folder, marker = tmp_path / "spkrec-ecapa", tmp_path / "evaluated"
    folder.mkdir()
    (folder / "hyperparams.yaml").write_text(SPEECHBRAIN_HPARAMS.format(marker=marker), encoding="utf-8")
    torch.save(reference.state_dict(), folder / "embedding_model.ckpt")
    torch.save({"count": torch.tensor(3)}, folder / "mean_var_norm_emb.ckpt")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# ECAPA\n", encoding="utf-8")
    return folder, reference, marker


def test_speechbrain_ecapa_imports_and_gives_speechbrain_embeddings(speechbrain_source, tmp_path, capsys):
    from speechbrain.lobes.features import Fbank
    from speechbrain.processing.features import InputNormalization

    source, reference, _ = speechbrain_source
    status, out, err = import_cli("speechbrain", source, tmp_path / "model", capsys)
    assert status == 0, err
    assert "mean_var_norm_emb.ckpt" in out  # says what it does not use
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["license"] == "apache-2.0" and info["backbone"]["channels"] == [64, 64, 64, 64, 192]
    fbank, norm = Fbank(n_mels=80), InputNormalization(norm_type="sentence", std_norm=False)

    def embed(wav: torch.Tensor) -> torch.Tensor:
        lengths = torch.ones(1)
        return reference(norm(fbank(wav[None]), lengths), lengths)

    values = cosines(tmp_path / "model", embed)
    print(f"speechbrain ecapa cosines {values}")
    assert min(values) >= MIN_COSINE


def test_speechbrain_yaml_is_read_as_data_never_evaluated(speechbrain_source, tmp_path, capsys):
    source, _, marker = speechbrain_source
    status, _, err = import_cli("speechbrain", source, tmp_path / "model", capsys)
    assert status == 0, err
    assert not marker.exists()  # the !apply:os.system line did not run


def tiny_resnet18_checkpoint() -> dict:
    """A ResNet18-shaped WeSpeaker state dict (our class has WeSpeaker's keys), 4 base channels."""
    torch.manual_seed(5)
    return ResNetSpeaker(feat_dim=80, embedding_dim=16, base_channels=4, num_blocks=[2, 2, 2, 2]).state_dict()


ARGS18 = {"feat_dim": 80, "embed_dim": 16}


def broken_wespeaker(folder: Path, problem: str) -> Path:
    state_dict = tiny_resnet18_checkpoint()
    model, args = "ResNet18", ARGS18
    if problem == "unknown model type":
        model = "ResNet50"
    elif problem == "missing key":
        del state_dict["layer2.0.bn1.running_mean"]
    elif problem == "shape mismatch":
        args = {**ARGS18, "embed_dim": 24}  # the config says 24, the weights are 16-dim
        state_dict["projection.weight"] = torch.randn(5, 24)  # keep write_wespeaker's projection consistent
    elif problem == "extra key":
        state_dict["extra_head.weight"] = torch.randn(3, 3)
    return write_wespeaker(folder, model, args, state_dict)


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        (
            "unknown model type",
            "'ResNet50' is not importable (bottleneck blocks, which the registry does not build)"
            "; accepted: ResNet18, ResNet34, CAMPPlus",
        ),
        ("missing key", "missing key layer2.0.bn1.running_mean"),
        ("shape mismatch", "seg_1.weight: shape [16, 640], the model needs [24, 640]"),  # 2 x 10 rows x 32 ch
        ("extra key", "unknown key extra_head.weight"),
    ],
)
def test_wespeaker_folder_that_does_not_fit_is_one_line_and_writes_nothing(problem, expected, tmp_path, capsys):
    source = broken_wespeaker(tmp_path / "source", problem)
    status, out, err = import_cli("wespeaker", source, tmp_path / "model", capsys)
    assert status == 1 and expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "model").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_3dspeaker_unknown_model_type_names_the_accepted_one(tmp_path, capsys):
    source = write_3dspeaker(tmp_path / "source", {"w": torch.zeros(1)}, model_type="eres2net-sv")
    status, _, err = import_cli("3dspeaker", source, tmp_path / "model", capsys)
    assert status == 1 and "'eres2net-sv'" in err and "cam++-sv" in err and err.count("\n") == 1
    assert not (tmp_path / "model").exists()


def test_3dspeaker_state_dict_with_wrong_keys_lists_at_most_ten(tmp_path, capsys):
    source = write_3dspeaker(tmp_path / "source", {f"stray{i}.weight": torch.zeros(2) for i in range(12)})
    status, _, err = import_cli("3dspeaker", source, tmp_path / "model", capsys)
    assert status == 1 and "unknown key stray0.weight" in err and "more" in err and err.count("\n") == 1
    assert not (tmp_path / "model").exists()


def test_wespeaker_resnet18_imports_with_its_block_counts_and_embeds(tmp_path, capsys):
    """A ResNet18 imports (the registry's resnet34 with WeSpeaker's ResNet18 block counts) and embeds."""
    source = write_wespeaker(tmp_path / "source", "ResNet18", ARGS18, tiny_resnet18_checkpoint())
    status, _, err = import_cli("wespeaker", source, tmp_path / "model", capsys)
    assert status == 0, err
    model = SpeakerModel.from_folder(tmp_path / "model")
    assert model.info["backbone"]["num_blocks"] == [2, 2, 2, 2]
    embedding = model.embed(np.asarray(waveforms()[0]))
    assert embedding.shape == (1, 16) and np.isclose(np.linalg.norm(embedding), 1.0, atol=1e-5)
