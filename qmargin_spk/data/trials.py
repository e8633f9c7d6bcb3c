"""VoxCeleb trial lists: ``<label> <enrol> <test>`` per line, paths relative to a wav root."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
TrialFiles = Mapping[str, PathLike] | Sequence[PathLike]


@dataclass(frozen=True)
class TrialList:
    """One parsed list; arrays are aligned, ``line_numbers`` are 1-based lines of ``path``."""

    name: str
    path: Path
    labels: np.ndarray
    enrol: np.ndarray
    test: np.ndarray
    line_numbers: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.size)


class MissingTrialFilesError(FileNotFoundError):
    """Some utterances named by trial lists are not under the wav root."""


class TrialPathError(ValueError):
    """A trial names a path that could leave the wav root (absolute, ``..``) or is not canonical."""


def read_trial_list(path: str | os.PathLike, name: str | None = None) -> TrialList:
    """Parse one list; anything malformed raises ValueError at ``file:line``.

    The file must be UTF-8 (a byte-order mark is ignored); blank lines are skipped.
    An exact duplicate of an earlier trial (same label, enrol and test, in that order)
    is dropped, since it would count twice in the metrics, and the drops are counted in
    one warning; the same enrol/test pair with two labels is an error.
    """
    path = Path(path)
    labels, enrol, test, line_numbers = [], [], [], []
    first: dict[tuple[str, str], tuple[int, str]] = {}
    duplicates: list[int] = []
    for number, line in enumerate(io.StringIO(_read_utf8(path), newline=None), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(f"{path}:{number}: expected '<label> <enrol> <test>', got {line.strip()!r}")
        if fields[0] not in ("0", "1"):
            raise ValueError(f"{path}:{number}: label must be 0 or 1, got {fields[0]!r}")
        earlier = first.setdefault((fields[1], fields[2]), (number, fields[0]))
        if earlier[0] != number:
            if earlier[1] != fields[0]:
                raise ValueError(
                    f"{path}:{number}: trial {fields[1]} {fields[2]} with label {fields[0]} "
                    f"is also on line {earlier[0]} with label {earlier[1]}"
                )
            duplicates.append(number)
            continue
        labels.append(fields[0] == "1")
        enrol.append(fields[1])
        test.append(fields[2])
        line_numbers.append(number)
    if not labels:
        raise ValueError(f"{path}: no trials")
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
    )


def _read_utf8(path: Path) -> str:
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


def check_trial_files(trial_lists: Sequence[TrialList], wav_root: str | os.PathLike, max_listed: int = 10) -> None:
    """Raise unless every utterance is a file inside ``wav_root``.

    First :func:`check_trial_paths` (:class:`TrialPathError`), then existence:
    :class:`MissingTrialFilesError` counts all missing files and lists the first
    ``max_listed`` of them as ``list_file:line: utterance`` (the first line referencing each).
    """
    check_trial_paths(trial_lists, max_listed)
    root = Path(wav_root)
    utterances = unique_utterances(trial_lists)
    missing = [utt for utt in utterances if not (root / utt).is_file()]
    if not missing:
        return
    listed = [_first_reference(trial_lists, utt) for utt in missing[:max_listed]]
    more = len(missing) - len(listed)
    raise MissingTrialFilesError(
        f"{len(missing)} of {len(utterances)} utterances in the trial lists are missing under {root}:\n  "
        + "\n  ".join(listed)
        + (f"\n  ... and {more} more" if more else "")
    )


def _first_reference(trial_lists: Sequence[TrialList], utterance: str, quoted: bool = False) -> str:
    """``file:line: utterance`` (``repr`` of it if ``quoted``) for the first trial that names ``utterance``."""
    for trials in trial_lists:
        hits = np.flatnonzero((trials.enrol == utterance) | (trials.test == utterance))
        if hits.size:
            return f"{trials.path}:{trials.line_numbers[hits[0]]}: {repr(str(utterance)) if quoted else utterance}"
    raise AssertionError(f"{utterance} is not in the trial lists")
