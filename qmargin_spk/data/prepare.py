"""The recipe's prepare stage: audio trees, Kaldi data dirs or manifests -> checked manifests.

Each root is one of three forms, told apart by its content (:mod:`qmargin_spk.data.sources`;
``input_format`` decides when a folder looks like two): an audio tree (``<root>/wav/<spk>/<video>/<utt>.wav``
as VoxCeleb1, ``<root>/aac/<spk>/<video>/<utt>.m4a`` as VoxCeleb2 dev, or ``<root>/<spk>/.../<utt>.flac``),
a Kaldi data dir (``wav.scp`` with files, pipes and ark entries, ``utt2spk``, ``segments``) or a
CSV/JSONL manifest. Trial items are paths relative to a tree's base, utterance ids for the other
forms; speakers come from the folders, ``utt2spk`` or the manifest. Everything that could break a
later stage is found here, once, for every form:

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
- every trial must name a usable test utterance (trees: by a canonical relative path
  inside the base), with a label that agrees with the speakers, and every list must
  hold both target and non-target trials (parsing, paths, labels and
  file checks shared with :mod:`qmargin_spk.data.trials`).

Outputs in ``out_dir`` (all written atomically, and only after every check passed, so
a failed prepare leaves no new output): ``train.csv`` and ``test.csv``
(``ID,wav,duration,spk_id``; ``ID`` is ``spk/video/utt`` for trees, the utterance id
otherwise; ``wav`` an absolute path or an address (:mod:`qmargin_spk.data.sources.address`);
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
from qmargin_spk.data.input_fingerprint import input_fingerprint
from qmargin_spk.data.m4a import FfmpegMissingError, convert_m4a
from qmargin_spk.data.manifest import ManifestRow, write_manifest
from qmargin_spk.data.sources.detect import read_input
from qmargin_spk.data.sources.tree import tree_files
from qmargin_spk.data.sources.utterances import TREE, InputError, InputSource
from qmargin_spk.data.trials import (
    TrialList,
    TrialPathError,
    check_trial_labels,
    check_trial_paths,
    read_trial_lists,
    unique_utterances,
)
from qmargin_spk.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

DONE_MARKER = "prepare_done.json"
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
    input_formats: dict[str, str] | None = None  # root -> kaldi | manifest | tree
    dropped: dict[str, int] | None = None  # reason -> utterances left out, every root together

    def to_json(self) -> dict:
        """Plain JSON values (paths as strings)."""
        data = asdict(self) | {"trial_files": [str(p) for p in self.trial_files]}
        return {key: str(value) if isinstance(value, Path) else value for key, value in data.items()}

    @classmethod
    def from_json(cls, data: dict) -> PrepareResult:
        path_fields = {"out_dir", "train_manifest", "test_manifest"}
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values.update({k: Path(values[k]) for k in path_fields})
        values["trial_files"] = [Path(p) for p in values["trial_files"]]
        return cls(**values)


def _read_source(root: Path, input_format: str | None) -> InputSource:
    try:
        return read_input(root, input_format)
    except InputError as err:
        raise PrepareError(str(err)) from None


# --- scanning ---------------------------------------------------------------------


@dataclass
class RootScan:
    """One root's usable utterances, skipped ones (name and reason; by id too) and files needing resampling."""

    rows: list[ManifestRow]
    skipped: list[tuple[str, str]]
    resampled: list[tuple[str, int]]
    skipped_ids: dict[str, str]


def drop_reason(problem: str) -> str:
    """The kind of a skip reason, for the counts prepare reports."""
    for words, kind in (
        (("channels",), "not mono"),
        (("NaN",), "NaN or inf samples"),
        (("too short",), "too short"),
        (("empty", "0 samples"), "empty"),
        (("no speaker",), "no speaker"),
        (("no such", "dangling", "link loop", "not found", "not a regular"), "missing"),
        (("command failed", "no audio object"), "failed pipe or ark entry"),
    ):
        if any(word in problem for word in words):
            return kind
    return "unreadable"


def scan_source(
    source: InputSource, sample_rate: int, min_duration: float, num_workers: int, min_samples: int = 0
) -> RootScan:
    """Check every utterance (header; samples if they may be NaN/inf, or came from a pipe or ark).

    Utterances under ``min_duration`` seconds or ``min_samples`` (the model's shortest input,
    at ``sample_rate``) are skipped.
    """
    utterances = source.utterances
    if not utterances and source.kind == TREE:
        base = source.trial_root
        raise PrepareError(f"{source.root}: no audio files under {base} (expected <spk>/<video>/<utt>.wav)")
    if not utterances:
        raise PrepareError(f"{source.root}: no utterances with a speaker")

    def probe(address: str):
        try:
            info = audio_info(address)
            check_finite_samples(address, info)
            return info, None
        except AudioError as err:
            return None, str(err).removeprefix(f"{address}: ")

    scan = RootScan([], list(source.dropped), [], dict(source.dropped))
    with ThreadPoolExecutor(num_workers) as pool:
        probed = pool.map(probe, [u.address for u in utterances], chunksize=64)
        for utterance, (info, problem) in zip(utterances, probed):
            if info is not None and info.duration < min_duration:
                problem = f"too short ({info.duration:.2f} s < min_duration {min_duration} s)"
            elif info is not None and info.frames * sample_rate // info.sample_rate < min_samples:
                problem = f"too short for the model ({info.duration:g} s < its minimum {min_samples / sample_rate:g} s)"
            if problem is not None:
                scan.skipped.append((utterance.name, problem))
                scan.skipped_ids[utterance.id] = problem
                continue
            if info.sample_rate != sample_rate:
                scan.resampled.append((utterance.name, info.sample_rate))
            scan.rows.append(ManifestRow(utterance.id, utterance.address, info.duration, utterance.spk))
    total = len(utterances) + len(source.dropped)
    if scan.skipped:
        logger.warning(
            "%s: skipped %d of %d utterances, e.g. %s: %s", source.root, len(scan.skipped), total, *scan.skipped[0]
        )
    if not scan.rows:
        example = scan.skipped[0]
        raise PrepareError(f"{source.root}: none of the {total} utterances is usable, e.g. {example[0]}: {example[1]}")
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


def validate_trial_lists(trial_files: Sequence[Path], test: InputSource, scan: RootScan) -> list[TrialList]:
    """Check trial lists against the scanned test input; every problem is reported as ``file:line``.

    Parsing is :mod:`qmargin_spk.data.trials`'s (the code scoring uses), and so is the path check
    of trees (canonical, relative, inside the base). Every item must name a usable test
    utterance (a path for trees, whatever its extension; an id otherwise), each label must agree
    with the speakers (folders, ``utt2spk`` or the manifest), and each list must hold both
    target and non-target trials.
    """
    for path in trial_files:
        if not path.is_file():
            raise PrepareError(f"{path}: trial list not found")
    try:
        lists = read_trial_lists(trial_files)
        if test.kind == TREE:
            check_trial_paths(lists)
    except (ValueError, TrialPathError) as err:
        raise PrepareError(str(err)) from err
    speakers = {row.id: row.spk_id for row in scan.rows}
    where = f"under {test.trial_root}" if test.kind == TREE else f"in {test.root}"
    unusable = {}
    for item in unique_utterances(lists).tolist():
        utt = test.item_id(item)
        if utt not in speakers:
            unusable[item] = scan.skipped_ids.get(utt, f"not {where}")
    problems: list[str] = []
    for trials in lists:
        found: list[tuple[int, str]] = []
        for side in (trials.enrol, trials.test):
            for i in np.flatnonzero(np.isin(side, list(unusable))):
                reason = unusable[side[i]]
                found.append((trials.line_numbers[i], f"{side[i]} is unusable ({reason})"))
        for i in range(len(trials)):
            enrol, test_item = trials.enrol[i], trials.test[i]
            if enrol in unusable or test_item in unusable:
                continue
            same = speakers[test.item_id(enrol)] == speakers[test.item_id(test_item)]
            if same != bool(trials.labels[i]):
                found.append(
                    (
                        trials.line_numbers[i],
                        f"label {trials.labels[i]} disagrees with the speakers of {enrol} and {test_item}",
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
    input_format: str | None = None,
) -> PrepareResult:
    """Decode, scan and check the data; write manifests and listings to ``out_dir``.

    ``min_duration`` (seconds) applies to training files only: a test file is kept if
    it is readable and at least ``test_min_samples`` long (the model's shortest input at
    ``sample_rate``; trials naming a shorter file are refused). Raises :class:`PrepareError` for a
    missing layout, a root without usable audio, duplicate training ids, overlapping
    speakers (unless ``allow_overlap``) and bad trial lists. ``input_format`` (``kaldi``,
    ``manifest`` or ``tree``) forces the form of every root instead of detecting it.
    """
    train_roots = [Path(os.path.abspath(r)) for r in train_roots]
    test_root = Path(os.path.abspath(test_root))
    trial_paths = [Path(os.path.abspath(t)) for t in trial_files]
    out_dir = Path(out_dir)
    settings = {"min_duration": min_duration, "sample_rate": sample_rate, "allow_overlap": allow_overlap}
    settings |= {"test_min_samples": test_min_samples} if test_min_samples else {}  # earlier fingerprints stay valid
    if not train_roots:
        raise PrepareError("no training root given")
    sources = {root: _read_source(root, input_format) for root in dict.fromkeys([*train_roots, test_root])}

    marker = out_dir / DONE_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        outputs_present = all((out_dir / name).is_file() for name in ("train.csv", "test.csv"))
        if outputs_present and done.get("fingerprint") == input_fingerprint(sources, trial_paths, settings):
            logger.info("%s: inputs unchanged since the last prepare, nothing to do", out_dir)
            return PrepareResult.from_json(done["result"] | {"reused": True})
        marker.unlink()

    trees = [root for root, source in sources.items() if source.kind == TREE]
    try:
        failures = convert_m4a(trees, sample_rate, num_workers)
    except FfmpegMissingError as err:
        raise PrepareError(str(err)) from None
    if failures or any(len(tree_files(root)) != len(sources[root].utterances) for root in trees):
        sources |= {root: _read_source(root, input_format) for root in trees}  # with the decoded files
    fingerprint = input_fingerprint(sources, trial_paths, settings)  # the inputs as scanned below

    train = [scan_source(sources[root], sample_rate, min_duration, num_workers) for root in train_roots]
    test = scan_source(sources[test_root], sample_rate, 0.0, num_workers, test_min_samples)
    train_rows = [row for scan in train for row in scan.rows]
    duplicates = [utt for utt, count in Counter(row.id for row in train_rows).items() if count > 1]
    if duplicates:
        raise PrepareError(
            f"{len(duplicates)} utterance ids occur in more than one training root, e.g. {duplicates[0]}"
        )
    check_disjoint_speakers({r.spk_id for r in train_rows}, {r.spk_id for r in test.rows}, allow_overlap)

    for trials in validate_trial_lists(trial_paths, sources[test_root], test):
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
        input_formats={str(root): source.kind for root, source in sources.items()},
        dropped=dict(sorted(Counter(drop_reason(why) for scan in scans for _, why in scan.skipped).items())),
    )
    kept = f"kept {len(train_rows)} training and {len(test.rows)} test utterances"
    logger.info("%s; dropped: %s", kept, ", ".join(f"{n} {why}" for why, n in result.dropped.items()) or "none")
    atomic_write_text(marker, json.dumps({"fingerprint": fingerprint, "result": result.to_json()}, indent=1) + "\n")
    return result
