"""CN-Celeb's released layout -> CSV manifests, trial lists and an enrollment map for the recipe.

Reads CN-Celeb1 (``CN-Celeb_flac``) and, optionally, CN-Celeb2 (``CN-Celeb2_flac``) as released
(recipes/cnceleb/README.md has the layout and the list formats) and writes to ``out_dir``:

- ``train.csv`` (``id,path,spk``): every FLAC file of the CN-Celeb1 development speakers
  (``dev/dev.lst``) and of all CN-Celeb2 speakers (``spk.lst``), ids ``<spk>/<file stem>``;
- ``test.csv``: the CN-Celeb1 evaluation audio the lists name: the test files
  (``eval/test/``), the concatenated enrollment files (``eval/enroll/``) and the utterances the
  enrollment map names (``data/<spk>/``), ids their paths under the CN-Celeb1 root without
  extension (``eval/test/id00800-singing-01-001``);
- ``trials/CNC-Eval-Concat.lst``: ``trials.lst`` with each model replaced by its concatenated
  enrollment file (one file per model: ``eval/lists/enroll.lst``);
- ``trials/CNC-Eval-Avg.lst`` and ``enroll.map``: the same trials with the model ids kept, and
  the model -> utterances map, so each model is the average of its utterances' embeddings
  (written when the release has ``eval/lists/enroll.map``).

The lists name ``.wav`` files where the release holds FLAC: each list path resolves to the
``.flac`` file of the same stem (or the path as written, when that file exists), and a path
that resolves to neither is an error naming the list and line. Training speakers that are
also evaluation speakers are refused (:class:`CnCelebError`).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qmargin_spk.data.trials import read_utf8_text
from qmargin_spk.utils.atomic import atomic_open, atomic_write_text

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".flac", ".wav")
CONCAT_LIST = "CNC-Eval-Concat.lst"
AVERAGE_LIST = "CNC-Eval-Avg.lst"


class CnCelebError(ValueError):
    """A CN-Celeb folder that does not look as released; the message names the file (and line)."""


@dataclass(frozen=True)
class CnCelebLists:
    """What :func:`prepare_cnceleb` wrote, with counts for the recipe's summary."""

    train_manifest: Path
    test_manifest: Path
    concat_trials: Path
    average_trials: Path | None
    enroll_map: Path | None
    n_train_speakers: int
    n_train_utterances: int
    n_eval_speakers: int
    n_trials: int


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of the non-blank lines of a released list; CnCelebError if it is missing."""
    if not path.is_file():
        raise CnCelebError(f"{path}: not found (expected CN-Celeb's released layout)")
    text = read_utf8_text(path)
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _speakers(list_file: Path) -> list[str]:
    """The speaker ids of ``dev/dev.lst`` or ``spk.lst`` (first field of each line)."""
    return [fields[0] for _, fields in _lines(list_file)]


def resolve_audio(base: Path, listed: str, where: str) -> Path:
    """The released file a list names (``.wav`` in the lists, FLAC on disk): same stem, ``.flac`` first."""
    relative = Path(listed)
    for candidate in (relative.with_suffix(ext) for ext in AUDIO_EXTENSIONS):
        if (base / candidate).is_file():
            return base / candidate
    if (base / relative).is_file():
        return base / relative
    raise CnCelebError(f"{where}: {listed} is not under {base} (as .flac or as written)")


def _speaker_files(data: Path, speaker: str, where: str) -> list[Path]:
    folder = data / speaker
    if not folder.is_dir():
        raise CnCelebError(f"{where}: speaker {speaker} has no folder {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise CnCelebError(f"{where}: no .flac or .wav files under {folder}")
    return files


def _item(root: Path, path: Path) -> str:
    """A test manifest id: the path under the CN-Celeb1 root, without extension (``eval/test/x``)."""
    return path.relative_to(root).with_suffix("").as_posix()


def prepare_cnceleb(
    cnceleb1: str | os.PathLike, cnceleb2: str | os.PathLike | None, out_dir: str | os.PathLike
) -> CnCelebLists:
    """Read the released layout and write the manifests, trial lists and enrollment map (see the module)."""
    root1 = Path(os.path.abspath(cnceleb1))
    out = Path(out_dir)
    lists = root1 / "eval" / "lists"
    enroll_files = {}
    for number, fields in _lines(lists / "enroll.lst"):
        where = f"{lists / 'enroll.lst'}:{number}"
        if len(fields) != 2:
            raise CnCelebError(f"{where}: expected '<model> enroll/<file>.wav', got {' '.join(fields)!r}")
        enroll_files[fields[0]] = resolve_audio(root1 / "eval", fields[1], where)

    trials, tests = [], {}
    for number, fields in _lines(lists / "trials.lst"):
        where = f"{lists / 'trials.lst'}:{number}"
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise CnCelebError(f"{where}: expected '<model> test/<file>.wav 1|0', got {' '.join(fields)!r}")
        model, listed, label = fields
        if model not in enroll_files:
            raise CnCelebError(f"{where}: model {model} is not in {lists / 'enroll.lst'}")
        if listed not in tests:
            tests[listed] = resolve_audio(root1 / "eval", listed, where)
        trials.append((model, listed, label))
    if not trials:
        raise CnCelebError(f"{lists / 'trials.lst'}: no trials")

    enroll_map = _read_released_map(lists / "enroll.map", root1 / "data", set(enroll_files))
    eval_speakers = {_speaker_of_file(path) for path in [*enroll_files.values(), *tests.values()]}
    train_rows = _training_rows(root1, cnceleb2, eval_speakers)

    test_rows = {}
    for path in [*enroll_files.values(), *tests.values()]:
        test_rows[_item(root1, path)] = (path, _speaker_of_file(path))
    for utterances in (enroll_map or {}).values():
        for path in utterances:
            test_rows[_item(root1, path)] = (path, path.parent.name)

    trial_folder = out / "trials"
    concat = trial_folder / CONCAT_LIST
    atomic_write_text(
        concat,
        "".join(f"{_item(root1, enroll_files[m])} {_item(root1, tests[t])} {y}\n" for m, t, y in trials),
    )
    average = map_file = None
    if enroll_map is not None:
        average, map_file = trial_folder / AVERAGE_LIST, out / "enroll.map"
        atomic_write_text(average, "".join(f"{m} {_item(root1, tests[t])} {y}\n" for m, t, y in trials))
        atomic_write_text(
            map_file,
            "".join(f"{m} {' '.join(_item(root1, p) for p in utts)}\n" for m, utts in sorted(enroll_map.items())),
        )
    _write_csv(out / "test.csv", [(utt, path, spk) for utt, (path, spk) in sorted(test_rows.items())])
    _write_csv(out / "train.csv", train_rows)
    return CnCelebLists(
        train_manifest=out / "train.csv",
        test_manifest=out / "test.csv",
        concat_trials=concat,
        average_trials=average,
        enroll_map=map_file,
        n_train_speakers=len({spk for _, _, spk in train_rows}),
        n_train_utterances=len(train_rows),
        n_eval_speakers=len(eval_speakers),
        n_trials=len(trials),
    )


def _speaker_of_file(path: Path) -> str:
    """The speaker of an ``eval/`` file: the part of its name before the first ``-`` (``id00800-enroll``)."""
    return path.stem.split("-", 1)[0]


def _read_released_map(path: Path, data: Path, models: set[str]) -> dict[str, list[Path]] | None:
    """``eval/lists/enroll.map`` (``<model> <spk>/<file>.wav ...``, paths under ``data/``), None if absent."""
    if not path.is_file():
        logger.warning("%s: not found; only the concatenated-enrollment protocol is written", path)
        return None
    enroll_map = {}
    for number, fields in _lines(path):
        where = f"{path}:{number}"
        if len(fields) < 2:
            raise CnCelebError(f"{where}: expected '<model> <spk>/<file>.wav ...', got {' '.join(fields)!r}")
        if fields[0] not in models:
            raise CnCelebError(f"{where}: model {fields[0]} is not in {path.parent / 'enroll.lst'}")
        enroll_map[fields[0]] = [resolve_audio(data, listed, where) for listed in fields[1:]]
    return enroll_map


def _training_rows(
    root1: Path, cnceleb2: str | os.PathLike | None, eval_speakers: set[str]
) -> list[tuple[str, Path, str]]:
    """``(id, path, speaker)`` of every training file: CN-Celeb1 dev speakers, then all of CN-Celeb2."""
    sources: list[tuple[Path, Path]] = [(root1 / "dev" / "dev.lst", root1 / "data")]
    if cnceleb2 is not None:
        root2 = Path(os.path.abspath(cnceleb2))
        sources.append((root2 / "spk.lst", root2 / "data"))
    rows, seen = [], {}
    for list_file, data in sources:
        speakers = _speakers(list_file)
        shared = sorted(set(speakers) & eval_speakers)
        if shared:
            raise CnCelebError(
                f"{list_file}: {len(shared)} speakers are also CN-Celeb1 evaluation speakers, e.g. {shared[0]}; "
                "results would be optimistic"
            )
        for speaker in speakers:
            for path in _speaker_files(data, speaker, str(list_file)):
                utt = f"{speaker}/{path.relative_to(data / speaker).with_suffix('').as_posix()}"
                if utt in seen:
                    raise CnCelebError(f"{path}: utterance id {utt} is also {seen[utt]}")
                seen[utt] = path
                rows.append((utt, path, speaker))
    return rows


def _write_csv(path: Path, rows: Sequence[tuple[str, Path, str]]) -> None:
    """The input manifest form ``id,path,spk`` (absolute paths), written atomically."""
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("id", "path", "spk"))
        writer.writerows((utt, str(audio), spk) for utt, audio, spk in rows)
