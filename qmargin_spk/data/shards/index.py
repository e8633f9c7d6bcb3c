"""The shard layout: the index file ``shards.json``, the shard names and the audio members a shard may hold.

Shared by the writer (``writer.py``) and the streaming dataset (``reader.py``); the layout itself
is described in ``docs/data_shards.md``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from qmargin_spk.utils.atomic import atomic_write_text

SHARD_FORMAT = "qmargin_spk.shards/1"
INDEX_NAME = "shards.json"
AUDIO_EXTENSIONS = ("wav", "flac", "ogg")

PathLike = str | os.PathLike


def shard_name(number: int) -> str:
    """File name of shard ``number``: ``shard-000000.tar``, ``shard-000001.tar``, ..."""
    return f"shard-{number:06d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    """One shard: file name (relative to the index), number of utterances, fingerprint of its rows."""

    name: str
    num_utterances: int
    fingerprint: str


@dataclass(frozen=True)
class ShardIndex:
    """``shards.json``: the shards in write order, the total, the sorted speaker ids, how they were cut."""

    shards: tuple[ShardInfo, ...]
    num_utterances: int
    speakers: tuple[str, ...]
    seed: int
    utts_per_shard: int
    complete: bool
    root: Path | None = None  # folder of the index file, where shard names resolve (not stored)

    def save(self, path: PathLike) -> None:
        data = {"format": SHARD_FORMAT} | asdict(self)
        del data["root"]
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: PathLike) -> ShardIndex:
        """Read and check an index written by :func:`write_shards` (refuses an unfinished one)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot read the shard index ({err})") from err
        if not isinstance(data, dict) or data.get("format") != SHARD_FORMAT:
            raise ValueError(
                f"{path}: not a shard index (format {data.get('format') if isinstance(data, dict) else None!r})"
            )
        shards = tuple(ShardInfo(**entry) for entry in data["shards"])
        index = cls(
            shards,
            data["num_utterances"],
            tuple(data["speakers"]),
            data["seed"],
            data["utts_per_shard"],
            data["complete"],
            root=path.parent,
        )
        if not index.complete:
            raise ValueError(f"{path}: the shards were not all written; run write_shards again")
        if sum(s.num_utterances for s in shards) != index.num_utterances:
            raise ValueError(
                f"{path}: shard counts add up to {sum(s.num_utterances for s in shards)}, "
                f"not num_utterances = {index.num_utterances}"
            )
        return index
