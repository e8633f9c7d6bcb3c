"""A validation list for training, kept apart from the test lists: held-out training speakers or a given list.

Stage 1 runs this after the prepare work, on the manifests it wrote. Either ``num_speakers``
training speakers are drawn with ``data_seed`` (kept apart from the training seed, so every run
of a study validates on the same speakers), or a trial list names the validation utterances
(training-side ones by their ids, or separate ones under a VoxCeleb-layout ``valid_root``). The
speakers of the validation utterances are removed from ``train.csv`` (the prepare's full
training manifest is kept as ``train_full.csv``), and the data folder gets:

- ``valid_speakers.txt``: the held-out speakers, one a line;
- ``valid.csv``: the validation utterances (a manifest: ``ID,wav,duration,spk_id``);
- ``valid_trials.txt``: ``<label> <enrol> <test>`` lines naming them (``<ID>.wav``), targets and non-targets;
- ``valid_split.json``: the settings and the SHA-256 of the full manifest (written before ``train.csv``).

Re-running with the same settings on the same full manifest changes nothing; the split is a
function of the speaker and utterance ids and ``data_seed`` only (ranked by a SHA-256 of the
seed and the id, so adding speakers to the corpus rarely changes the drawn ones). Without a
validation setting, an earlier split is undone (``train.csv`` is the full manifest again).
A list that is a test list (the same file or bytes as one of them), that names a test speaker,
or whose ``valid_root`` is the test root is refused: validation must never see the test data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qmargin_spk.data.audio import AudioError, audio_info
from qmargin_spk.data.manifest import ManifestRow, read_manifest, utterance_id, write_manifest
from qmargin_spk.data.synthetic import make_trials
from qmargin_spk.data.trials import MissingTrialFilesError, check_trial_files, check_trial_labels, read_trial_list
from qmargin_spk.utils.atomic import atomic_write_text
from qmargin_spk.utils.hashing import file_sha256

logger = logging.getLogger(__name__)

TRAIN_FILE = "train.csv"
FULL_TRAIN_FILE = "train_full.csv"
SPEAKERS_FILE = "valid_speakers.txt"
MANIFEST_FILE = "valid.csv"
TRIALS_FILE = "valid_trials.txt"
RECORD_FILE = "valid_split.json"
SPLIT_VERSION = 1

PathLike = str | os.PathLike


class ValidationSplitError(ValueError):
    """A validation setting that cannot give a usable, test-free validation list; the message names the file."""


@dataclass(frozen=True)
class ValidationSplit:
    """What the split wrote: the held-out speakers, the validation manifest and trial list, and counts."""

    speakers: tuple[str, ...]
    manifest: Path
    trials: Path
    num_utterances: int
    num_target_trials: int
    num_nontarget_trials: int
    num_train_utterances: int
    reused: bool

    def to_json(self) -> dict:
        """Plain JSON values for the stage's summary."""
        return {
            "valid_speakers": len(self.speakers),
            "valid_manifest": str(self.manifest),
            "valid_trials": str(self.trials),
            "valid_utterances": self.num_utterances,
            "valid_target_trials": self.num_target_trials,
            "valid_nontarget_trials": self.num_nontarget_trials,
            "train_utterances_after_split": self.num_train_utterances,
            "reused": self.reused,
        }


def split_validation(
    data_dir: PathLike,
    num_speakers: int | None = None,
    trial_file: PathLike | None = None,
    valid_root: PathLike | None = None,
    data_seed: int = 0,
    utts_per_speaker: int = 8,
    test_trial_files: Sequence[PathLike] = (),
    test_root: PathLike | None = None,
) -> ValidationSplit | None:
    """Hold validation speakers out of ``data_dir/train.csv`` and write the validation files (module docstring).

    Give ``num_speakers`` (drawn with ``data_seed``; up to ``utts_per_speaker`` utterances each, every
    pair a trial, targets across videos) or ``trial_file`` (``valid_root``: a folder with ``wav/``
    for utterances outside the training data). ``test_trial_files`` and ``test_root`` are the test
    data the list must stay clear of (``data_dir/test.csv`` names the test speakers). Returns None
    when neither is given, after undoing an earlier split.
    """
    data_dir = Path(data_dir)
    if num_speakers is not None and trial_file is not None:
        raise ValidationSplitError("give either a number of validation speakers or a validation trial list, not both")
    if not num_speakers and trial_file is None:
        if (data_dir / RECORD_FILE).is_file():
            _undo(data_dir, _full_training_rows(data_dir))
        return None
    full_rows = _full_training_rows(data_dir)
    settings = {
        "version": SPLIT_VERSION,
        "num_speakers": num_speakers,
        "trial_file": None if trial_file is None else str(Path(trial_file).resolve()),
        "trial_file_sha256": None if trial_file is None else _sha256_or_none(trial_file),
        "valid_root": None if valid_root is None else str(Path(valid_root).resolve()),
        "data_seed": int(data_seed),
        "utts_per_speaker": int(utts_per_speaker),
        "full_sha256": file_sha256(data_dir / FULL_TRAIN_FILE),
    }
    record = _read_record(data_dir)
    outputs = [data_dir / name for name in (SPEAKERS_FILE, MANIFEST_FILE, TRIALS_FILE)]
    if record is not None and record.get("settings") == settings and all(path.is_file() for path in outputs):
        train_rows = read_manifest(data_dir / TRAIN_FILE)
        if {row.spk_id for row in train_rows}.isdisjoint(record["speakers"]):
            logger.info("%s: validation split unchanged since the last prepare", data_dir)
            return _result(data_dir, record["speakers"], len(train_rows), reused=True)

    test_speakers = _test_speakers(data_dir)
    if trial_file is not None:
        valid_rows, lines = _rows_of_trial_list(
            Path(trial_file), full_rows, valid_root, test_trial_files, test_root, test_speakers
        )
    else:
        valid_rows = _draw_speakers(full_rows, int(num_speakers), int(data_seed), int(utts_per_speaker))
        lines = _all_pairs(valid_rows, int(data_seed))
    speakers = sorted({row.spk_id for row in valid_rows})
    shared = sorted(set(speakers) & test_speakers)
    if shared:
        raise ValidationSplitError(f"validation speakers {shared[:5]} are test speakers (data/test.csv)")
    train_rows = [row for row in full_rows if row.spk_id not in set(speakers)]
    if not train_rows:
        raise ValidationSplitError(f"holding out {len(speakers)} validation speakers leaves no training speaker")

    atomic_write_text(data_dir / SPEAKERS_FILE, "".join(f"{speaker}\n" for speaker in speakers))
    write_manifest(data_dir / MANIFEST_FILE, valid_rows)
    atomic_write_text(data_dir / TRIALS_FILE, "".join(f"{line}\n" for line in lines))
    # The record before the reduced train.csv: a run killed in between finds train.csv full and redoes the split.
    atomic_write_text(data_dir / RECORD_FILE, json.dumps({"settings": settings, "speakers": speakers}, indent=1) + "\n")
    write_manifest(data_dir / TRAIN_FILE, train_rows)
    logger.info(
        "%s: %d validation speakers held out of training (%d utterances, %d trials)",
        data_dir,
        len(speakers),
        len(valid_rows),
        len(lines),
    )
    return _result(data_dir, speakers, len(train_rows), reused=False)


def draw_speakers(speakers: Sequence[str], num: int, data_seed: int) -> list[str]:
    """``num`` of ``speakers``, the same for the same seed: the smallest SHA-256 of ``(data_seed, speaker)``."""
    return sorted(sorted(set(speakers), key=lambda speaker: _rank(data_seed, speaker))[:num])


def _rank(data_seed: int, name: str) -> str:
    return hashlib.sha256(f"{data_seed}\0{name}".encode()).hexdigest()


def _full_training_rows(data_dir: Path) -> list[ManifestRow]:
    """The prepare's full training manifest, kept as ``train_full.csv`` (copied from ``train.csv`` when new).

    ``train.csv`` is this module's reduced output when it holds exactly the full manifest's rows less the
    recorded validation speakers; otherwise the prepare wrote it anew and it is the full manifest.
    """
    train_path, full_path = data_dir / TRAIN_FILE, data_dir / FULL_TRAIN_FILE
    if not train_path.is_file():
        raise ValidationSplitError(f"{train_path}: no training manifest (run the prepare stage first)")
    train_rows = read_manifest(train_path)
    record = _read_record(data_dir)
    if record is not None and full_path.is_file() and file_sha256(full_path) == record["settings"]["full_sha256"]:
        full_rows = read_manifest(full_path)
        held_out = set(record["speakers"])
        if [row for row in full_rows if row.spk_id not in held_out] == train_rows:
            return full_rows
    write_manifest(full_path, train_rows)
    return train_rows


def _undo(data_dir: Path, full_rows: list[ManifestRow]) -> None:
    """No validation asked for: ``train.csv`` is the full manifest again and the validation files go."""
    (data_dir / RECORD_FILE).unlink()
    for name in (SPEAKERS_FILE, MANIFEST_FILE, TRIALS_FILE):
        (data_dir / name).unlink(missing_ok=True)
    write_manifest(data_dir / TRAIN_FILE, full_rows)
    logger.info("%s: no validation split asked for: the earlier one is undone (train.csv: every speaker)", data_dir)


def _read_record(data_dir: Path) -> dict | None:
    path = data_dir / RECORD_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _sha256_or_none(path: PathLike) -> str | None:
    return file_sha256(path) if Path(path).is_file() else None


def _test_speakers(data_dir: Path) -> set[str]:
    path = data_dir / "test.csv"
    return {row.spk_id for row in read_manifest(path)} if path.is_file() else set()


def _draw_speakers(rows: list[ManifestRow], num: int, data_seed: int, utts_per_speaker: int) -> list[ManifestRow]:
    """Up to ``utts_per_speaker`` utterances (ranked by seed and id) of each of ``num`` drawn speakers."""
    speakers = sorted({row.spk_id for row in rows})
    if num < 2:
        raise ValidationSplitError(f"valid_speakers must be at least 2 (non-target trials need two), got {num}")
    if utts_per_speaker < 2:
        raise ValidationSplitError(f"valid_utts_per_speaker must be at least 2, got {utts_per_speaker}")
    if num >= len(speakers):
        raise ValidationSplitError(
            f"valid_speakers {num} would leave none of the {len(speakers)} training speakers for training"
        )
    chosen = set(draw_speakers(speakers, num, data_seed))
    by_speaker: dict[str, list[ManifestRow]] = {}
    for row in rows:
        if row.spk_id in chosen:
            by_speaker.setdefault(row.spk_id, []).append(row)
    return [
        row
        for speaker in sorted(by_speaker)
        for row in sorted(
            sorted(by_speaker[speaker], key=lambda row: _rank(data_seed, row.id))[:utts_per_speaker],
            key=lambda row: row.id,
        )
    ]


def _all_pairs(rows: list[ManifestRow], data_seed: int) -> list[str]:
    """Every pair of the utterances: targets across videos (as VoxCeleb1's lists), non-targets across speakers."""
    utterances: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        video = row.id.split("/")[1] if "/" in row.id else row.id
        utterances.setdefault(row.spk_id, []).append((video, f"{row.id}.wav"))
    lines = make_trials(utterances, None, np.random.default_rng([data_seed, 27]))
    if not any(line.startswith("1 ") for line in lines):
        raise ValidationSplitError(
            "the drawn validation speakers have no two utterances from different videos: no target trial "
            "(raise valid_utts_per_speaker or valid_speakers)"
        )
    return lines


def _rows_of_trial_list(
    trial_file: Path,
    full_rows: list[ManifestRow],
    valid_root: PathLike | None,
    test_trial_files: Sequence[PathLike],
    test_root: PathLike | None,
    test_speakers: set[str],
) -> tuple[list[ManifestRow], list[str]]:
    """The utterances a given validation list names, as manifest rows, and its lines (entries as their ids)."""
    if not trial_file.is_file():
        raise ValidationSplitError(f"{trial_file}: validation trial list not found")
    digest = file_sha256(trial_file)
    for test_file in test_trial_files:
        same_file = Path(test_file).resolve() == trial_file.resolve()
        if same_file or (Path(test_file).is_file() and file_sha256(test_file) == digest):
            raise ValidationSplitError(f"{trial_file}: the validation list is the test list {test_file}")
    try:
        trials = read_trial_list(trial_file)
        check_trial_labels([trials])
    except ValueError as err:
        raise ValidationSplitError(str(err)) from None
    entries = sorted(set(trials.enrol.tolist()) | set(trials.test.tolist()))
    if valid_root is not None:
        rows = _rows_under_root(trial_file, trials, entries, Path(valid_root), test_root)
    else:
        by_id = {row.id: row for row in full_rows}
        absent = [entry for entry in entries if utterance_id(entry) not in by_id]
        if absent:
            raise ValidationSplitError(
                f"{trial_file}: {len(absent)} utterances are not in the training data, e.g. {absent[0]} "
                "(give --valid_root for utterances outside it)"
            )
        rows = [by_id[utterance_id(entry)] for entry in entries]
    named_test = sorted({row.spk_id for row in rows} & test_speakers)
    if named_test:
        raise ValidationSplitError(f"{trial_file}: names test speakers {named_test[:5]}; validation must not")
    lines = [
        f"{label} {utterance_id(enrol)}.wav {utterance_id(test)}.wav"
        for label, enrol, test in zip(trials.labels.tolist(), trials.enrol.tolist(), trials.test.tolist())
    ]
    return sorted(rows, key=lambda row: row.id), lines


def _rows_under_root(
    trial_file: Path, trials, entries: list[str], valid_root: Path, test_root: PathLike | None
) -> list[ManifestRow]:
    """Manifest rows of utterances under ``valid_root/wav`` (speaker: the first path component)."""
    if test_root is not None and valid_root.resolve() == Path(test_root).resolve():
        raise ValidationSplitError(f"{valid_root}: the validation root is the test root")
    try:
        check_trial_files([trials], valid_root / "wav")
    except (ValueError, MissingTrialFilesError) as err:
        raise ValidationSplitError(str(err)) from None
    rows = []
    for entry in entries:
        path = valid_root / "wav" / entry
        try:
            duration = audio_info(path).duration
        except AudioError as err:
            raise ValidationSplitError(f"{trial_file}: {err}") from None
        rows.append(ManifestRow(utterance_id(entry), os.path.abspath(path), duration, entry.split("/")[0]))
    return rows


def _result(data_dir: Path, speakers: Sequence[str], num_train: int, reused: bool) -> ValidationSplit:
    labels = read_trial_list(data_dir / TRIALS_FILE).labels
    return ValidationSplit(
        speakers=tuple(speakers),
        manifest=data_dir / MANIFEST_FILE,
        trials=data_dir / TRIALS_FILE,
        num_utterances=len(read_manifest(data_dir / MANIFEST_FILE)),
        num_target_trials=int(labels.sum()),
        num_nontarget_trials=int(labels.size - labels.sum()),
        num_train_utterances=num_train,
        reused=reused,
    )
