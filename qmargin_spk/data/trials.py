"""VoxCeleb trial lists: ``<label> <enrol> <test>`` per line, paths relative to a wav root."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]
TrialFiles = Union[Mapping[str, PathLike], Sequence[PathLike]]


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


def read_trial_list(path: str | os.PathLike, name: str | None = None) -> TrialList:
    """Parse one list; blank lines are skipped, anything else malformed raises ValueError at file:line."""
    path = Path(path)
    labels, enrol, test, line_numbers = [], [], [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise ValueError(f"{path}:{number}: expected '<label> <enrol> <test>', got {line.strip()!r}")
            if fields[0] not in ("0", "1"):
                raise ValueError(f"{path}:{number}: label must be 0 or 1, got {fields[0]!r}")
            labels.append(fields[0] == "1")
            enrol.append(fields[1])
            test.append(fields[2])
            line_numbers.append(number)
    if not labels:
        raise ValueError(f"{path}: no trials")
    return TrialList(
        name=name or path.stem,
        path=path,
        labels=np.array(labels, dtype=np.int8),
        enrol=np.array(enrol, dtype=str),
        test=np.array(test, dtype=str),
        line_numbers=np.array(line_numbers, dtype=np.int64),
    )


def read_trial_lists(trial_files: TrialFiles) -> list[TrialList]:
    """Parse several lists (a name -> path mapping, or paths named by their stem); names must differ."""
    items = trial_files.items() if isinstance(trial_files, Mapping) else [(None, p) for p in trial_files]
    lists = [read_trial_list(path, name) for name, path in items]
    names = [trials.name for trials in lists]
    if len(set(names)) != len(names):
        raise ValueError(f"trial lists need distinct names, got {names}")
    return lists


def unique_utterances(trial_lists: Sequence[TrialList]) -> np.ndarray:
    """Sorted unique utterances referenced by any of the lists (enrol or test side)."""
    return np.unique(np.concatenate([np.r_[t.enrol, t.test] for t in trial_lists]))


def check_trial_files(
    trial_lists: Sequence[TrialList], wav_root: str | os.PathLike, max_listed: int = 10
) -> None:
    """Raise :class:`MissingTrialFilesError` unless every utterance exists under ``wav_root``.

    The message counts all missing files and lists the first ``max_listed`` of them
    as ``list_file:line: utterance`` (the first line referencing each).
    """
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


def _first_reference(trial_lists: Sequence[TrialList], utterance: str) -> str:
    """``file:line: utterance`` for the first trial that names ``utterance``."""
    for trials in trial_lists:
        hits = np.flatnonzero((trials.enrol == utterance) | (trials.test == utterance))
        if hits.size:
            return f"{trials.path}:{trials.line_numbers[hits[0]]}: {utterance}"
    raise AssertionError(f"{utterance} is not in the trial lists")
