"""The test roots scored on one experiment, and where each one's results live.

The first test root scored keeps ``EXP/scores/`` (results, score files, ``embeddings/`` cache), as
when an experiment had one test root; every other root gets ``EXP/scores/<test_name>/`` with the
same files of its own, so scoring one root never drops another's results or embeddings. The roots
are listed in ``EXP/scores/test_roots.json`` (``{"first": ROOT, "others": {NAME: ROOT}}``, paths
resolved), which stage 3 updates under a lock once a root is scored, and compare and packaging read. An
experiment scored before the file existed names its first root in its results files; that root
stays the first.

A name is given (``--test_name``) or derived from the root's folder name; it must be a plain
folder name (letters, digits, ``.``, ``_``, ``-``; none of :data:`RESERVED_NAMES`, folders the stages
write: ``EXP/scores/embeddings``, ``EXP/data/shards``, ``EXP/data/augment``); its test side is prepared
into ``EXP/data/<test_name>/``.
A name already taken by another root, or a root already scored under another name, is refused
with one line. Lists of the other roots are labelled ``<list>@<test_name>`` wherever lists of
several roots meet (model card, comparisons).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qmargin_spk.utils.atomic import atomic_write_text, exclusive_lock

ROOTS_FILE = "test_roots.json"
RESERVED_NAMES = ("embeddings", "shards", "augment")  # folders the stages write in EXP/scores and EXP/data
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class TestRootError(ValueError):
    """A test root or name that cannot be scored as asked (a name another root holds, a bad name)."""

    __test__ = False  # not a pytest class


@dataclass(frozen=True)
class ScoredRoot:
    """One scored test root: ``name`` (None for the first root), the resolved ``root`` and its results ``folder``."""

    name: str | None
    root: str
    folder: Path

    def list_label(self, list_name: str) -> str:
        """How a list of this root is named among the lists of every root (the first root's keep their names)."""
        return list_name if self.name is None else f"{list_name}@{self.name}"


def scored_roots(scores_folder: str | os.PathLike) -> list[ScoredRoot]:
    """The roots scored in ``scores_folder`` (``EXP/scores``): the first, then the others by name; [] if none."""
    scores_folder = Path(scores_folder)
    registry = _read_registry(scores_folder)
    if registry["first"] is None:
        return []
    first = ScoredRoot(None, registry["first"], scores_folder)
    others = [ScoredRoot(name, root, scores_folder / name) for name, root in sorted(registry["others"].items())]
    return [first, *others]


def claim_root(scores_folder: str | os.PathLike, root: str | os.PathLike, name: str | None = None) -> ScoredRoot:
    """Where ``root``'s results go: ``scores_folder`` for the first root scored, else ``scores_folder/<name>``.

    ``name`` (default: derived from the root's folder name) applies to a new root other than the
    first; a root scored before keeps its place. :class:`TestRootError` when the name is taken by
    another root or the root was scored under another name. Nothing is recorded:
    :func:`record_root` does that once the root is scored, so a failed first scoring (a mistyped
    root) does not make its root the first.
    """
    scores_folder = Path(scores_folder)
    return _place(_read_registry(scores_folder), scores_folder, os.path.realpath(root), name)[0]


def record_root(scores_folder: str | os.PathLike, scored: ScoredRoot) -> None:
    """Add a scored root to ``test_roots.json`` (under a lock; refused as :func:`claim_root` refuses)."""
    scores_folder = Path(scores_folder)
    with exclusive_lock(scores_folder / f"{ROOTS_FILE}.lock"):
        registry = _read_registry(scores_folder)
        placed, changed = _place(registry, scores_folder, scored.root, scored.name)
        if placed != scored:  # another root became the first meanwhile: keep ours apart rather than mixed
            raise TestRootError(f"{scored.root}: another test root was scored into {placed.folder} meanwhile")
        if changed or not (scores_folder / ROOTS_FILE).is_file():
            _write_registry(scores_folder, registry)


def _place(registry: dict, scores_folder: Path, resolved: str, name: str | None) -> tuple[ScoredRoot, bool]:
    """Where the root ``resolved`` goes and whether ``registry`` (updated in place) changed."""
    if name is not None:
        _check_name(name, "--test_name")
    if registry["first"] in (None, resolved):
        changed = registry["first"] is None
        registry["first"] = resolved
        return ScoredRoot(None, resolved, scores_folder), changed
    known = next((known for known, other in registry["others"].items() if other == resolved), None)
    if known is not None:
        if name is not None and name != known:
            raise TestRootError(
                f"{resolved} was scored as test name {known!r} ({scores_folder / known}); "
                f"pass --test_name {known} or none"
            )
        return ScoredRoot(known, resolved, scores_folder / known), False
    chosen = name if name is not None else derived_name(resolved)
    holder = registry["others"].get(chosen)
    if holder is not None:
        raise TestRootError(
            f"test name {chosen!r} is taken by {holder} ({scores_folder / chosen}): "
            f"pass another --test_name for {resolved}"
        )
    registry["others"][chosen] = resolved
    return ScoredRoot(chosen, resolved, scores_folder / chosen), True


def derived_name(root: str | os.PathLike) -> str:
    """A test name from the root's folder name: characters outside letters, digits, ``.``, ``_``, ``-`` become ``_``."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(root).name).lstrip("._-") or "test"
    _check_name(name, f"the name derived from {root}")
    return name


def _check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise TestRootError(
            f"{what} {name!r} is not a usable test name: letters, digits, '.', '_' and '-' only, "
            f"starting with a letter or digit, and not {', '.join(RESERVED_NAMES)}"
        )


def _read_registry(scores_folder: Path) -> dict:
    """The registry, or one made from the results files of an experiment scored before it existed."""
    path = scores_folder / ROOTS_FILE
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            return {"first": stored["first"], "others": dict(stored.get("others") or {})}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise TestRootError(f"{path}: not a list of scored test roots ({err}); remove it to start anew") from None
    return {"first": _first_root_of_results(scores_folder), "others": {}}


def _first_root_of_results(scores_folder: Path) -> str | None:
    """The test root the results in ``scores_folder`` name (their ``test_root`` is the root or its ``wav/``)."""
    for results in sorted(scores_folder.glob("results.*.json")):
        try:
            scored = json.loads(results.read_text(encoding="utf-8")).get("test_root")
        except (OSError, ValueError, AttributeError):
            continue
        if scored:
            scored = Path(scored)
            return os.path.realpath(scored.parent if scored.name == "wav" else scored)
    return None


def _write_registry(scores_folder: Path, registry: dict) -> None:
    atomic_write_text(scores_folder / ROOTS_FILE, json.dumps(registry, indent=1, sort_keys=True) + "\n")
