"""The recipe's prepare stage: VoxCeleb-layout audio trees -> checked manifests.

Inputs are roots laid out as ``<root>/wav/<spk>/<video>/<utt>.wav`` (VoxCeleb1) or
``<root>/aac/<spk>/<video>/<utt>.m4a`` (VoxCeleb2 dev), plus trial lists whose paths
are relative to the test root's ``wav/``. Everything that could break a later stage
is found here, once:

- m4a files are decoded with ffmpeg into the same root's ``wav/`` tree (threads
  running ffmpeg processes; resumable; failures listed, not fatal);
- unreadable, empty, non-mono, NaN/inf and too short files (training: under
  ``min_duration``; test: under the model's shortest input, when given), and
  dangling or looping symbolic links, are skipped, one reason per file in
  ``skipped.txt`` (samples are read only where their coding can hold NaN/inf, see
  :func:`~qmargin_spk.data.audio.check_finite_samples`);
- files at another sample rate are kept and listed in ``resampled.txt``;
  :func:`qmargin_spk.data.audio.load_audio` resamples them on every load, so
  durations here are in seconds, whatever the file's rate;
- training and test speakers must be disjoint (VoxCeleb1-E/H use all of VoxCeleb1);
- every trial must name a usable test utterance by a canonical relative path inside
  the test root's ``wav/``, with a label that agrees with the speaker folders, and
  every list must hold both target and non-target trials (parsing, paths, labels and
  file checks shared with :mod:`qmargin_spk.data.trials`).

Outputs in ``out_dir`` (all written atomically, and only after every check passed, so
a failed prepare leaves no new output): ``train.csv`` and ``test.csv``
(``ID,wav,duration,spk_id``; ``ID`` is ``spk/video/utt``, ``wav`` an absolute path,
``duration`` seconds), ``skipped.txt``, ``resampled.txt``, ``conversion_failures.txt``
and, last, ``prepare_done.json``, which holds a cheap fingerprint of the inputs (file
counts, sizes, newest mtimes, settings) so that re-running a finished prepare does
nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from qmargin_spk.data.audio import AudioError, audio_info, check_finite_samples
from qmargin_spk.data.m4a import FfmpegMissingError, convert_m4a
from qmargin_spk.data.manifest import ManifestRow, utterance_id, write_manifest
from qmargin_spk.data.trials import (
    MissingTrialFilesError,
    TrialList,
    check_trial_files,
    check_trial_labels,
    read_trial_lists,
    unique_utterances,
)
from qmargin_spk.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

DONE_MARKER = "prepare_done.json"
MARKER_VERSION = 1
MAX_LISTED_PROBLEMS = 10

PathLike = str | os.PathLike


class PrepareError(RuntimeError):
    """Inputs that cannot give a usable data set; the message says what and where."""


@dataclass(frozen=True)
class PrepareResult:
    """What the prepare stage produced; ``reused`` is True when a finished run was found."""

    out_dir: Path
    train_manifest: Path
    test_manifest: Path
    trial_files: list[Path]
    num_train_utterances: int
    num_train_speakers: int
    num_test_utterances: int
    num_test_speakers: int
    num_skipped: int
    num_resampled: int
    num_conversion_failures: int
    reused: bool = False

    def to_json(self) -> dict:
        """Plain JSON values (paths as strings)."""
        data = asdict(self) | {"trial_files": [str(p) for p in self.trial_files]}
        return {key: str(value) if isinstance(value, Path) else value for key, value in data.items()}

    @classmethod
    def from_json(cls, data: dict) -> PrepareResult:
        path_fields = {"out_dir", "train_manifest", "test_manifest"}
        values = {f.name: data[f.name] for f in fields(cls)}
        values.update({k: Path(values[k]) for k in path_fields})
        values["trial_files"] = [Path(p) for p in values["trial_files"]]
        return cls(**values)


def _audio_files(folder: Path, extension: str) -> list[Path]:
    """Files ``<folder>/<spk>/<video>/<utt>.<extension>``, sorted."""
    return sorted(folder.glob(f"*/*/*.{extension}")) if folder.is_dir() else []


def _check_layout(root: Path) -> None:
    if not root.is_dir():
        raise PrepareError(f"{root}: no such folder")
    if not (root / "wav").is_dir() and not (root / "aac").is_dir():
        raise PrepareError(f"{root}: no wav/ or aac/ folder (expected <root>/wav/<spk>/<video>/<utt>.wav)")


# --- scanning ---------------------------------------------------------------------


@dataclass
class RootScan:
    """One root's usable utterances, skipped files (with reasons) and files needing resampling."""

    rows: list[ManifestRow]
    skipped: list[tuple[Path, str]]
    resampled: list[tuple[Path, int]]


def scan_root(root: Path, sample_rate: int, min_duration: float, num_workers: int, min_samples: int = 0) -> RootScan:
    """Check every wav under ``root/wav`` (header; samples if they may be NaN/inf); sort usable files from the rest.

    Files under ``min_samples`` (the model's shortest input, at ``sample_rate``) are skipped.
    """
    paths = _audio_files(root / "wav", "wav")
    if not paths:
        raise PrepareError(f"{root}: no audio files under {root / 'wav'} (expected <spk>/<video>/<utt>.wav)")

    def probe(path: Path):
        try:
            info = audio_info(path)
            check_finite_samples(path, info)
            return info, None
        except AudioError as err:
            return None, str(err).removeprefix(f"{path}: ")

    scan = RootScan([], [], [])
    with ThreadPoolExecutor(num_workers) as pool:
        for path, (info, problem) in zip(paths, pool.map(probe, paths, chunksize=64)):
            if info is not None and info.duration < min_duration:
                problem = f"too short ({info.duration:.2f} s < min_duration {min_duration} s)"
            elif info is not None and info.frames * sample_rate // info.sample_rate < min_samples:
                problem = f"too short for the model ({info.duration:g} s < its minimum {min_samples / sample_rate:g} s)"
            if problem is not None:
                scan.skipped.append((path, problem))
                continue
            if info.sample_rate != sample_rate:
                scan.resampled.append((path, info.sample_rate))
            relative = path.relative_to(root / "wav").as_posix()
            scan.rows.append(
                ManifestRow(utterance_id(relative), os.path.abspath(path), info.duration, relative.split("/")[0])
            )
    if scan.skipped:
        logger.warning("%s: skipped %d of %d files, e.g. %s: %s", root, len(scan.skipped), len(paths), *scan.skipped[0])
    if not scan.rows:
        raise PrepareError(
            f"{root}: none of the {len(paths)} audio files is usable, e.g. {scan.skipped[0][0]}: {scan.skipped[0][1]}"
        )
    return scan


# --- checks -----------------------------------------------------------------------


def check_disjoint_speakers(train_speakers: set[str], test_speakers: set[str], allow_overlap: bool = False) -> None:
    """Refuse (or, with ``allow_overlap``, warn) when a test speaker is also a training speaker."""
    shared = sorted(train_speakers & test_speakers)
    if not shared:
        return
    message = (
        f"{len(shared)} speakers are in both training and test data, e.g. {', '.join(shared[:5])}; "
        "results on this test set would be optimistic"
    )
    if not allow_overlap:
        raise PrepareError(message + " (pass allow_overlap to continue anyway)")
    logger.warning(message)


def validate_trial_lists(
    trial_files: Sequence[Path], test_root: Path, usable_ids: set[str], skipped: dict[str, str]
) -> list[TrialList]:
    """Check trial lists against the scanned test root; every problem is reported as ``file:line``.

    Parsing and the existence of files are checked by :mod:`qmargin_spk.data.trials`
    (the same code that scoring uses); on top of that every utterance must be usable
    (not in ``skipped``), each label must agree with the speaker folders, and each list
    must hold both target and non-target trials.
    """
    for path in trial_files:
        if not path.is_file():
            raise PrepareError(f"{path}: trial list not found")
    try:
        lists = read_trial_lists(trial_files)
        check_trial_files(lists, test_root / "wav")
    except (ValueError, MissingTrialFilesError) as err:
        raise PrepareError(str(err)) from err
    unusable = {
        u: skipped.get(utterance_id(u), "not in the test manifest")
        for u in unique_utterances(lists)
        if utterance_id(u) not in usable_ids
    }
    problems: list[str] = []
    for trials in lists:
        found: list[tuple[int, str]] = []
        for side in (trials.enrol, trials.test):
            for i in np.flatnonzero(np.isin(side, list(unusable))):
                found.append((trials.line_numbers[i], f"{side[i]} is unusable ({unusable[side[i]]})"))
        same_speaker = np.char.partition(trials.enrol, "/")[:, 0] == np.char.partition(trials.test, "/")[:, 0]
        for i in np.flatnonzero(same_speaker != trials.labels.astype(bool)):
            found.append(
                (
                    trials.line_numbers[i],
                    f"label {trials.labels[i]} disagrees with the speakers of {trials.enrol[i]} and {trials.test[i]}",
                )
            )
        problems += [f"{trials.path}:{line}: {message}" for line, message in sorted(found)]
    if problems:
        more = f"\n... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise PrepareError(
            f"{len(problems)} problems in the trial lists:\n" + "\n".join(problems[:MAX_LISTED_PROBLEMS]) + more
        )
    try:
        check_trial_labels(lists)
    except ValueError as err:
        raise PrepareError(str(err)) from err
    return lists


# --- fingerprint ------------------------------------------------------------------


def _stat(path: Path) -> os.stat_result:
    """The file's status, or the link's own for a dangling or looping symbolic link."""
    try:
        return path.stat()
    except OSError:
        return path.lstat()


def _tree_summary(paths: list[Path]) -> dict:
    stats = [_stat(p) for p in paths]
    return {
        "files": len(stats),
        "bytes": sum(s.st_size for s in stats),
        "newest_mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
    }


def input_fingerprint(
    train_roots: Sequence[Path], test_root: Path, trial_files: Sequence[Path], settings: dict
) -> dict:
    """A cheap summary of everything prepare reads: audio trees (counts, sizes, mtimes), trial lists, settings."""
    trees = {
        str(root): {
            ext: _tree_summary(_audio_files(root / folder, ext)) for folder, ext in (("wav", "wav"), ("aac", "m4a"))
        }
        for root in [*train_roots, test_root]
    }
    trials = {str(p): _tree_summary([p]) if p.is_file() else None for p in trial_files}
    return {"version": MARKER_VERSION, "trees": trees, "trials": trials, "settings": settings}


def _write_listing(path: Path, entries: Iterable[tuple[object, object]]) -> None:
    atomic_write_text(path, "".join(f"{a}\t{b}\n" for a, b in entries))


# --- the stage --------------------------------------------------------------------


def prepare(
    train_roots: Sequence[PathLike],
    test_root: PathLike,
    trial_files: Sequence[PathLike],
    out_dir: PathLike,
    min_duration: float = 0.5,
    sample_rate: int = 16000,
    allow_overlap: bool = False,
    num_workers: int = 4,
    test_min_samples: int = 0,
) -> PrepareResult:
    """Decode, scan and check the data; write manifests and listings to ``out_dir``.

    ``min_duration`` (seconds) applies to training files only: a test file is kept if
    it is readable and at least ``test_min_samples`` long (the model's shortest input at
    ``sample_rate``; trials naming a shorter file are refused). Raises :class:`PrepareError` for a
    missing layout, a root without usable audio, duplicate training ids, overlapping
    speakers (unless ``allow_overlap``) and bad trial lists.
    """
    train_roots = [Path(os.path.abspath(r)) for r in train_roots]
    test_root = Path(os.path.abspath(test_root))
    trial_paths = [Path(os.path.abspath(t)) for t in trial_files]
    out_dir = Path(out_dir)
    settings = {"min_duration": min_duration, "sample_rate": sample_rate, "allow_overlap": allow_overlap}
    settings |= {"test_min_samples": test_min_samples} if test_min_samples else {}  # earlier fingerprints stay valid
    if not train_roots:
        raise PrepareError("no training root given")
    for root in [*train_roots, test_root]:
        _check_layout(root)

    marker = out_dir / DONE_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        outputs_present = all((out_dir / name).is_file() for name in ("train.csv", "test.csv"))
        if outputs_present and done.get("fingerprint") == input_fingerprint(
            train_roots, test_root, trial_paths, settings
        ):
            logger.info("%s: inputs unchanged since the last prepare, nothing to do", out_dir)
            return PrepareResult.from_json(done["result"] | {"reused": True})
        marker.unlink()

    try:
        failures = convert_m4a([*train_roots, test_root], sample_rate, num_workers)
    except FfmpegMissingError as err:
        raise PrepareError(str(err)) from None
    fingerprint = input_fingerprint(train_roots, test_root, trial_paths, settings)  # the inputs as scanned below

    train = [scan_root(root, sample_rate, min_duration, num_workers) for root in train_roots]
    test = scan_root(test_root, sample_rate, 0.0, num_workers, test_min_samples)
    train_rows = [row for scan in train for row in scan.rows]
    duplicates = [utt for utt, count in Counter(row.id for row in train_rows).items() if count > 1]
    if duplicates:
        raise PrepareError(
            f"{len(duplicates)} utterance ids occur in more than one training root, e.g. {duplicates[0]}"
        )
    check_disjoint_speakers({r.spk_id for r in train_rows}, {r.spk_id for r in test.rows}, allow_overlap)

    test_skipped = {utterance_id(p.relative_to(test_root / "wav").as_posix()): why for p, why in test.skipped}
    for trials in validate_trial_lists(trial_paths, test_root, {row.id for row in test.rows}, test_skipped):
        logger.info(
            "%s: %d target and %d non-target trials",
            trials.path,
            trials.labels.sum(),
            len(trials) - trials.labels.sum(),
        )

    scans = [*train, test]
    _write_listing(out_dir / "conversion_failures.txt", failures)
    write_manifest(out_dir / "train.csv", train_rows)
    write_manifest(out_dir / "test.csv", test.rows)
    _write_listing(out_dir / "skipped.txt", [entry for scan in scans for entry in scan.skipped])
    _write_listing(out_dir / "resampled.txt", [entry for scan in scans for entry in scan.resampled])
    result = PrepareResult(
        out_dir=out_dir,
        train_manifest=out_dir / "train.csv",
        test_manifest=out_dir / "test.csv",
        trial_files=trial_paths,
        num_train_utterances=len(train_rows),
        num_train_speakers=len({r.spk_id for r in train_rows}),
        num_test_utterances=len(test.rows),
        num_test_speakers=len({r.spk_id for r in test.rows}),
        num_skipped=sum(len(scan.skipped) for scan in scans),
        num_resampled=sum(len(scan.resampled) for scan in scans),
        num_conversion_failures=len(failures),
    )
    atomic_write_text(marker, json.dumps({"fingerprint": fingerprint, "result": result.to_json()}, indent=1) + "\n")
    return result
