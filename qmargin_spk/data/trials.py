"""Trial lists: one trial per line in VoxCeleb, Kaldi or CN-Celeb form (detected per file).

Items are paths relative to a wav root (audio trees) or utterance ids (Kaldi dirs, manifests).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
TrialFiles = Mapping[str, PathLike] | Sequence[PathLike]


@dataclass(frozen=True)
class TrialList:
    """One parsed list; arrays are aligned, ``line_numbers`` are 1-based lines of ``path``; ``form`` as detected."""

    name: str
    path: Path
    labels: np.ndarray
    enrol: np.ndarray
    test: np.ndarray
    line_numbers: np.ndarray
    form: str = "voxceleb"

    def __len__(self) -> int:
        return int(self.labels.size)


class MissingTrialFilesError(FileNotFoundError):
    """Some utterances named by trial lists are not under the wav root."""


class TrialPathError(ValueError):
    """A trial names a path that could leave the wav root (absolute, ``..``) or is not canonical."""


# The three line forms a trial list may use, detected per file (docs/metrics.md, "Trial lists").
VOXCELEB, KALDI, CNCELEB = "voxceleb", "kaldi", "cnceleb"
FORM_SYNTAX = {
    VOXCELEB: "'<label> <enrol> <test>' (label 1|0)",
    KALDI: "'<enrol> <test> target|nontarget'",
    CNCELEB: "'<enrol> <test> 1|0'",
}
_BINARY = ("0", "1")
_KALDI_LABELS = ("target", "nontarget")


def line_forms(fields: Sequence[str]) -> set[str]:
    """The forms a line's (three) fields can be read in: any of :data:`VOXCELEB`, :data:`KALDI`, :data:`CNCELEB`."""
    forms = set()
    if fields[0] in _BINARY:
        forms.add(VOXCELEB)
    if fields[2] in _KALDI_LABELS:
        forms.add(KALDI)
    if fields[2] in _BINARY:
        forms.add(CNCELEB)
    return forms


def read_trial_list(path: str | os.PathLike, name: str | None = None) -> TrialList:
    """Parse one list; anything malformed raises ValueError at ``file:line``.

    Lines are ``<label> <enrol> <test>`` (VoxCeleb, label 1|0), ``<enrol> <test> target|nontarget``
    (Kaldi) or ``<enrol> <test> 1|0`` (CN-Celeb); the form is detected per file from all its lines:
    a list whose lines fit no single form (a mixed list) or more than one (an ambiguous list, e.g.
    ``1 a 0`` on every line) is refused, naming a line that shows it. The file must be UTF-8 (a
    byte-order mark is ignored); blank lines are skipped. An exact duplicate of an earlier trial
    (same label, enrol and test, in that order) is dropped, since it would count twice in the
    metrics, and the drops are counted in one warning; the same enrol/test pair with two labels
    is an error.
    """
    path = Path(path)
    rows = _split_lines(path)
    form = _detect_form(path, rows)
    labels, enrol, test, line_numbers = [], [], [], []
    first: dict[tuple[str, str], tuple[int, bool]] = {}
    duplicates: list[int] = []
    for number, fields in rows:
        if form == VOXCELEB:
            target, a, b = fields[0] == "1", fields[1], fields[2]
        else:
            target, a, b = fields[2] in ("1", "target"), fields[0], fields[1]
        earlier = first.setdefault((a, b), (number, target))
        if earlier[0] != number:
            if earlier[1] != target:
                raise ValueError(
                    f"{path}:{number}: trial {a} {b} with label {int(target)} "
                    f"is also on line {earlier[0]} with label {int(earlier[1])}"
                )
            duplicates.append(number)
            continue
        labels.append(target)
        enrol.append(a)
        test.append(b)
        line_numbers.append(number)
    if duplicates:
        logger.warning(
            "%s: %d duplicate trials dropped (the first of each is kept), e.g. %s:%d",
            path,
            len(duplicates),
            path,
            duplicates[0],
        )
    return TrialList(
        name=name or path.stem,
        path=path,
        labels=np.array(labels, dtype=np.int8),
        enrol=np.array(enrol, dtype=str),
        test=np.array(test, dtype=str),
        line_numbers=np.array(line_numbers, dtype=np.int64),
        form=form,
    )


def _split_lines(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, three fields)`` of every non-blank line; ValueError at ``file:line`` for another count."""
    rows = []
    for number, line in enumerate(io.StringIO(read_utf8_text(path), newline=None), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(
                f"{path}:{number}: expected '<label> <enrol> <test>' (or '<enrol> <test> target|nontarget', "
                f"'<enrol> <test> 1|0'), got {line.strip()!r}"
            )
        rows.append((number, fields))
    if not rows:
        raise ValueError(f"{path}: no trials")
    return rows


def _detect_form(path: Path, rows: list[tuple[int, list[str]]]) -> str:
    """The one form every line fits; ValueError naming the line that breaks it (or shows the ambiguity)."""
    possible = set(FORM_SYNTAX)
    decided_by = 0  # the first line that narrowed the forms
    for number, fields in rows:
        forms = line_forms(fields)
        if not forms:
            raise ValueError(f"{path}:{number}: {_no_form_message(possible, fields)}")
        if not forms & possible:
            raise ValueError(
                f"{path}:{number}: a line in {_names(forms)} form in a list in {_names(possible)} form "
                f"(line {decided_by}): a trial list uses one form throughout"
            )
        if forms & possible != possible:
            possible &= forms
            decided_by = number
    if len(possible) > 1:
        raise ValueError(
            f"{path}:{rows[0][0]}: ambiguous trial list, every line reads as {_names(possible, ' and ')} form "
            f"({' or '.join(FORM_SYNTAX[form] for form in sorted(possible))}); rewrite it in one unambiguous form"
        )
    return possible.pop()


def _no_form_message(possible: set[str], fields: list[str]) -> str:
    """Why a line fits no form, in the terms of the form(s) the list is in so far."""
    if possible == {VOXCELEB}:
        return f"label must be 0 or 1, got {fields[0]!r}"
    if possible == {CNCELEB}:
        return f"label (third field) must be 1 or 0, got {fields[2]!r}"
    if possible == {KALDI}:
        return f"label (third field) must be target or nontarget, got {fields[2]!r}"
    syntax = ", ".join(FORM_SYNTAX[form] for form in sorted(possible))
    return f"no label: expected one of {syntax}, got {' '.join(fields)!r}"


def _names(forms: set[str], joiner: str = " or ") -> str:
    return joiner.join(sorted(forms))


def read_utf8_text(path: Path) -> str:
    """The text of ``path`` (UTF-8, without a byte-order mark); ValueError at ``file:line`` if it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text ({err.reason}, byte {data[err.start : err.start + 1]!r})"
        ) from None


def read_trial_lists(trial_files: TrialFiles) -> list[TrialList]:
    """Parse several lists (a name -> path mapping, or paths named by their stem); names must differ."""
    items = trial_files.items() if isinstance(trial_files, Mapping) else [(None, p) for p in trial_files]
    lists = [read_trial_list(path, name) for name, path in items]
    names = [trials.name for trials in lists]
    if len(set(names)) != len(names):
        raise ValueError(f"trial lists need distinct names, got {names}")
    return lists


def check_trial_labels(trial_lists: Sequence[TrialList]) -> None:
    """Raise ValueError naming the first list that holds only target or only non-target trials.

    EER, minDCF and TAR@FAR need both kinds; the prepare and scoring stages check
    this before they write anything.
    """
    for trials in trial_lists:
        targets = int(trials.labels.sum())
        if targets in (0, len(trials)):
            kind = "non-target" if targets == 0 else "target"
            raise ValueError(
                f"{trials.path}: only {kind} trials ({len(trials)}); the metrics need both target and non-target trials"
            )


def unique_utterances(trial_lists: Sequence[TrialList]) -> np.ndarray:
    """Sorted unique utterances referenced by any of the lists (enrol or test side)."""
    return np.unique(np.concatenate([np.r_[t.enrol, t.test] for t in trial_lists]))


def path_problem(utterance: str) -> str | None:
    """Why ``utterance`` cannot name a file inside a wav root, or None.

    Only canonical relative paths are accepted (no leading ``/``, no empty, ``.`` or
    ``..`` component), so a trial can never reach outside the root and names each
    file one way only (the way manifests do). Checked on the text, not the disk:
    symbolic links inside the root are the data owner's choice.
    """
    if utterance.startswith("/"):
        return "an absolute path"
    if any(part in ("", ".", "..") for part in utterance.split("/")):
        return "a path with an empty, '.' or '..' component"
    return None


def check_trial_paths(trial_lists: Sequence[TrialList], max_listed: int = 10) -> None:
    """Raise :class:`TrialPathError` unless every utterance is a canonical relative path (:func:`path_problem`).

    Both the prepare and the scoring stage call this (through :func:`check_trial_files`).
    """
    bad = [(utt, problem) for utt in unique_utterances(trial_lists) if (problem := path_problem(utt)) is not None]
    if not bad:
        return
    listed = [
        f"{_first_reference(trial_lists, utt, quoted=True)} is not a relative path inside the wav root ({problem})"
        for utt, problem in bad[:max_listed]
    ]
    more = len(bad) - len(listed)
    raise TrialPathError(
        f"{len(bad)} utterances in the trial lists are not relative paths inside the wav root:\n"
        + "\n".join(listed)
        + (f"\n... and {more} more" if more else "")
    )


def check_trial_files(
    trial_lists: Sequence[TrialList],
    wav_root: str | os.PathLike,
    max_listed: int = 10,
    models: Collection[str] = (),
) -> None:
    """Raise unless every utterance is a file inside ``wav_root``.

    First :func:`check_trial_paths` (:class:`TrialPathError`), then existence:
    :class:`MissingTrialFilesError` counts all missing files and lists the first
    ``max_listed`` of them as ``list_file:line: utterance`` (the first line referencing each).
    Enrolment items in ``models`` (enrollment model ids) are not files and are not checked.
    """
    lists = [_without_models(trials, models) for trials in trial_lists]
    check_trial_paths(lists, max_listed)
    root = Path(wav_root)
    check_trial_items(lists, lambda utt: (root / utt).is_file(), f"missing under {root}", max_listed)


def check_trial_items(
    trial_lists: Sequence[TrialList],
    present: Callable[[str], bool],
    where: str,
    max_listed: int = 10,
    models: Collection[str] = (),
) -> None:
    """Raise :class:`MissingTrialFilesError` unless ``present(item)`` holds for every trial item.

    ``where`` ends the message (``missing under ROOT``, ``not in the test manifest M``); the first
    ``max_listed`` absent items are listed as ``list_file:line: item``. Enrolment items in ``models``
    are skipped.
    """
    lists = [_without_models(trials, models) for trials in trial_lists]
    utterances = unique_utterances(lists) if lists else np.array([], dtype=str)
    missing = [utt for utt in utterances.tolist() if not present(utt)]
    if not missing:
        return
    listed = [_first_reference(lists, utt) for utt in missing[:max_listed]]
    more = len(missing) - len(listed)
    raise MissingTrialFilesError(
        f"{len(missing)} of {len(utterances)} utterances in the trial lists are {where}:\n  "
        + "\n  ".join(listed)
        + (f"\n  ... and {more} more" if more else "")
    )


def _without_models(trials: TrialList, models: Collection[str]) -> TrialList:
    """``trials`` with enrolment items that are models replaced by a test item of the same trial (checked anyway)."""
    if not models:
        return trials
    is_model = np.isin(trials.enrol, np.asarray(list(models), dtype=str))
    return replace(trials, enrol=np.where(is_model, trials.test, trials.enrol))


def _first_reference(trial_lists: Sequence[TrialList], utterance: str, quoted: bool = False) -> str:
    """``file:line: utterance`` (``repr`` of it if ``quoted``) for the first trial that names ``utterance``."""
    for trials in trial_lists:
        hits = np.flatnonzero((trials.enrol == utterance) | (trials.test == utterance))
        if hits.size:
            return f"{trials.path}:{trials.line_numbers[hits[0]]}: {repr(str(utterance)) if quoted else utterance}"
    raise AssertionError(f"{utterance} is not in the trial lists")
