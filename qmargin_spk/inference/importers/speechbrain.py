"""SpeechBrain ECAPA-TDNN folders as spkrec-ecapa-voxceleb publishes them: hyperparams.yaml + embedding_model.ckpt.

The YAML is HyperPyYAML, i.e. code: it is read here as data (tags kept as marks, nothing constructed or run),
and only plain values and ``!ref <name>`` references to top-level plain values are taken from it: the
``compute_features`` (Fbank), ``mean_var_norm`` (sentence mean) and ``embedding_model`` (ECAPA_TDNN) entries.
The classifier and ``mean_var_norm_emb.ckpt`` (a global embedding normalisation, not applied by SpeechBrain's
``encode_batch`` either) are not used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qmargin_spk.inference.importers.common import (
    Imported,
    SourceError,
    folder_license,
    integer_counters,
    load_state_dict,
    mapping,
    read_yaml,
    required_file,
)

HPARAMS_FILE = "hyperparams.yaml"
WEIGHTS_FILE = "embedding_model.ckpt"
UNUSED_FILES = ("mean_var_norm_emb.ckpt", "classifier.ckpt", "label_encoder.txt")
ECAPA_TAG = "!new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN"
FBANK_TAG = "!new:speechbrain.lobes.features.Fbank"
NORM_TAG = "!new:speechbrain.processing.features.InputNormalization"
REFERENCE = re.compile(r"^<([\w.]+)>$")


def read_speechbrain(folder: Path) -> Imported:
    """The ECAPA-TDNN in ``folder`` as registry descriptions and its state dict (SourceError otherwise)."""
    hparams_path = required_file(folder, HPARAMS_FILE)
    weights_path = required_file(folder, WEIGHTS_FILE)
    hparams = mapping(read_yaml(hparams_path), str(hparams_path))
    backbone = _entry(hparams, "embedding_model", ECAPA_TAG, hparams_path)
    features = _entry(hparams, "compute_features", FBANK_TAG, hparams_path)
    norm = _entry(hparams, "mean_var_norm", NORM_TAG, hparams_path)
    if norm.get("norm_type", "global") != "sentence" or norm.get("std_norm", True) is not False:
        raise SourceError(
            f"{hparams_path}: mean_var_norm {norm}; only norm_type sentence, std_norm False is importable"
        )
    unknown_norm = sorted(set(norm) - {"norm_type", "std_norm"})
    if unknown_norm:
        raise SourceError(f"{hparams_path}: mean_var_norm settings {unknown_norm} are not importable")
    sample_rate = features.pop(
        "sample_rate", _plain(hparams.get("sample_rate", 16000), "sample_rate", hparams, hparams_path)
    )
    unused = [name for name in UNUSED_FILES if (folder / name).is_file()]
    return Imported(
        frontend={"name": "fbank", "sample_rate": sample_rate, **features, "normalisation": "sentence_mean"},
        backbone={"architecture": "ecapa_tdnn", **backbone},
        state_dict=integer_counters(load_state_dict(weights_path)),
        weights_file=weights_path,
        license=folder_license(folder),
        notes=[f"not used: {', '.join(unused)} (classifier, labels, global embedding normalisation)"] if unused else [],
    )


def _entry(hparams: Mapping, key: str, tag: str, path: Path) -> dict:
    """The plain settings of the ``key: !new:...`` entry, which must carry ``tag``; references resolved."""
    node = hparams.get(key)
    if node is None:
        raise SourceError(f"{path}: no {key} entry (expected {key}: {tag})")
    found = getattr(getattr(node, "tag", None), "value", None)
    if not isinstance(node, Mapping) or found != tag:
        raise SourceError(f"{path}: {key} is {found or type(node).__name__}; importable: {tag}")
    return {name: _plain(node[name], f"{key}.{name}", hparams, path) for name in node}


def _plain(value: Any, name: str, hparams: Mapping, path: Path, depth: int = 0) -> Any:
    """A plain value (number, bool, string, list of them) or a ``!ref <top-level key>`` to one."""
    tag = getattr(getattr(value, "tag", None), "value", None)
    if tag == "!ref":
        match = REFERENCE.match(str(getattr(value, "value", "")).strip())
        if match is None or match.group(1) not in hparams or depth > 8:
            raise SourceError(f"{path}: {name}: !ref {value.value!r} is not a reference to a plain top-level value")
        return _plain(hparams[match.group(1)], match.group(1), hparams, path, depth + 1)
    if tag is not None:
        raise SourceError(f"{path}: {name} is a {tag} expression; only plain values are read")
    if isinstance(value, list):
        return [_plain(item, name, hparams, path, depth) for item in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    raise SourceError(f"{path}: {name} is not a plain value")
