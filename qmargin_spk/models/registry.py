"""The architecture registry: the only place that turns a plain description into a model.

A description is data (JSON / YAML values only): a front-end ``{"name": "fbank", "sample_rate": 16000,
"n_mels": 80, "normalisation": "sentence_mean", ...}`` and a backbone ``{"architecture": "ecapa_tdnn",
"input_size": 80, "channels": [...], ...}``. The training hparams build their embedder from the two
descriptions (``build_backbone``, ``build_embedder``), the packaging stage writes them to
``model.json``, and a model folder is rebuilt from ``model.json`` by the same functions, so the model
that was trained and the model that is loaded cannot differ. Names and settings are checked here:
an unknown architecture or setting, or a value of the wrong type, is one :class:`DescriptionError`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from qmargin_spk.models.embedder import SpeakerEmbedder

# Value kinds of a setting: what JSON gives back is what the model receives.
INT, FLOAT, BOOL, INTS, OPTIONAL_FLOAT = "int", "float", "bool", "list of int", "float or null"
STR = "str"


class DescriptionError(ValueError):
    """A model description names something the registry does not have, or a value of the wrong kind."""


@dataclass(frozen=True)
class Component:
    """A class the registry builds: its dotted path, the keyword settings it accepts, and fixed keywords."""

    target: str
    settings: Mapping[str, str]
    required: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def cls(self) -> type:
        module, _, name = self.target.rpartition(".")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Architecture(Component):
    """A backbone: features ``[B, T, input_size]`` and relative lengths in, ``[B, 1, embedding]`` out."""

    input_key: str = "input_size"
    embedding_key: str = "lin_neurons"


ARCHITECTURES: dict[str, Architecture] = {
    "ecapa_tdnn": Architecture(
        target="speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN",
        settings={
            "input_size": INT,
            "lin_neurons": INT,
            "channels": INTS,
            "kernel_sizes": INTS,
            "dilations": INTS,
            "attention_channels": INT,
            "res2net_scale": INT,
            "se_channels": INT,
            "global_context": BOOL,
            "groups": INTS,
            "dropout": FLOAT,
        },
        required=("input_size", "lin_neurons", "channels", "kernel_sizes", "dilations", "attention_channels"),
    ),
    "resnet34": Architecture(  # WeSpeaker's ResNet34 layout (TSTP pooling); num_blocks defaults to 3, 4, 6, 3
        target="qmargin_spk.models.resnet.ResNetSpeaker",
        settings={"feat_dim": INT, "embedding_dim": INT, "base_channels": INT, "num_blocks": INTS},
        required=("feat_dim", "embedding_dim", "base_channels"),
        input_key="feat_dim",
        embedding_key="embedding_dim",
    ),
    "campplus": Architecture(  # CAM++ (WeSpeaker / 3D-Speaker layouts, std_mode picks the family); models/campplus.py
        target="qmargin_spk.models.campplus.CAMPPlus",
        settings={
            "feat_dim": INT,
            "embedding_dim": INT,
            "growth_rate": INT,
            "bn_size": INT,
            "init_channels": INT,
            "head_channels": INT,
            "std_mode": STR,
            "block_layers": INTS,
        },
        required=("feat_dim", "embedding_dim", "std_mode"),
        input_key="feat_dim",
        embedding_key="embedding_dim",
    ),
}
FEATURES: dict[str, Component] = {
    "fbank": Component(
        target="speechbrain.lobes.features.Fbank",
        settings={
            "sample_rate": INT,
            "n_mels": INT,
            "n_fft": INT,
            "win_length": FLOAT,
            "hop_length": FLOAT,
            "f_min": FLOAT,
            "f_max": OPTIONAL_FLOAT,
        },
        required=("sample_rate", "n_mels"),
    ),
    "kaldi_fbank": Component(  # Kaldi filterbanks as WeSpeaker / 3D-Speaker compute them; exportable to ONNX
        target="qmargin_spk.models.kaldi_fbank.KaldiFbank",
        settings={
            "sample_rate": INT,
            "n_mels": INT,
            "frame_length": FLOAT,
            "frame_shift": FLOAT,
            "window_type": STR,
            "dither": FLOAT,
            "scale_to_int16": BOOL,
        },
        required=("sample_rate", "n_mels", "window_type"),
    ),
}
NORMALISATIONS: dict[str, Component] = {
    "sentence_mean": Component(
        target="speechbrain.processing.features.InputNormalization",
        settings={},
        fixed={"norm_type": "sentence", "std_norm": False},
    ),
}


def validate_backbone(description: Mapping) -> dict:
    """The backbone description as plain checked values (:class:`DescriptionError` naming what is wrong)."""
    settings = dict(_mapping(description, "backbone"))
    name = settings.pop("architecture", None)
    if name not in ARCHITECTURES:
        raise DescriptionError(f"unknown architecture {name!r}: expected one of {sorted(ARCHITECTURES)}")
    return {"architecture": name, **_checked(ARCHITECTURES[name], settings, f"architecture {name!r}")}


def validate_frontend(description: Mapping) -> dict:
    """The front-end description (features + normalisation) as plain checked values."""
    settings = dict(_mapping(description, "front-end"))
    name = settings.pop("name", None)
    normalisation = settings.pop("normalisation", "sentence_mean")
    if name not in FEATURES:
        raise DescriptionError(f"unknown front-end {name!r}: expected one of {sorted(FEATURES)}")
    if normalisation not in NORMALISATIONS:
        raise DescriptionError(f"unknown normalisation {normalisation!r}: expected one of {sorted(NORMALISATIONS)}")
    return {"name": name, "normalisation": normalisation, **_checked(FEATURES[name], settings, f"front-end {name!r}")}


def build_backbone(description: Mapping) -> torch.nn.Module:
    """The embedding network a backbone description names, with random weights."""
    settings = validate_backbone(description)
    return ARCHITECTURES[settings.pop("architecture")].cls()(**settings)


def build_frontend(description: Mapping) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(compute_features, mean_var_norm)`` of a front-end description."""
    settings = validate_frontend(description)
    features, normalisation = FEATURES[settings.pop("name")], NORMALISATIONS[settings.pop("normalisation")]
    return features.cls()(**settings, **features.fixed), normalisation.cls()(**normalisation.fixed)


def build_embedder(frontend: Mapping, embedding_model: torch.nn.Module) -> SpeakerEmbedder:
    """Waveform-to-embedding module: the front-end described by ``frontend`` and ``embedding_model``."""
    compute_features, mean_var_norm = build_frontend(frontend)
    return SpeakerEmbedder(compute_features, mean_var_norm, embedding_model)


def embedding_dim(backbone: Mapping) -> int:
    """Size of the embeddings the backbone outputs."""
    settings = validate_backbone(backbone)
    return int(settings[ARCHITECTURES[settings["architecture"]].embedding_key])


def check_compatible(frontend: Mapping, backbone: Mapping) -> None:
    """The backbone's input size must be the front-end's number of features."""
    frontend, backbone = validate_frontend(frontend), validate_backbone(backbone)
    key = ARCHITECTURES[backbone["architecture"]].input_key
    if backbone[key] != frontend["n_mels"]:
        raise DescriptionError(
            f"backbone {key} {backbone[key]} differs from the front-end's n_mels {frontend['n_mels']}"
        )


def speechbrain_hparams(frontend: Mapping, backbone: Mapping) -> str:
    """HyperPyYAML body that builds the described model with ``!new:`` tags (for SpeechBrain's ``from_hparams``)."""
    frontend, backbone = validate_frontend(frontend), validate_backbone(backbone)
    features, normalisation = FEATURES[frontend.pop("name")], NORMALISATIONS[frontend.pop("normalisation")]
    architecture = ARCHITECTURES[backbone.pop("architecture")]
    return "".join(
        [
            f"sample_rate: {frontend['sample_rate']}\n\n",
            _new("compute_features", features.target, {**frontend, **features.fixed}),
            _new("mean_var_norm", normalisation.target, normalisation.fixed),
            _new("embedding_model", architecture.target, backbone),
        ]
    )


def _new(key: str, target: str, settings: Mapping) -> str:
    lines = [f"{key}: !new:{target}"] + [f"    {name}: {json.dumps(value)}" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


def _mapping(description: Any, what: str) -> Mapping:
    if not isinstance(description, Mapping):
        raise DescriptionError(f"a {what} description must be a mapping, got {type(description).__name__}")
    return description


def _checked(component: Component, settings: Mapping, what: str) -> dict:
    """``settings`` with every key known to ``component``, every required key present, every value of its kind."""
    unknown = sorted(set(settings) - set(component.settings))
    if unknown:
        raise DescriptionError(f"{what} has no setting {unknown} (it takes {sorted(component.settings)})")
    missing = [key for key in component.required if key not in settings]
    if missing:
        raise DescriptionError(f"{what} needs {missing}")
    return {key: _plain(value, component.settings[key], f"{what} setting {key!r}") for key, value in settings.items()}


def _plain(value: Any, kind: str, what: str) -> Any:
    """``value`` as the plain Python value of ``kind``; :class:`DescriptionError` when it is not one."""
    if kind == OPTIONAL_FLOAT and value is None:
        return None
    if kind in (FLOAT, OPTIONAL_FLOAT) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == INT and isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if kind == BOOL and isinstance(value, bool):
        return bool(value)
    if kind == STR and isinstance(value, str):
        return str(value)
    if (
        kind == INTS
        and isinstance(value, (list, tuple))
        and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
    ):
        return [int(item) for item in value]
    raise DescriptionError(f"{what} must be {kind}, got {value!r}")
