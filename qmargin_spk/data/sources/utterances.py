"""What every input form reads into: utterances with an address, a speaker and a name for listings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

KALDI, MANIFEST, TREE = "kaldi", "manifest", "tree"
INPUT_FORMATS = (KALDI, MANIFEST, TREE)


class InputError(ValueError):
    """An input (data dir, manifest, tree) that cannot be read; one line naming the file (and line)."""


@dataclass(frozen=True)
class SourceUtterance:
    """One utterance: its manifest ``id``, the ``address`` audio is read from, its speaker, its name in listings."""

    id: str
    address: str
    spk: str
    name: str


@dataclass
class InputSource:
    """An input read in one of :data:`INPUT_FORMATS`.

    ``dropped`` holds ``(name, reason)`` of utterances left out before any audio was read (no
    speaker, ...); ``watched`` the files whose sizes and mtimes tell prepare that the input changed;
    ``item_id`` turns a trial item (a path for trees, an utterance id otherwise) into a manifest id;
    ``trial_root`` is the folder tree trial paths are relative to (None for the other forms).
    """

    kind: str
    root: Path
    utterances: list[SourceUtterance]
    watched: list[Path]
    item_id: Callable[[str], str]
    dropped: list[tuple[str, str]] = field(default_factory=list)
    trial_root: Path | None = None


def same_id(item: str) -> str:
    """Trial items of Kaldi dirs and manifests are the utterance ids themselves."""
    return item
