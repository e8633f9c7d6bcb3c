"""A study's SPEC.yaml: the data, the systems (with their grids) and the training seeds, checked before anything runs.

    train_root: corpus/train            # or a list of roots
    test_root: corpus/test
    trials: {O: corpus/trials.txt}      # or a list of files (labelled by their names)
    seeds: [1, 2, 3]
    baseline: aam                       # optional: the first system otherwise
    overrides: {number_of_epochs: 4}    # optional: for every system
    systems:
        aam: {hparams: hparams/demo_cpu_aam.yaml}
        qmargin:
            backbone: ecapa_tdnn        # fragments instead of (or replacing those of) an experiment file
            loss: qmargin
            setting: demo_cpu
            overrides: {margin: 0.25}
            grid: {alpha: [1.5, 2.0]}   # one run per value (per combination) and seed
    valid_trials: corpus/valid.txt      # optional, passed to stage 1
    valid_speakers: 20                  # optional, passed to stage 1

Paths are relative to the spec file. Every system is composed (:func:`qmargin_spk.stages.compose.compose`,
YAML only, nothing built) so that an override or grid key the system does not have stops the study
at once, as one line naming the spec file, the system and the key.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmargin_spk.stages.compose import KINDS, TOOLKIT_HPARAMS, CompositionError, compose, load_tree

# An experiment file whose three fragments a system naming all of backbone, loss and setting replaces.
BASE_EXPERIMENT = TOOLKIT_HPARAMS / "demo_cpu_qmargin.yaml"
TOP_FIELDS = (
    "train_root",
    "test_root",
    "trials",
    "systems",
    "seeds",
    "baseline",
    "overrides",
    "valid_trials",
    "valid_speakers",
)
SYSTEM_FIELDS = ("hparams", *KINDS, "overrides", "grid")
# Keys the study sets on every run (runner.py): the seed from ``seeds``, the study's manifests, the threads.
STUDY_KEYS = ("seed", "data_folder", "output_folder", "num_threads")


class StudyError(ValueError):
    """A study that cannot run as specified (or a run that failed); the message is one line."""


@dataclass(frozen=True)
class GridPoint:
    """One point of a system's grid: its values (empty for a system without a grid) and its name suffix."""

    values: dict[str, Any]

    @property
    def suffix(self) -> str:
        """``_alpha-1.5_scale-30`` (empty without a grid): the part of a run's folder name."""
        return "".join(f"_{key}-{_plain_name(value)}" for key, value in self.values.items())


@dataclass(frozen=True)
class SystemSpec:
    """A system of the study: an experiment file and/or fragment names, overrides and a grid."""

    label: str
    hparams: Path
    choices: dict[str, str]
    overrides: dict[str, Any]
    grid: dict[str, list]

    def points(self) -> list[GridPoint]:
        """Every combination of the grid's values, in the spec's order (one empty point without a grid)."""
        keys = list(self.grid)
        return [GridPoint(dict(zip(keys, values))) for values in itertools.product(*(self.grid[k] for k in keys))]

    def fragment_flags(self) -> list[str]:
        """``--backbone NAME`` ... for run.sh."""
        return [flag for kind, name in self.choices.items() for flag in (f"--{kind}", name)]


@dataclass(frozen=True)
class StudySpec:
    """A checked SPEC.yaml."""

    path: Path
    train_roots: list[Path]
    test_root: Path
    trials: dict[str, Path]  # label -> trial list file
    systems: dict[str, SystemSpec]
    seeds: list[int]
    baseline: str
    overrides: dict[str, Any] = field(default_factory=dict)
    valid_trials: Path | None = None
    valid_speakers: int | None = None

    def list_labels(self) -> dict[str, str]:
        """Trial-list name (as stage 3 names it: the file's stem) -> the spec's label."""
        return {path.stem: label for label, path in self.trials.items()}


def load_spec(path: str | Path) -> StudySpec:
    """Read and check SPEC.yaml; :class:`StudyError` with one line naming the file (and system, key) otherwise."""
    path = Path(path)
    try:
        tree = _plain(load_tree(path))
    except CompositionError as err:
        raise StudyError(str(err)) from None
    where = path.parent
    _known_fields(path, "", tree, TOP_FIELDS)
    for required in ("train_root", "test_root", "trials", "systems", "seeds"):
        if required not in tree:
            raise StudyError(f"{path}: no '{required}' (a study needs {', '.join(TOP_FIELDS[:5])})")
    roots = tree["train_root"] if isinstance(tree["train_root"], list) else [tree["train_root"]]
    train_roots = [_existing(path, where, root, "train_root", folder=True) for root in roots]
    test_root = _existing(path, where, tree["test_root"], "test_root", folder=True)
    trials = _trials(path, where, tree["trials"])
    seeds = tree["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds) or len(set(seeds)) < len(seeds):
        raise StudyError(f"{path}: 'seeds' must be a list of distinct integers, got {seeds!r}")
    common = _mapping(path, "overrides", tree.get("overrides") or {})
    systems_tree = tree["systems"]
    if not isinstance(systems_tree, dict) or not systems_tree:
        raise StudyError(f"{path}: 'systems' must map labels to systems ({{label: {{hparams: FILE}}}})")
    systems = {str(label): _system(path, where, str(label), entry, common) for label, entry in systems_tree.items()}
    baseline = str(tree.get("baseline", next(iter(systems))))
    if baseline not in systems:
        raise StudyError(f"{path}: baseline {baseline!r} is not a system (systems: {', '.join(systems)})")
    valid_trials = tree.get("valid_trials")
    valid_speakers = tree.get("valid_speakers")
    if valid_speakers is not None and (not _is_int(valid_speakers) or valid_speakers < 1):
        raise StudyError(f"{path}: 'valid_speakers' must be a positive integer, got {valid_speakers!r}")
    return StudySpec(
        path=path,
        train_roots=train_roots,
        test_root=test_root,
        trials=trials,
        systems=systems,
        seeds=[int(s) for s in seeds],
        baseline=baseline,
        overrides=common,
        valid_trials=None if valid_trials is None else _existing(path, where, valid_trials, "valid_trials"),
        valid_speakers=valid_speakers,
    )


def _system(spec: Path, where: Path, label: str, entry: Any, common: dict) -> SystemSpec:
    """One checked system: composed with its overrides, every grid key one of its composed keys."""
    name = f"{spec}: system {label!r}"
    if not label or "/" in label or label.startswith(".") or any(c.isspace() for c in label):
        raise StudyError(f"{name}: a label names run folders: no spaces, '/' or leading '.'")
    if not isinstance(entry, dict):
        raise StudyError(f"{name}: expected a mapping of {', '.join(SYSTEM_FIELDS)}")
    _known_fields(spec, f" system {label!r}", entry, SYSTEM_FIELDS)
    choices = {kind: entry[kind] for kind in KINDS if entry.get(kind) is not None}
    if "hparams" in entry:
        hparams = _existing(spec, where, entry["hparams"], f"system {label!r} hparams")
    elif len(choices) == len(KINDS):
        hparams = BASE_EXPERIMENT
    else:
        raise StudyError(f"{name}: give 'hparams: FILE', or all of {', '.join(KINDS)} (fragment names)")
    overrides = {**common, **_mapping(spec, f"system {label!r} overrides", entry.get("overrides") or {})}
    grid = _mapping(spec, f"system {label!r} grid", entry.get("grid") or {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values or len({repr(v) for v in values}) < len(values):
            raise StudyError(f"{name}: grid key {key!r} must list distinct values, got {values!r}")
    for key in [*overrides, *grid]:
        if key in STUDY_KEYS:
            what = "'seeds'" if key == "seed" else "the study"
            raise StudyError(f"{name}: {key!r} is set by {what} for every run; remove it from the overrides and grid")
    try:
        composition = compose(hparams, choices, overrides)
    except CompositionError as err:
        raise StudyError(f"{name}: {err}") from None
    for key in grid:
        if key not in composition.key_sources:
            close = difflib.get_close_matches(str(key), list(composition.key_sources), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise StudyError(
                f"{name}: grid key {key!r} is not a key of this system's experiment "
                f"({composition.choices.get('loss')} loss, {Path(hparams).name}){hint}"
            )
    return SystemSpec(label, hparams, choices, overrides, grid)


def _trials(spec: Path, where: Path, value: Any) -> dict[str, Path]:
    """``{label: file}`` from a list of files (labelled by their names) or a mapping; stems must be distinct."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        files = [_existing(spec, where, item, "trials") for item in value]
        trials = {file.stem: file for file in files}
    elif isinstance(value, dict):
        trials = {str(label): _existing(spec, where, item, f"trials {label!r}") for label, item in value.items()}
    else:
        raise StudyError(f"{spec}: 'trials' must be a list of files or map labels to files")
    stems = [file.stem for file in trials.values()]
    if not trials or len(set(stems)) < len(stems):
        raise StudyError(f"{spec}: 'trials' must name one or more files with distinct names (stage 3 names lists so)")
    return trials


def _known_fields(spec: Path, where: str, tree: Mapping, known: tuple[str, ...]) -> None:
    for key in tree:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            raise StudyError(f"{spec}:{where} unknown field {key!r}{hint}")


def _existing(spec: Path, where: Path, value: Any, what: str, folder: bool = False) -> Path:
    if not isinstance(value, str) or not value:
        raise StudyError(f"{spec}: '{what}' must be a path, got {value!r}")
    path = (where / value).resolve()
    if not (path.is_dir() if folder else path.is_file()):
        raise StudyError(f"{spec}: {what} {value!r}: no such {'folder' if folder else 'file'} ({path})")
    return path


def _mapping(spec: Path, what: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise StudyError(f"{spec}: '{what}' must be a mapping of keys to values, got {value!r}")
    return {str(key): item for key, item in value.items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain(tree: Any) -> Any:
    """ruamel's round-trip containers as plain dicts and lists (values keep their YAML types)."""
    if isinstance(tree, Mapping):
        return {key: _plain(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_plain(value) for value in tree]
    if isinstance(tree, float):
        return float(tree)
    if isinstance(tree, bool):
        return bool(tree)
    if isinstance(tree, int):
        return int(tree)
    if isinstance(tree, str):
        return str(tree)
    return tree


def _plain_name(value: Any) -> str:
    """A grid value as it appears in a folder name (``1.5``, ``true``, ``a-b``)."""
    text = str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in ".+-" else "-" for c in text)
