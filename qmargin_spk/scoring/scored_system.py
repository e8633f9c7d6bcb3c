"""A scored system: an experiment folder's stage-3 scores and its own description, read for comparison.

Reads ``EXP/scores/results.<backend>.json`` and the score files next to it (no
re-extraction), and those of every other test root scored on the experiment
(``EXP/scores/<test_name>/``, lists named ``<list>@<test_name>``; :mod:`qmargin_spk.scoring.scored_roots`).
The system's label, loss and loss settings come from the results file's ``experiment`` entry,
written by the experiment itself; two layouts are read:

- current: ``{"name", "label", "backbone", "setting", "loss", "loss_settings": {...}, "finetuned_from"}``;
- older files: ``{"name", "folder", "hparams_file", "loss", "alpha", "scale", "margin", "margin_ramp",
  "finetuned_from"}`` (the loss settings are the keys of :data:`LEGACY_LOSS_SETTINGS`).

Without an entry the label is the folder name. Mistakes in the inputs raise
:class:`CompareError` with a one-line message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from qmargin_spk.scoring.report import read_score_file
from qmargin_spk.scoring.scored_roots import scored_roots

# Keys of an older results file's ``experiment`` entry that hold the loss settings.
LEGACY_LOSS_SETTINGS = ("alpha", "scale", "margin", "margin_ramp")


class CompareError(Exception):
    """A user mistake (missing experiment or score file, mismatched trials): the message is one line."""


@dataclass(frozen=True)
class ScoredList:
    """One system's scores on one trial list, as read from its score file."""

    name: str
    path: Path
    enrol: list[str]
    test: list[str]
    scores: np.ndarray
    labels: np.ndarray
    speakers: dict[str, str] | None = None  # item -> speaker, from ``<list>.speakers`` (None: older runs)


@dataclass(frozen=True)
class ScoredSystem:
    """An experiment folder's scores per list with the identity it describes itself by.

    ``name`` labels the system in tables (unique among the systems compared);
    ``description`` is the results file's ``experiment`` entry as stored (empty if none).
    """

    name: str
    path: Path
    loss: str | None
    loss_settings: dict
    model_id: str | None
    lists: dict[str, ScoredList]
    description: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """JSON-ready identity (no scores)."""
        return {
            "name": self.name,
            "path": str(self.path),
            "loss": self.loss,
            "loss_settings": self.loss_settings,
            "model_id": self.model_id,
            "lists": list(self.lists),
            "description": self.description,
        }


def system_identity(description: Mapping | None, fallback: str) -> tuple[str, str | None, dict]:
    """``(label, loss, loss settings)`` from an ``experiment`` entry of either layout; ``fallback`` labels none.

    Raises ValueError when ``loss_settings`` is present but not a mapping.
    """
    if not description:
        return fallback, None, {}
    label = description.get("label") or description.get("name") or fallback
    if "loss_settings" in description:
        settings = description["loss_settings"] or {}
        if not isinstance(settings, Mapping):
            raise ValueError(f"'loss_settings' must be a mapping, got {type(settings).__name__}")
        settings = dict(settings)
    else:
        settings = {key: description[key] for key in LEGACY_LOSS_SETTINGS if key in description}
    loss = description.get("loss")
    return str(label), None if loss is None else str(loss), settings


def load_scored_system(path: str | os.PathLike, backend: str = "cosine") -> ScoredSystem:
    """Read an experiment's results JSON and score files; raise :class:`CompareError` on anything missing."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{path}: no such experiment folder")
    results_file = path / "scores" / f"results.{backend}.json"
    if not results_file.is_file():
        raise CompareError(f"{path}: no {backend} results ({results_file} is missing; run stage 3 first)")
    try:
        run = json.loads(results_file.read_text(encoding="utf-8"))
        entries = run["results"]
        description = run.get("experiment") or {}
        if not isinstance(description, dict):
            raise TypeError(f"'experiment' must be an object, got {type(description).__name__}")
        label, loss, settings = system_identity(description, path.name)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise CompareError(f"{results_file}: not a stage-3 results file ({error})") from None
    if not entries:
        raise CompareError(f"{results_file}: no trial lists in 'results'")
    lists = {}
    for entry in entries:
        scored = _read_list(path / "scores", entry, backend, results_file)
        lists[scored.name] = scored
    lists |= _other_roots(path, backend, run.get("model_id"))
    return ScoredSystem(label, path, loss, settings, run.get("model_id"), lists, description)


def _other_roots(path: Path, backend: str, model_id: str | None) -> dict[str, ScoredList]:
    """The lists of the experiment's other test roots (``EXP/scores/<test_name>/``), named ``<list>@<test_name>``.

    A root without results of ``backend`` is passed over; one scored with another model is refused.
    """
    try:
        roots = scored_roots(path / "scores")[1:]
    except ValueError as error:
        raise CompareError(str(error)) from None
    lists = {}
    for root in roots:
        results_file = root.folder / f"results.{backend}.json"
        if not results_file.is_file():
            continue
        try:
            run = json.loads(results_file.read_text(encoding="utf-8"))
            entries = list(run["results"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CompareError(f"{results_file}: not a stage-3 results file ({error})") from None
        if run.get("model_id") != model_id:
            raise CompareError(f"{results_file}: scored with another model than {path}'s results: re-run stage 3 on it")
        for entry in entries:
            scored = _read_list(root.folder, entry, backend, results_file)
            lists[root.list_label(scored.name)] = replace(scored, name=root.list_label(scored.name))
    return lists


def load_scored_systems(paths: Sequence[str | os.PathLike], backend: str = "cosine") -> list[ScoredSystem]:
    """Load every system; two with the same label are told apart by the path given (which becomes the label)."""
    paths = [Path(p) for p in paths]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise CompareError("an experiment folder is given twice")
    systems = [load_scored_system(p, backend) for p in paths]
    names = [s.name for s in systems]
    return [replace(s, name=str(p)) if names.count(s.name) > 1 else s for p, s in zip(paths, systems)]


def check_same_trials(a: ScoredList, a_name: str, b: ScoredList, b_name: str) -> None:
    """Systems compared on one list must have scored the same trials, in the same order."""
    if a.labels.size != b.labels.size:
        raise CompareError(
            f"list {a.name!r}: {a_name} has {a.labels.size} trials but {b_name} has {b.labels.size}; "
            "compare systems scored on the same trial list"
        )
    same = (np.array(a.enrol) == np.array(b.enrol)) & (np.array(a.test) == np.array(b.test)) & (a.labels == b.labels)
    if not same.all():
        i = int(np.argmin(same))
        raise CompareError(
            f"list {a.name!r}: trial {i + 1} differs ({a_name}: {a.enrol[i]} {a.test[i]} {a.labels[i]}, "
            f"{b_name}: {b.enrol[i]} {b.test[i]} {b.labels[i]}); compare systems scored on the same trial list"
        )


def _read_list(folder: Path, entry: dict, backend: str, results_file: Path) -> ScoredList:
    """The score file of one results entry: ``<folder>/<list>.<backend>.scores`` (``folder``: the root's results
    folder, ``EXP/scores`` for the first), else the recorded path."""
    try:
        name = entry["list"]
    except (KeyError, TypeError):
        raise CompareError(f"{results_file}: a results entry has no 'list' name") from None
    score_file = folder / f"{name}.{backend}.scores"
    if not score_file.is_file() and entry.get("score_file") and Path(entry["score_file"]).is_file():
        score_file = Path(entry["score_file"])
    if not score_file.is_file():
        raise CompareError(f"{folder}: score file of list {name!r} is missing ({score_file})")
    try:
        enrol, test, scores, labels = read_score_file(score_file)
    except (ValueError, UnicodeDecodeError) as error:
        raise CompareError(str(error).splitlines()[0]) from None
    if not labels.size:
        raise CompareError(f"{score_file}: no trials")
    expected = entry.get("n_trials")
    if expected is not None and expected != labels.size:
        raise CompareError(f"{score_file}: {labels.size} trials but {results_file} says {expected}; re-run stage 3")
    return ScoredList(name, score_file, enrol, test, scores, labels, _read_speakers(folder, entry, name))


def _read_speakers(folder: Path, entry: dict, name: str) -> dict[str, str] | None:
    """The ``item speaker`` file stage 3 wrote beside the scores (``<list>.speakers``), None when absent."""
    speaker_file = folder / f"{name}.speakers"
    if not speaker_file.is_file() and entry.get("speaker_file") and Path(entry["speaker_file"]).is_file():
        speaker_file = Path(entry["speaker_file"])
    if not speaker_file.is_file():
        return None
    speakers = {}
    with open(speaker_file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if len(fields) != 2:
                raise CompareError(f"{speaker_file}:{number}: expected 'item speaker', got {line.strip()!r}")
            speakers[fields[0]] = fields[1]
    return speakers


def trial_speakers(lists: Sequence[tuple[str, ScoredList]]) -> dict[str, str] | None:
    """The speaker of each item of one list, as the systems ``(name, list)`` recorded it; None if none did.

    Systems that recorded speakers must agree on every item (else :class:`CompareError`): the
    bootstrap resamples one set of speakers for all of them.
    """
    recorded = [(name, scored) for name, scored in lists if scored.speakers is not None]
    if not recorded:
        return None
    first_name, first = recorded[0]
    for name, scored in recorded[1:]:
        for item, speaker in scored.speakers.items():
            if first.speakers.get(item, speaker) != speaker:
                raise CompareError(
                    f"list {first.name!r}: {first_name} gives {item} the speaker {first.speakers[item]} but "
                    f"{name} gives it {speaker} ({first.path.with_suffix('').with_suffix('.speakers')}, "
                    f"{scored.path.with_suffix('').with_suffix('.speakers')})"
                )
    return first.speakers
