"""Utterance manifests: the CSV files (``ID,wav,duration,spk_id``) that the prepare stage writes.

``ID`` is ``spk/video/utt`` (the key shared with trial lists), ``wav`` an absolute path and
``duration`` seconds at the recipe's sample rate. Training and scoring read them back.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass

from qmargin_spk.utils.atomic import atomic_open

MANIFEST_FIELDS = ("ID", "wav", "duration", "spk_id")

PathLike = str | os.PathLike


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file."""


@dataclass(frozen=True)
class ManifestRow:
    """One utterance of a manifest."""

    id: str
    wav: str
    duration: float
    spk_id: str


def utterance_id(relative_path: str) -> str:
    """``spk/video/utt.wav`` -> ``spk/video/utt`` (the key shared by manifests and trial lists)."""
    return os.path.splitext(relative_path.replace(os.sep, "/"))[0]


def write_manifest(path: PathLike, rows: Sequence[ManifestRow]) -> None:
    """Write ``ID,wav,duration,spk_id`` rows atomically."""
    with atomic_open(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_FIELDS)
        writer.writerows((row.id, row.wav, f"{row.duration:.6f}", row.spk_id) for row in rows)


def read_manifest(path: PathLike) -> list[ManifestRow]:
    """Read a manifest written by :func:`write_manifest` (extra columns are ignored)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(MANIFEST_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise ManifestError(f"{path}: manifest lacks columns {sorted(missing)}")
        rows = []
        for r in reader:
            try:
                rows.append(ManifestRow(r["ID"], r["wav"], float(r["duration"]), r["spk_id"]))
            except (TypeError, ValueError):
                raise ManifestError(f"{path}:{reader.line_num}: expected ID,wav,duration,spk_id, got {r}") from None
        return rows
