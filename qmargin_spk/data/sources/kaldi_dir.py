"""A Kaldi data dir: ``wav.scp``, ``utt2spk`` (or ``spk2utt``), optional ``segments``, ``utt2dur``/``reco2dur``.

Entries of ``wav.scp`` are read as Kaldi reads them (:mod:`qmargin_spk.data.sources.address`):
commands ending in ``|`` run in a shell, ``file.ark:offset`` reads an archive, anything else
is a file. Relative file and ark paths are relative to the current directory, as for Kaldi;
prepare stores them absolute. With ``segments`` the utterances are its lines (``utt reco start
end``, seconds; an end of -1 means the end of the recording), else the recordings themselves.
``utt2dur`` and ``reco2dur`` are accepted but not needed: durations come from the audio.
"""

from __future__ import annotations

import os
from pathlib import Path

from qmargin_spk.data.sources.address import ARK, FILE, ark_location, entry_kind, format_address
from qmargin_spk.data.sources.utterances import KALDI, InputError, InputSource, SourceUtterance, same_id

DATA_FILES = ("wav.scp", "utt2spk", "spk2utt", "segments", "utt2dur", "reco2dur")


def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of ``path`` with their 1-based numbers; InputError for unreadable or non-UTF-8 files."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read ({err})") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _table(path: Path, min_fields: int, max_fields: int | None, what: str) -> dict[str, tuple[int, list[str]]]:
    """``first field -> (line, other fields)``; InputError naming ``path:line`` for a bad or repeated key."""
    table: dict[str, tuple[int, list[str]]] = {}
    for number, line in _lines(path):
        fields = line.split()
        if len(fields) < min_fields or (max_fields is not None and len(fields) > max_fields):
            raise InputError(f"{path}:{number}: expected {what}, got {line!r}")
        if fields[0] in table:
            raise InputError(f"{path}:{number}: {fields[0]} already on line {table[fields[0]][0]}")
        table[fields[0]] = (number, fields[1:])
    return table


def read_wav_scp(path: Path) -> dict[str, tuple[int, str]]:
    """``recording -> (line, entry)`` of a ``wav.scp``, in file order; InputError naming ``path:line``.

    The entry is the rest of the line (a command may hold spaces); file and ark paths are made absolute.
    """
    entries: dict[str, tuple[int, str]] = {}
    for number, line in _lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise InputError(f"{path}:{number}: expected '<recording id> <file, command | or file.ark:offset>'")
        if parts[0] in entries:
            raise InputError(f"{path}:{number}: {parts[0]} already on line {entries[parts[0]][0]}")
        entries[parts[0]] = (number, _absolute(parts[1].strip()))
    return entries


def _absolute(entry: str) -> str:
    """A file or ark entry with its path made absolute (relative to the current directory, as Kaldi reads it)."""
    kind = entry_kind(entry)
    if kind == FILE:
        return os.path.abspath(entry)
    if kind == ARK:
        ark, offset = ark_location(entry)
        return f"{os.path.abspath(ark)}:{offset}"
    return entry


def _speakers(root: Path) -> dict[str, str]:
    """``utterance -> speaker`` from ``utt2spk``, else from ``spk2utt``."""
    if (root / "utt2spk").is_file():
        table = _table(root / "utt2spk", 2, 2, "'<utterance id> <speaker id>'")
        return {utt: fields[0] for utt, (_, fields) in table.items()}
    speakers: dict[str, str] = {}
    for spk, (number, utts) in _table(root / "spk2utt", 2, None, "'<speaker id> <utterance id> ...'").items():
        for utt in utts:
            if utt in speakers:
                raise InputError(f"{root / 'spk2utt'}:{number}: {utt} also belongs to speaker {speakers[utt]}")
            speakers[utt] = spk
    return speakers


def is_kaldi_dir(root: Path) -> bool:
    """A folder with ``wav.scp`` and ``utt2spk`` or ``spk2utt``."""
    return (root / "wav.scp").is_file() and ((root / "utt2spk").is_file() or (root / "spk2utt").is_file())


def read_kaldi_dir(root: Path) -> InputSource:
    """The utterances of a Kaldi data dir; utterances without a speaker are dropped with that reason."""
    if not is_kaldi_dir(root):
        raise InputError(f"{root}: not a Kaldi data dir (needs wav.scp and utt2spk or spk2utt)")
    recordings = read_wav_scp(root / "wav.scp")
    speakers = _speakers(root)
    for optional, what in (("utt2dur", "'<utterance id> <seconds>'"), ("reco2dur", "'<recording id> <seconds>'")):
        if (root / optional).is_file():
            _table(root / optional, 2, 2, what)
    if (root / "segments").is_file():
        parts = []
        for utt, (number, fields) in _table(root / "segments", 4, 4, "'<utt> <recording> <start> <end>'").items():
            where = f"{root / 'segments'}:{number}"
            if fields[0] not in recordings:
                raise InputError(f"{where}: recording {fields[0]} is not in {root / 'wav.scp'}")
            try:
                start, end = float(fields[1]), float(fields[2])
            except ValueError:
                raise InputError(f"{where}: start and end must be seconds, got {fields[1]!r} {fields[2]!r}") from None
            if start < 0 or (0 <= end <= start):
                raise InputError(f"{where}: segment [{start}, {end}] is empty or negative")
            parts.append((utt, format_address(recordings[fields[0]][1], start, end)))
    else:
        parts = [(reco, format_address(entry)) for reco, (_, entry) in recordings.items()]
    utterances, dropped = [], []
    for utt, address in sorted(parts):
        if utt in speakers:
            utterances.append(SourceUtterance(utt, address, speakers[utt], utt))
        else:
            dropped.append((utt, "no speaker in utt2spk/spk2utt"))
    watched = [root / name for name in DATA_FILES if (root / name).is_file()]
    watched += sorted({Path(_watched_file(entry)) for _, entry in recordings.values() if entry_kind(entry) != "pipe"})
    return InputSource(KALDI, root, utterances, watched, same_id, dropped)


def _watched_file(entry: str) -> str:
    return ark_location(entry)[0] if entry_kind(entry) == ARK else entry
