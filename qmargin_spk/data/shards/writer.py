"""Writing the training manifest as tar shards (WebDataset layout) plus their index ``shards.json``.

The manifest rows are shuffled with a seed (so every shard mixes speakers) and cut into
``ceil(N / utts_per_shard)`` shards of near-equal size, ``shard-000000.tar`` ... Utterance ``i``
of the manifest is the pair of members ``{i:09d}.json`` (``{"id", "spk_id", "duration", "index": i}``)
and ``{i:09d}.wav`` (the audio file's bytes as stored; ``.flac`` / ``.ogg`` keep their extension; a pipe,
ark or segment address is stored as the WAV of its samples, :func:`~qmargin_spk.data.audio.audio_file_bytes`).
``shards.json`` indexes them. Each shard is written to a temporary file and renamed; re-running
keeps the shards whose content is unchanged and rewrites the rest: a shard's fingerprint covers
its rows and each source file's content fingerprint (size, mtime and edge blocks,
:func:`~qmargin_spk.data.fingerprint.audio_fingerprint`), so audio changed in place is rewritten too.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qmargin_spk.data.audio import AudioError, audio_file_bytes
from qmargin_spk.data.fingerprint import audio_fingerprints
from qmargin_spk.data.manifest import ManifestRow
from qmargin_spk.data.shards.index import (
    AUDIO_EXTENSIONS,
    INDEX_NAME,
    SHARD_FORMAT,
    PathLike,
    ShardIndex,
    ShardInfo,
    shard_name,
)
from qmargin_spk.data.sources.address import is_address
from qmargin_spk.utils.atomic import atomic_open


def plan_shards(num_rows: int, utts_per_shard: int, seed: int) -> list[np.ndarray]:
    """Row numbers of each shard: a seeded permutation cut into near-equal parts of at most ``utts_per_shard``."""
    if num_rows <= 0 or utts_per_shard <= 0:
        raise ValueError(f"need rows and a positive shard size, got {num_rows} rows, {utts_per_shard} per shard")
    order = np.random.default_rng(seed).permutation(num_rows)
    return np.array_split(order, math.ceil(num_rows / utts_per_shard))


def _member_stem(row_number: int) -> str:
    return f"{row_number:09d}"


def _audio_extension(path: str) -> str:
    if is_address(path):
        return "wav"
    extension = Path(path).suffix.lower().lstrip(".")
    if extension not in AUDIO_EXTENSIONS:
        raise ValueError(f"{path}: audio must be one of {AUDIO_EXTENSIONS} to be sharded")
    return extension


def _metadata(row: ManifestRow, row_number: int) -> dict:
    return {"id": row.id, "spk_id": row.spk_id, "duration": row.duration, "index": int(row_number)}


def _fingerprint(rows: Sequence[ManifestRow], numbers: Iterable[int], sources: Sequence[str]) -> str:
    """SHA-1 of the shard's rows and of their audio files' fingerprints (``sources``, one per manifest row)."""
    digest = hashlib.sha1(SHARD_FORMAT.encode())
    for number in numbers:
        digest.update(json.dumps([_metadata(rows[number], number), rows[number].wav, sources[number]]).encode())
    return digest.hexdigest()


def _source_fingerprints(paths: Sequence[str], workers: int) -> list[str]:
    """Content fingerprint of each audio file; FileNotFoundError naming the first that cannot be read."""
    fingerprints = audio_fingerprints(paths, workers)
    missing = [path for path, fingerprint in zip(paths, fingerprints) if fingerprint is None]
    if missing:
        more = f" (and {len(missing) - 1} more files)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{missing[0]}: cannot read audio to shard{more}")
    return fingerprints


@dataclass(frozen=True)
class _ShardJob:
    path: str
    members: tuple[tuple[str, dict, str], ...]  # (member stem, metadata, audio path)


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0  # fixed metadata: same rows, same bytes
    return info


def _write_shard(job: _ShardJob) -> None:
    with (
        atomic_open(job.path, "wb") as handle,
        tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for stem, metadata, audio_path in job.members:
            text = json.dumps(metadata).encode()
            tar.addfile(_tar_member(f"{stem}.json", len(text)), io.BytesIO(text))
            try:
                audio, extension = audio_file_bytes(audio_path)
            except (OSError, AudioError) as err:
                raise FileNotFoundError(f"{audio_path}: cannot read audio for {job.path} ({err})") from err
            tar.addfile(_tar_member(f"{stem}.{extension}", len(audio)), io.BytesIO(audio))


def _previous_fingerprints(out_dir: Path) -> dict[str, str]:
    """Fingerprints of the shards listed by an existing index, finished or not ({} if none)."""
    try:
        data = json.loads((out_dir / INDEX_NAME).read_text(encoding="utf-8"))
        return (
            {entry["name"]: entry["fingerprint"] for entry in data["shards"]}
            if data.get("format") == SHARD_FORMAT
            else {}
        )
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_shards(
    rows: Sequence[ManifestRow],
    out_dir: PathLike,
    utts_per_shard: int = 1000,
    seed: int = 0,
    num_workers: int | None = None,
) -> ShardIndex:
    """Write ``rows`` as tar shards plus ``shards.json`` under ``out_dir``; returns the index.

    Re-runnable: shards already there with the same rows and unchanged source files (size,
    mtime, edge blocks) are kept, any other ``shard-*.tar`` is removed or rewritten; the
    index says ``complete`` only once every shard is written.
    One writer per folder at a time.
    """
    rows = list(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        _audio_extension(row.wav)
    plan = plan_shards(len(rows), utts_per_shard, seed)
    workers = num_workers or os.cpu_count() or 1
    sources = _source_fingerprints([row.wav for row in rows], workers)
    shards = tuple(
        ShardInfo(shard_name(k), len(numbers), _fingerprint(rows, numbers, sources)) for k, numbers in enumerate(plan)
    )
    previous = _previous_fingerprints(out_dir)
    keep = {s.name for s in shards if previous.get(s.name) == s.fingerprint and (out_dir / s.name).is_file()}
    for stale in [*out_dir.glob("shard-*.tar"), *out_dir.glob(".shard-*.tar.*.tmp")]:
        if stale.name not in keep:
            stale.unlink()
    index = ShardIndex(
        shards,
        len(rows),
        tuple(sorted({row.spk_id for row in rows})),
        seed,
        utts_per_shard,
        complete=False,
        root=out_dir,
    )
    index.save(out_dir / INDEX_NAME)
    jobs = [
        _ShardJob(
            str(out_dir / info.name),
            tuple((_member_stem(n), _metadata(rows[n], n), rows[n].wav) for n in sorted(numbers)),
        )
        for info, numbers in zip(shards, plan)
        if info.name not in keep
    ]
    workers = min(len(jobs), workers)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_shard, jobs))
    else:
        for job in jobs:
            _write_shard(job)
    index = replace(index, complete=True)
    index.save(out_dir / INDEX_NAME)
    return index
