"""What the importers share: the error, the imported description, reading files as data, strict checks.

Every importer reads a published folder into a :class:`Imported` (registry descriptions, the state dict
mapped to our keys, the weights file it came from); :func:`check_weights` then compares the state dict
with the model the descriptions build, key by key and shape by shape, before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qmargin_spk.models.registry import DescriptionError, build_backbone, check_compatible

MAX_LISTED = 10  # problems named in one error; the rest are counted
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING")


class SourceError(ValueError):
    """A published folder that cannot be imported (missing file, unknown model type, keys or shapes that differ)."""


@dataclass
class Imported:
    """A published model read into our terms: registry descriptions, weights with our keys, and provenance."""

    frontend: dict
    backbone: dict
    state_dict: dict[str, torch.Tensor]
    weights_file: Path
    license: str | None = None
    notes: list[str] = field(default_factory=list)


def required_file(folder: Path, name: str) -> Path:
    """``folder / name``, which must be a file inside ``folder`` (SourceError otherwise)."""
    path = folder / name
    if Path(name).name != name or not path.is_file():
        raise SourceError(f"{path}: no such file in the published folder")
    return path


def read_yaml(path: Path) -> Any:
    """A YAML file as data: the round-trip loader keeps tags (``!new:``, ``!apply:``) as marks, constructs nothing."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        with open(path, encoding="utf-8") as handle:
            return YAML(typ="rt", pure=True).load(handle)
    except (YAMLError, UnicodeDecodeError) as err:
        raise SourceError(f"{path}: not readable as YAML ({' '.join(str(err).split())[:200]})") from None


def read_json(path: Path) -> Any:
    """A JSON file (SourceError naming it when it is not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SourceError(f"{path}: not readable as JSON ({err})") from None


def mapping(value: Any, where: str) -> Mapping:
    """``value`` when it is a mapping (an absent one is empty); SourceError naming ``where`` otherwise."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SourceError(f"{where} must be a mapping, got {value!r}")
    return value


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, loaded with ``weights_only=True`` (no code runs)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a file the user gave
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise SourceError(f"{path}: not a tensors-only state dict ({reason})") from None
    if not isinstance(loaded, Mapping) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise SourceError(f"{path}: expected a state dict (names -> tensors), got {type(loaded).__name__}")
    return dict(loaded)


def integer_counters(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``num_batches_tracked`` stored as floats (checkpoint averaging divides every tensor) back to integers."""
    return {
        key: value.round().to(torch.long)
        if key.endswith("num_batches_tracked") and value.is_floating_point()
        else value
        for key, value in state_dict.items()
    }


def check_weights(imported: Imported) -> None:
    """SourceError listing unknown keys, missing keys and shape mismatches against the described model."""
    try:
        check_compatible(imported.frontend, imported.backbone)
        expected = {key: tuple(value.shape) for key, value in build_backbone(imported.backbone).state_dict().items()}
    except (DescriptionError, ValueError, TypeError) as err:
        raise SourceError(f"{imported.weights_file.parent}: {err}") from None
    given = {key: tuple(value.shape) for key, value in imported.state_dict.items()}
    problems = [f"unknown key {key}" for key in given if key not in expected]
    problems += [f"missing key {key}" for key in expected if key not in given]
    problems += [
        f"{key}: shape {list(given[key])}, the model needs {list(shape)}"
        for key, shape in expected.items()
        if key in given and given[key] != shape
    ]
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise SourceError(
            f"{imported.weights_file}: does not fit {imported.backbone['architecture']} "
            f"({len(problems)} problems): {shown}{more}"
        )


def folder_license(folder: Path, field_value: Any = None) -> str | None:
    """The licence the folder states: a ``license`` field, a model card's ``license:`` line, or a LICENSE file."""
    if isinstance(field_value, str) and field_value.strip():
        return field_value.strip()
    card = folder / "README.md"
    if card.is_file():
        lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
        if lines and lines[0].strip() == "---":  # front matter of a model card
            for line in lines[1:]:
                if line.strip() == "---":
                    break
                if line.startswith("license:"):
                    return line.partition(":")[2].strip().strip("\"'") or None
    for name in LICENSE_FILES:
        path = folder / name
        if path.is_file():
            first = next((line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()), "")
            return f"{name}: {first}" if first else name
    return None
