"""WeSpeaker model-zoo folders: ``avg_model.pt`` (the averaged state dict) and ``config.yaml`` (the training config).

``model`` picks the architecture: ResNet18 / ResNet34 (basic blocks, our ``resnet34`` with its block counts)
or CAMPPlus (our ``campplus``, WeSpeaker's pooling). ResNet50 and deeper use bottleneck blocks, which the
registry does not build. The front-end is WeSpeaker's: Kaldi fbank of samples scaled to int16, hamming
window, ``fbank_args``' frame length and shift, no dither (inference), then per-utterance mean subtraction.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from qmargin_spk.inference.importers.common import (
    Imported,
    SourceError,
    folder_license,
    load_state_dict,
    mapping,
    read_yaml,
    required_file,
)
from qmargin_spk.models.resnet import wespeaker_state_dict

WEIGHTS_FILE = "avg_model.pt"
CONFIG_FILE = "config.yaml"
BASIC_RESNETS = {"ResNet18": [2, 2, 2, 2], "ResNet34": [3, 4, 6, 3]}
BOTTLENECK_RESNETS = ("ResNet50", "ResNet101", "ResNet152", "ResNet221", "ResNet293")
ACCEPTED_MODELS = (*BASIC_RESNETS, "CAMPPlus")
RESNET_ARGS = ("feat_dim", "embed_dim", "pooling_func", "two_emb_layer")
CAMPPLUS_ARGS = ("feat_dim", "embed_dim", "pooling_func", "growth_rate", "bn_size", "init_channels", "config_str")


def read_wespeaker(folder: Path) -> Imported:
    """The WeSpeaker model in ``folder`` as registry descriptions and our state dict (SourceError otherwise)."""
    config_path = required_file(folder, CONFIG_FILE)
    weights_path = required_file(folder, WEIGHTS_FILE)
    config = mapping(read_yaml(config_path), str(config_path))
    model = config.get("model")
    if model not in ACCEPTED_MODELS:
        why = " (bottleneck blocks, which the registry does not build)" if model in BOTTLENECK_RESNETS else ""
        raise SourceError(
            f"{config_path}: model {model!r} is not importable{why}; accepted: {', '.join(ACCEPTED_MODELS)}"
        )
    args = dict(mapping(config.get("model_args"), f"{config_path}: model_args"))
    raw = load_state_dict(weights_path)
    state_dict = wespeaker_state_dict(raw)
    dropped = sorted(key for key in raw if key.removeprefix("module.").startswith("projection."))
    backbone = _resnet(args, state_dict, model, config_path) if model in BASIC_RESNETS else _campplus(args, config_path)
    return Imported(
        frontend=_frontend(config, config_path),
        backbone=backbone,
        state_dict=state_dict,
        weights_file=weights_path,
        license=folder_license(folder, config.get("license")),
        notes=[f"dropped the training loss's weights {dropped}"] if dropped else [],
    )


def _frontend(config: Mapping, config_path: Path) -> dict:
    dataset = mapping(config.get("dataset_args"), f"{config_path}: dataset_args")
    fbank = mapping(dataset.get("fbank_args"), f"{config_path}: dataset_args.fbank_args")
    if dataset.get("frontend", "fbank") != "fbank":
        raise SourceError(f"{config_path}: front-end {dataset.get('frontend')!r}; only fbank models are importable")
    cmvn = mapping(dataset.get("cmvn_args"), f"{config_path}: dataset_args.cmvn_args")
    if dataset.get("cmvn", True) is not True or not cmvn.get("norm_mean", True) or cmvn.get("norm_var", False):
        raise SourceError(f"{config_path}: only mean normalisation (cmvn true, norm_var false) is importable")
    return {
        "name": "kaldi_fbank",
        "sample_rate": dataset.get("resample_rate", 16000),
        "n_mels": fbank.get("num_mel_bins", 80),
        "frame_length": fbank.get("frame_length", 25),
        "frame_shift": fbank.get("frame_shift", 10),
        "window_type": "hamming",
        "dither": 0.0,  # WeSpeaker dithers in training only
        "scale_to_int16": True,
        "normalisation": "sentence_mean",
    }


def _known_args(args: Mapping, known: tuple[str, ...], config_path: Path) -> None:
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise SourceError(f"{config_path}: model_args {unknown} not importable (known: {', '.join(known)})")
    if args.get("pooling_func", "TSTP") != "TSTP":
        raise SourceError(f"{config_path}: pooling_func {args['pooling_func']!r}; only TSTP is importable")


def _resnet(args: Mapping, state_dict: Mapping, model: str, config_path: Path) -> dict:
    _known_args(args, RESNET_ARGS, config_path)
    if args.get("two_emb_layer", False):
        raise SourceError(f"{config_path}: two_emb_layer true is not importable (one embedding layer only)")
    if "embed_dim" not in args:
        raise SourceError(f"{config_path}: model_args has no embed_dim")
    stem = state_dict.get("conv1.weight")  # WeSpeaker's ResNets take their width (m_channels) from no config key
    return {
        "architecture": "resnet34",
        "feat_dim": args.get("feat_dim", 80),
        "embedding_dim": args["embed_dim"],
        "base_channels": int(stem.shape[0]) if stem is not None and stem.dim() == 4 else 32,
        "num_blocks": BASIC_RESNETS[model],
    }


def _campplus(args: Mapping, config_path: Path) -> dict:
    _known_args(args, CAMPPLUS_ARGS, config_path)
    if args.get("config_str", "batchnorm-relu") != "batchnorm-relu":
        raise SourceError(f"{config_path}: config_str {args['config_str']!r}; only batchnorm-relu is importable")
    sizes = {key: args[key] for key in ("growth_rate", "bn_size", "init_channels") if key in args}
    return {
        "architecture": "campplus",
        "feat_dim": args.get("feat_dim", 80),
        "embedding_dim": args.get("embed_dim", 512),
        **sizes,
        "std_mode": "sqrt_var_eps",
    }
