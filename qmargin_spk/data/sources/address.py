"""Audio addresses: one string that names any utterance's samples, stored in a manifest's ``wav`` column.

A plain file without a segment is its absolute path (the manifests of audio trees are unchanged).
Anything else is ``kaldi:<start>:<end>:<entry>``, where ``entry`` is the value of a Kaldi
``wav.scp`` line, read the way Kaldi reads it: a command ending in ``|`` (its standard output is
the audio), ``file.ark:offset`` (an object inside an archive) or a file path; ``start`` and
``end`` (seconds, empty when the whole recording is meant) come from a ``segments`` file. The
address keeps the entry verbatim, so the command that prepare checked is the one training runs.
Running a command is what a ``wav.scp`` asks for (docs/reliability.md, "A wav.scp is code"):
never build addresses from strings you do not trust.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

ADDRESS_PREFIX = "kaldi:"
FILE, PIPE, ARK = "file", "pipe", "ark"
_ARK_OFFSET = re.compile(r"^(?P<ark>.+):(?P<offset>\d+)$")


class SourceError(ValueError):
    """Samples that cannot be read from an address; the message names the address (or utterance)."""


def entry_kind(entry: str) -> str:
    """:data:`PIPE` for ``cmd |``, :data:`ARK` for ``file.ark:offset``, else :data:`FILE` (Kaldi's reading)."""
    stripped = entry.strip()
    if stripped.endswith("|"):
        return PIPE
    return ARK if _ARK_OFFSET.match(stripped) else FILE


def ark_location(entry: str) -> tuple[str, int]:
    """``file.ark:123`` -> ``("file.ark", 123)``."""
    match = _ARK_OFFSET.match(entry.strip())
    if match is None:
        raise SourceError(f"{entry}: not an ark entry (file.ark:offset)")
    return match["ark"], int(match["offset"])


@dataclass(frozen=True)
class SourceAddress:
    """A ``wav.scp`` entry and, from ``segments``, the part of it meant (seconds; None: from start / to end)."""

    entry: str
    start: float | None = None
    end: float | None = None

    @property
    def kind(self) -> str:
        return entry_kind(self.entry)

    def frame_range(self, sample_rate: int, frames: int) -> tuple[int, int]:
        """``[first, last)`` frames of the segment in a recording of ``frames`` frames at ``sample_rate``."""
        first = 0 if self.start is None else min(int(round(self.start * sample_rate)), frames)
        last = frames if self.end is None or self.end < 0 else min(int(round(self.end * sample_rate)), frames)
        return first, max(first, last)


def is_address(path: str | os.PathLike) -> bool:
    """True for a ``kaldi:...`` address (anything else is a plain audio file path)."""
    return isinstance(path, str) and path.startswith(ADDRESS_PREFIX)


def format_address(entry: str, start: float | None = None, end: float | None = None) -> str:
    """The address of ``entry`` (a ``wav.scp`` value), optionally cut to ``[start, end)`` seconds.

    A plain file without a segment stays its path, as audio trees have always stored it.
    """
    if entry_kind(entry) == FILE and start is None and end is None:
        return entry
    text = "" if start is None else repr(float(start))
    return f"{ADDRESS_PREFIX}{text}:{'' if end is None else repr(float(end))}:{entry}"


def parse_address(text: str) -> SourceAddress:
    """Inverse of :func:`format_address` for ``kaldi:`` addresses; :class:`SourceError` if malformed."""
    if not is_address(text):
        return SourceAddress(str(text))
    parts = text[len(ADDRESS_PREFIX) :].split(":", 2)
    if len(parts) != 3 or not parts[2]:
        raise SourceError(f"{text}: malformed address (expected kaldi:<start>:<end>:<wav.scp entry>)")
    try:
        start, end = (float(part) if part else None for part in parts[:2])
    except ValueError:
        raise SourceError(f"{text}: malformed segment times in the address") from None
    return SourceAddress(parts[2], start, end)
