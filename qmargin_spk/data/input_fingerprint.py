"""The cheap fingerprint of prepare's inputs kept in ``prepare_done.json``: unchanged inputs, no new prepare.

It holds counts, sizes and newest modification times of each root's files (per extension for audio trees,
the files a Kaldi dir or manifest names otherwise), of the trial lists, and prepare's settings; stage 3
keeps one per extra test root the same way. Contents are not hashed: a prepare re-run is cheap, and the
embedding caches hash what they read (``fingerprint.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from qmargin_spk.data.m4a import m4a_targets
from qmargin_spk.data.sources.utterances import TREE, InputSource

MARKER_VERSION = 1


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


def _source_summary(root: Path, source: InputSource) -> dict:
    """What a root's fingerprint holds: per extension for trees (as before other forms existed), else its files."""
    if source.kind != TREE:
        present = [path for path in source.watched if os.path.lexists(path)]
        return {"form": source.kind, "files": _tree_summary(present), "missing": len(source.watched) - len(present)}
    by_extension = {"wav": [], "m4a": [source for source, _ in m4a_targets(root)]}
    for path in source.watched:
        by_extension.setdefault(path.suffix.lower().lstrip("."), []).append(path)
    return {ext: _tree_summary(paths) for ext, paths in by_extension.items() if ext in ("wav", "m4a") or paths}


def input_fingerprint(sources: dict[Path, InputSource], trial_files: Sequence[Path], settings: dict) -> dict:
    """A cheap summary of everything prepare reads: the inputs (counts, sizes, mtimes), trial lists, settings."""
    trees = {str(root): _source_summary(root, source) for root, source in sources.items()}
    trials = {str(p): _tree_summary([p]) if p.is_file() else None for p in trial_files}
    return {"version": MARKER_VERSION, "trees": trees, "trials": trials, "settings": settings}
