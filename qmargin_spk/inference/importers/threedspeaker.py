"""3D-Speaker models as ModelScope publishes them: ``configuration.json`` naming the type and the state-dict file.

Only CAM++ (``cam++-sv``) is importable: our ``campplus`` with 3D-Speaker's plain standard deviation in the
pooling (``std_mode="std"``). The sizes the configuration does not give (growth rate, bottleneck, initial
channels; the embedding size unless ``model_config.emb_size`` is there) are read from the state dict's shapes.
The front-end is 3D-Speaker's: Kaldi fbank of samples in [-1, 1], povey window, no dither, then mean subtraction.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from qmargin_spk.inference.importers.common import (
    Imported,
    SourceError,
    folder_license,
    integer_counters,
    load_state_dict,
    mapping,
    read_json,
    required_file,
)

CONFIG_FILE = "configuration.json"
ACCEPTED_TYPES = ("cam++-sv",)
# Keys whose shapes give the CAM++ sizes 3D-Speaker's configuration leaves out.
EMBEDDING_KEY = "xvector.dense.linear.weight"
INIT_KEY = "xvector.tdnn.linear.weight"
GROWTH_KEY = "xvector.block1.tdnnd1.cam_layer.linear_local.weight"
BOTTLENECK_KEY = "xvector.block1.tdnnd1.linear1.weight"


def read_3dspeaker(folder: Path) -> Imported:
    """The 3D-Speaker model in ``folder`` as registry descriptions and its state dict (SourceError otherwise)."""
    config_path = required_file(folder, CONFIG_FILE)
    config = mapping(read_json(config_path), str(config_path))
    model = mapping(config.get("model"), f"{config_path}: model")
    kind = model.get("type")
    if kind not in ACCEPTED_TYPES:
        raise SourceError(
            f"{config_path}: model type {kind!r} is not importable; accepted: {', '.join(ACCEPTED_TYPES)}"
        )
    name = model.get("pretrained_model")
    if not isinstance(name, str) or not name:
        raise SourceError(f"{config_path}: model.pretrained_model (the state-dict file) is missing")
    weights_path = required_file(folder, name)
    settings = mapping(model.get("model_config"), f"{config_path}: model.model_config")
    state_dict = integer_counters(load_state_dict(weights_path))
    sample_rate, n_mels = settings.get("sample_rate", 16000), settings.get("fbank_dim", 80)
    frontend = {
        "name": "kaldi_fbank",
        "sample_rate": sample_rate,
        "n_mels": n_mels,
        "frame_length": 25.0,
        "frame_shift": 10.0,
        "window_type": "povey",
        "dither": 0.0,
        "scale_to_int16": False,
        "normalisation": "sentence_mean",
    }
    backbone = {
        "architecture": "campplus",
        "feat_dim": n_mels,
        "embedding_dim": settings.get("emb_size", _rows(state_dict, EMBEDDING_KEY, 512)),
        **_sizes(state_dict),
        "std_mode": "std",
    }
    license_field = config.get("license", model.get("license"))
    return Imported(frontend, backbone, state_dict, weights_path, folder_license(folder, license_field))


def _rows(state_dict: Mapping, key: str, default: int) -> int:
    value = state_dict.get(key)
    return int(value.shape[0]) if value is not None and value.dim() >= 1 else default


def _sizes(state_dict: Mapping) -> dict:
    """Growth rate, bottleneck factor and initial channels from the shapes (the paper's sizes when keys are absent)."""
    growth = _rows(state_dict, GROWTH_KEY, 32)
    bottleneck = _rows(state_dict, BOTTLENECK_KEY, 4 * growth)
    return {
        "growth_rate": growth,
        "bn_size": max(1, bottleneck // max(1, growth)),
        "init_channels": _rows(state_dict, INIT_KEY, 128),
    }
