"""A user's list of utterances: CSV ``id,path,spk[,start,end]`` (header required) or JSON lines.

JSON lines hold either the same keys (``{"id", "path", "spk", "start"?, "end"?}``) or a
lhotse-style cut (``id``, ``start``, ``duration``, ``recording.sources[0].source`` of type
``file``, ``supervisions[0].speaker``). Paths are files (pipes and ark entries belong in a
Kaldi ``wav.scp``); relative paths are relative to the manifest's folder. ``start``/``end`` are
seconds of the file (an empty ``end``: to the end). Trial items are the ids.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from qmargin_spk.data.sources.address import FILE, entry_kind, format_address, parse_address
from qmargin_spk.data.sources.utterances import MANIFEST, InputError, InputSource, SourceUtterance, same_id

CSV_COLUMNS = ("id", "path", "spk")
JSON_SUFFIXES = (".jsonl", ".json")


def is_manifest_file(path: Path) -> bool:
    """A ``.csv`` file whose header names ``id``, ``path`` and ``spk``, or a ``.jsonl``/``.json`` file."""
    if not path.is_file():
        return False
    if path.suffix.lower() in JSON_SUFFIXES:
        return True
    if path.suffix.lower() != ".csv":
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        header = [name.strip().lower() for name in handle.readline().split(",")]
    return set(CSV_COLUMNS) <= set(header)


def _seconds(value: object, where: str, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {name} must be seconds, got {value!r}") from None
    if seconds < 0:
        raise InputError(f"{where}: {name} must not be negative, got {seconds}")
    return seconds


def _utterance(fields: dict, where: str, folder: Path) -> SourceUtterance:
    values = {key: fields.get(key) for key in ("id", "path", "spk")}
    empty = [key for key, value in values.items() if not isinstance(value, str) or not value.strip()]
    if empty:
        raise InputError(f"{where}: no {', '.join(empty)}")
    utt, path, spk = (str(values[key]).strip() for key in ("id", "path", "spk"))
    if any(char.isspace() for char in utt + spk):
        raise InputError(f"{where}: ids and speakers may not hold spaces ({utt!r}, {spk!r})")
    if entry_kind(path) != FILE:
        raise InputError(f"{where}: {path!r} is not a file path (pipes and ark entries belong in a Kaldi wav.scp)")
    start, end = _seconds(fields.get("start"), where, "start"), _seconds(fields.get("end"), where, "end")
    if start is not None and end is not None and end <= start:
        raise InputError(f"{where}: end {end} is not after start {start}")
    absolute = os.path.abspath(folder / path)
    return SourceUtterance(utt, format_address(absolute, start, end), spk, utt)


def _from_cut(cut: dict, where: str) -> dict:
    """The ``id/path/spk/start/end`` of a lhotse-style cut."""
    try:
        sources = cut["recording"]["sources"]
        source = next(s for s in sources if s.get("type", "file") == "file")
        start = float(cut.get("start", 0.0))
        end = start + float(cut["duration"]) if "duration" in cut else None
        return {"id": cut["id"], "path": source["source"], "spk": cut["supervisions"][0]["speaker"]} | {
            "start": start or None,
            "end": end,
        }
    except (KeyError, IndexError, TypeError, ValueError, StopIteration):
        raise InputError(
            f"{where}: expected id/path/spk keys or a lhotse cut with a file source and a speaker"
        ) from None


def _rows(path: Path) -> list[tuple[str, dict]]:
    """``(file:line, fields)`` of every entry."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            if path.suffix.lower() in JSON_SUFFIXES:
                rows = []
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        where = f"{path}:{number}"
                        try:
                            entry = json.loads(line)
                        except json.JSONDecodeError as err:
                            raise InputError(f"{where}: not JSON ({err.msg})") from None
                        if not isinstance(entry, dict):
                            raise InputError(f"{where}: expected a JSON object")
                        rows.append((where, entry if "path" in entry else _from_cut(entry, where)))
                return rows
            reader = csv.DictReader(handle)
            header = [name.strip().lower() for name in reader.fieldnames or ()]
            missing = [name for name in CSV_COLUMNS if name not in header]
            if missing:
                raise InputError(f"{path}:1: header must name id,path,spk[,start,end]; missing {', '.join(missing)}")
            reader.fieldnames = header
            return [(f"{path}:{reader.line_num}", row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: cannot read ({err})") from None


def read_manifest_file(path: Path) -> InputSource:
    """The utterances of a CSV or JSONL manifest; InputError naming the line for a bad or repeated entry."""
    utterances, seen = [], {}
    for where, fields in _rows(path):
        utterance = _utterance(fields, where, path.parent)
        if utterance.id in seen:
            raise InputError(f"{where}: id {utterance.id} already on {seen[utterance.id]}")
        seen[utterance.id] = where
        utterances.append(utterance)
    if not utterances:
        raise InputError(f"{path}: no utterances")
    files = sorted({Path(parse_address(u.address).entry) for u in utterances})
    return InputSource(MANIFEST, path, sorted(utterances, key=lambda u: u.id), [path, *files], same_id)
