"""Compose an experiment from fragments: one HyperPyYAML namespace, every setting said once.

An experiment file names one fragment of each kind and may set keys::

    backbone: ecapa_tdnn        # hparams/backbones/ecapa_tdnn.yaml
    loss: qmargin               # hparams/losses/qmargin.yaml
    setting: demo_cpu           # hparams/settings/demo_cpu.yaml
    margin: 0.3                 # any key of the fragments

The fragments' top-level keys are merged into ONE mapping before HyperPyYAML resolves it, so
``!ref`` works across fragments and a command-line override reaches any key. A fragment's
``per_setting: {<setting>: {key: value}}`` entries for the chosen setting become top-level keys of
that fragment (a backbone's sizes, a loss's schedule). Precedence: fragments < experiment file <
overrides. A key defined by two fragments is an error naming both files unless the experiment file
sets it; an override of a key that nothing defines is an error naming the closest key. The result
is plain YAML text with tags kept (``!new:``, ``!ref``...): the run's record, which loads alone.

HyperPyYAML's own ``!include:`` resolves a file alone under one key, so it cannot give this.
"""

from __future__ import annotations

import difflib
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ruamel.yaml
from hyperpyyaml.core import recursive_update

logger = logging.getLogger(__name__)

KINDS = ("setting", "backbone", "loss")  # the order of the fragments in the composed document
FOLDERS = {"backbone": "backbones", "loss": "losses", "setting": "settings"}
PER_SETTING = "per_setting"
RECORD_KEY = "composed_from"  # written into the composed document: which fragments made it
TOOLKIT_HPARAMS = Path(__file__).resolve().parents[2] / "hparams"


class CompositionError(ValueError):
    """The experiment file, a fragment choice or an override cannot be composed; the message is one line."""


@dataclass
class Composition:
    """A composed experiment: its text (overrides applied), the chosen fragments and where each key came from."""

    text: str
    choices: dict[str, str]
    key_sources: dict[str, str]  # top-level key -> "setting" | "backbone" | "loss" | "experiment" | "override"
    notices: list[str] = field(default_factory=list)

    def keys_of(self, kind: str) -> list[str]:
        """Top-level keys that the fragment of ``kind`` defines (before the experiment file and overrides)."""
        return [key for key, source in self.key_sources.items() if source == kind]


def yaml_round_trip() -> ruamel.yaml.YAML:
    """ruamel's round-trip YAML, which keeps HyperPyYAML's tags, key order and comments."""
    handler = ruamel.yaml.YAML()
    handler.width = 4096
    return handler


def load_tree(path: Path) -> dict:
    """A YAML file as a ruamel mapping (tags kept); :class:`CompositionError` naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as handle:
            tree = yaml_round_trip().load(handle)
    except OSError as err:
        raise CompositionError(f"{path}: cannot read ({err.strerror or err})") from None
    except ruamel.yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise CompositionError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if tree is None:
        tree = ruamel.yaml.comments.CommentedMap()
    if not isinstance(tree, dict):
        raise CompositionError(f"{path}: expected a mapping of keys at the top level")
    return tree


def is_composed(tree: Mapping) -> bool:
    """Whether a loaded experiment file names fragments (instead of being a complete HyperPyYAML file)."""
    return any(kind in tree for kind in KINDS)


def fragment_path(kind: str, name: str, search: list[Path]) -> Path:
    """The file of fragment ``name`` of ``kind``: next to the experiment file first, then the toolkit's hparams."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise CompositionError(f"{kind} must be a fragment name, got {name!r}")
    for root in search:
        path = root / FOLDERS[kind] / f"{name}.yaml"
        if path.is_file():
            return path
    known = sorted({p.stem for root in search for p in (root / FOLDERS[kind]).glob("*.yaml")})
    raise CompositionError(f"no {kind} fragment {name!r} (known: {', '.join(known) or 'none'})")


def compose(
    experiment_file: str | Path, choices: Mapping[str, str] | None = None, overrides: Mapping | None = None
) -> Composition:
    """Compose ``experiment_file`` with fragment ``choices`` (from flags) and ``overrides`` (key -> value).

    A complete HyperPyYAML file (one that names no fragment, such as a run's record) is taken as it
    is, with the overrides applied; fragment choices are then an error.
    """
    experiment_file = Path(experiment_file)
    tree = load_tree(experiment_file)
    choices = {kind: name for kind, name in (choices or {}).items() if name is not None}
    if not is_composed(tree):
        if choices:
            flags = ", ".join(f"--{kind} {name}" for kind, name in choices.items())
            raise CompositionError(
                f"{experiment_file} names no fragments (backbone/loss/setting), so {flags} cannot replace one"
            )
        recorded = dict(tree.get(RECORD_KEY) or {})
        sources = {key: "experiment" for key in tree}
        for kind in KINDS:
            for key in recorded.get("keys", {}).get(kind, []):
                sources[key] = kind
        _apply_overrides(tree, overrides or {}, sources, experiment_file)
        return Composition(_dump(tree), {kind: recorded.get(kind) for kind in KINDS}, sources)

    search = [experiment_file.resolve().parent, TOOLKIT_HPARAMS]
    named = {kind: tree.pop(kind, None) for kind in KINDS}
    missing = [kind for kind in KINDS if named[kind] is None and kind not in choices]
    if missing:
        raise CompositionError(
            f"{experiment_file}: names no {' and no '.join(missing)} fragment "
            f"(add '{missing[0]}: NAME' or pass --{missing[0]} NAME)"
        )
    chosen = {kind: choices.get(kind, named[kind]) for kind in KINDS}
    paths = {kind: fragment_path(kind, chosen[kind], search) for kind in KINDS}
    fragments = {kind: _fragment(paths[kind], chosen["setting"], kind) for kind in KINDS}

    notices = []
    for kind in KINDS:
        if kind in choices and named[kind] not in (None, choices[kind]):
            replaced = fragment_path(kind, named[kind], search)
            replaced_keys = set(_fragment(replaced, chosen["setting"], kind, strict=False))
            dropped = [key for key in tree if key in replaced_keys]
            for key in dropped:
                del tree[key]
            if dropped:
                notices.append(
                    f"--{kind} {choices[kind]} replaces {named[kind]}: dropped {', '.join(dropped)} "
                    f"that {experiment_file.name} set for {named[kind]}"
                )

    composed = ruamel.yaml.comments.CommentedMap()
    sources: dict[str, str] = {}
    for kind in KINDS:
        for key, value in fragments[kind].items():
            if key in sources and key not in tree:
                raise CompositionError(
                    f"key {key!r} is defined by both {paths[sources[key]]} and {paths[kind]}: "
                    f"remove it from one, or set it in {experiment_file}"
                )
            sources.setdefault(key, kind)
            composed[key] = value
    for key, value in tree.items():
        if key not in sources:
            sources[key] = "experiment"
        composed[key] = value
    composed.insert(0, RECORD_KEY, _record(chosen, experiment_file, sources))
    _apply_overrides(composed, overrides or {}, sources, experiment_file)
    for notice in notices:
        logger.warning(notice)
    return Composition(_dump(composed), chosen, sources, notices)


def _fragment(path: Path, setting: str, kind: str, strict: bool = True) -> dict:
    """A fragment's keys with its ``per_setting`` entries for ``setting`` made top-level."""
    tree = load_tree(path)
    if kind == "setting" or PER_SETTING not in tree:
        return tree
    per_setting = tree.pop(PER_SETTING)
    if not isinstance(per_setting, dict):
        raise CompositionError(f"{path}: '{PER_SETTING}' must map setting names to keys")
    if setting in per_setting:
        for key, value in (per_setting[setting] or {}).items():
            tree[key] = value
    elif strict and kind == "backbone":
        raise CompositionError(
            f"{path}: no sizes for setting {setting!r} under '{PER_SETTING}' (has: {', '.join(per_setting) or 'none'})"
        )
    return tree


def _record(chosen: Mapping[str, str], experiment_file: Path, sources: Mapping[str, str]) -> dict:
    """The ``composed_from`` entry: fragment names, the experiment file, and the keys each fragment defined."""
    record = ruamel.yaml.comments.CommentedMap(
        {
            **chosen,
            "experiment_file": experiment_file.name,
            "keys": {kind: [key for key, source in sources.items() if source == kind] for kind in KINDS},
        }
    )
    record.fa.set_block_style()
    for kind in KINDS:
        keys = ruamel.yaml.comments.CommentedSeq(record["keys"][kind])
        keys.fa.set_flow_style()
        record["keys"][kind] = keys
    return record


def _apply_overrides(tree: dict, overrides: Mapping, sources: dict[str, str], experiment_file: Path) -> None:
    """Set ``overrides`` on ``tree`` (nested mappings merge); an unknown key names the closest one."""
    for key in overrides:
        if key not in tree:
            close = difflib.get_close_matches(str(key), [str(k) for k in tree if k != RECORD_KEY], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CompositionError(f"override --{key}: no such key in {experiment_file} or its fragments{hint}")
    try:
        recursive_update(tree, dict(overrides))
    except TypeError as err:
        raise CompositionError(
            f"overrides {sorted(overrides)} do not fit the structure of {experiment_file}: {err}"
        ) from None


def _dump(tree: Mapping) -> str:
    buffer = io.StringIO()
    yaml_round_trip().dump(tree, buffer)
    return buffer.getvalue()
