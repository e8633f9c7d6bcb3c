"""The training set as tar shards (WebDataset layout) and the crop dataset that streams them.

Writing (:func:`write_shards`): the manifest rows are shuffled with a seed (so every shard mixes
speakers) and cut into ``ceil(N / utts_per_shard)`` shards of near-equal size,
``shard-000000.tar`` ... Utterance ``i`` of the manifest is the pair of members
``{i:09d}.json`` (``{"id", "spk_id", "duration", "index": i}``) and ``{i:09d}.wav`` (the audio
file's bytes as stored; ``.flac`` / ``.ogg`` keep their extension). ``shards.json`` indexes them.
Each shard is written to a temporary file and renamed; re-running keeps the shards whose
content (a fingerprint of their rows) is unchanged and rewrites the rest.

Reading (:class:`ShardCropDataset`), exact epochs: every epoch concatenates the shards in an
order shuffled by ``(seed, epoch)``; rank ``r`` of ``W`` takes the contiguous run of
``N // W`` utterances starting at ``r * (N // W)``, and cuts it into one contiguous run per
DataLoader worker. Each utterance is thus read at most once per epoch, and exactly once when
``W`` divides ``N``; the ``N mod W`` (< W) left out are the last ones of that epoch's shard
order, so they change from epoch to epoch. Every rank yields the same number of items, split
the same way over its workers, so every rank runs the same number of steps (what DDP needs).
Given ``batch_size``, the worker runs are whole batches (the partial one, if any, goes to one
worker), so a loader with ``drop_last=True`` drops fewer than ``batch_size`` items per rank.
Items are ``(utt_id, crop [T] float32, label)`` exactly as :class:`CropDataset` makes them
(the same :class:`CropMaker`, with the random generator seeded by ``(seed, epoch, manifest
index)``), so a shard item equals ``CropDataset(rows)[index]`` for the same rows and epoch.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import tarfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from qmargin_spk.data.audio import AudioError, load_audio_bytes
from qmargin_spk.data.dataset import CropMaker, SpeakerLabelEncoder
from qmargin_spk.data.manifest import ManifestRow
from qmargin_spk.data.tar_stream import DamagedShard, read_shard
from qmargin_spk.utils.atomic import atomic_open, atomic_write_text

SHARD_FORMAT = "qmargin_spk.shards/1"
INDEX_NAME = "shards.json"
AUDIO_EXTENSIONS = ("wav", "flac", "ogg")

PathLike = str | os.PathLike


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


# --- the index ----------------------------------------------------------------------


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
    def load(cls, path: PathLike) -> "ShardIndex":
        """Read and check an index written by :func:`write_shards` (refuses an unfinished one)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot read the shard index ({err})") from err
        if not isinstance(data, dict) or data.get("format") != SHARD_FORMAT:
            raise ValueError(f"{path}: not a shard index (format {data.get('format') if isinstance(data, dict) else None!r})")
        shards = tuple(ShardInfo(**entry) for entry in data["shards"])
        index = cls(shards, data["num_utterances"], tuple(data["speakers"]), data["seed"], data["utts_per_shard"],
                     data["complete"], root=path.parent)
        if not index.complete:
            raise ValueError(f"{path}: the shards were not all written; run write_shards again")
        if sum(s.num_utterances for s in shards) != index.num_utterances:
            raise ValueError(f"{path}: shard counts add up to {sum(s.num_utterances for s in shards)}, "
                             f"not num_utterances = {index.num_utterances}")
        return index


# --- writing ------------------------------------------------------------------------


def plan_shards(num_rows: int, utts_per_shard: int, seed: int) -> list[np.ndarray]:
    """Row numbers of each shard: a seeded permutation cut into near-equal parts of at most ``utts_per_shard``."""
    if num_rows <= 0 or utts_per_shard <= 0:
        raise ValueError(f"need rows and a positive shard size, got {num_rows} rows, {utts_per_shard} per shard")
    order = np.random.default_rng(seed).permutation(num_rows)
    return np.array_split(order, math.ceil(num_rows / utts_per_shard))


def _member_stem(row_number: int) -> str:
    return f"{row_number:09d}"


def _audio_extension(path: str) -> str:
    extension = Path(path).suffix.lower().lstrip(".")
    if extension not in AUDIO_EXTENSIONS:
        raise ValueError(f"{path}: audio must be one of {AUDIO_EXTENSIONS} to be sharded")
    return extension


def _metadata(row: ManifestRow, row_number: int) -> dict:
    return {"id": row.id, "spk_id": row.spk_id, "duration": row.duration, "index": int(row_number)}


def _fingerprint(rows: Sequence[ManifestRow], numbers: Iterable[int]) -> str:
    digest = hashlib.sha1(SHARD_FORMAT.encode())
    for number in numbers:
        digest.update(json.dumps([_metadata(rows[number], number), rows[number].wav]).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class _ShardJob:
    path: str
    members: tuple[tuple[str, dict, str], ...]  # (member stem, metadata, audio path)


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0  # fixed metadata: same rows, same bytes
    return info


def _write_shard(job: _ShardJob) -> None:
    with atomic_open(job.path, "wb") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for stem, metadata, audio_path in job.members:
            text = json.dumps(metadata).encode()
            tar.addfile(_tar_member(f"{stem}.json", len(text)), io.BytesIO(text))
            try:
                audio = Path(audio_path).read_bytes()
            except OSError as err:
                raise FileNotFoundError(f"{audio_path}: cannot read audio for {job.path} ({err})") from err
            tar.addfile(_tar_member(f"{stem}.{_audio_extension(audio_path)}", len(audio)), io.BytesIO(audio))


def _previous_fingerprints(out_dir: Path) -> dict[str, str]:
    """Fingerprints of the shards listed by an existing index, finished or not ({} if none)."""
    try:
        data = json.loads((out_dir / INDEX_NAME).read_text(encoding="utf-8"))
        return {entry["name"]: entry["fingerprint"] for entry in data["shards"]} if data.get("format") == SHARD_FORMAT else {}
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

    Re-runnable: shards already there with the same rows are kept, any other ``shard-*.tar``
    is removed or rewritten; the index says ``complete`` only once every shard is written.
    One writer per folder at a time.
    """
    rows = list(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        _audio_extension(row.wav)
    plan = plan_shards(len(rows), utts_per_shard, seed)
    shards = tuple(ShardInfo(shard_name(k), len(numbers), _fingerprint(rows, numbers)) for k, numbers in enumerate(plan))
    previous = _previous_fingerprints(out_dir)
    keep = {s.name for s in shards if previous.get(s.name) == s.fingerprint and (out_dir / s.name).is_file()}
    for stale in [*out_dir.glob("shard-*.tar"), *out_dir.glob(".shard-*.tar.*.tmp")]:
        if stale.name not in keep:
            stale.unlink()
    index = ShardIndex(shards, len(rows), tuple(sorted({row.spk_id for row in rows})), seed, utts_per_shard,
                       complete=False, root=out_dir)
    index.save(out_dir / INDEX_NAME)
    jobs = [
        _ShardJob(str(out_dir / info.name),
                  tuple((_member_stem(n), _metadata(rows[n], n), rows[n].wav) for n in sorted(numbers)))
        for info, numbers in zip(shards, plan) if info.name not in keep
    ]
    workers = min(len(jobs), num_workers or os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_shard, jobs))
    else:
        for job in jobs:
            _write_shard(job)
    index = replace(index, complete=True)
    index.save(out_dir / INDEX_NAME)
    return index


# --- the epoch plan -----------------------------------------------------------------


class ShardSpan(NamedTuple):
    """Utterances ``first <= n < stop`` (in tar order) of shard number ``shard``."""

    shard: int
    first: int
    stop: int


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The order the shards are concatenated in for ``epoch`` (the same on every rank and worker)."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def worker_item_counts(per_rank: int, num_workers: int, batch_size: int | None = None) -> list[int]:
    """How a rank's ``per_rank`` items are split over its workers, in worker order.

    Without ``batch_size``: near-equal parts. With it: whole batches dealt round-robin, the
    remainder (< batch_size) to the worker whose turn comes next. Either way the workers'
    batch counts differ by at most one and never grow with the worker number, which
    :meth:`ShardCropDataset.resume_after` relies on.
    """
    unit = batch_size or 1
    full, rest = divmod(per_rank, unit)
    base, extra = divmod(full, num_workers)
    counts = [(base + (k < extra)) * unit for k in range(num_workers)]
    counts[extra % num_workers] += rest
    return counts


def slot_spans(shard_sizes: Sequence[int], order: Sequence[int], start: int, count: int) -> list[ShardSpan]:
    """The shard pieces covering utterances ``start <= p < start + count`` of the shards concatenated in ``order``."""
    spans, offset, end = [], 0, start + count
    for shard in order:
        size = shard_sizes[shard]
        if offset + size > start and offset < end:
            spans.append(ShardSpan(int(shard), max(start, offset) - offset, min(end, offset + size) - offset))
        offset += size
        if offset >= end:
            break
    return spans


def buffered_shuffle(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """Items in an order shuffled through a buffer of ``size`` (the classic streaming shuffle)."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


def _distributed_rank_and_size() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --- reading ------------------------------------------------------------------------


class ShardCropDataset(torch.utils.data.IterableDataset):
    """Items ``(utt_id, crop [T], label)`` streamed from shards; exact epochs (see the module docstring).

    ``index``: the path of ``shards.json`` (or a loaded :class:`ShardIndex`). ``url_template``,
    e.g. ``"pipe:curl -sf https://host/data/{name}"``, makes the URL of each shard from its
    ``name`` and the index folder ``root`` (default: ``{root}/{name}``, the file next to the
    index). ``rank`` / ``world_size`` default to torch.distributed's (0 / 1 when it is not
    initialised), read in the main process at construction and at :meth:`set_epoch`, because a
    DataLoader worker started with ``spawn`` or ``forkserver`` has no process group and would
    otherwise read the whole epoch on every rank; workers come from the DataLoader.
    ``shuffle_buffer`` crops are held per worker (``T * 4`` bytes each). ``batch_size``, when
    given, aligns the worker split to whole batches. A damaged sample is skipped with a
    warning naming shard and member, and replaced by one more crop (with its own random
    draws) of the next readable utterance, so the number of items per epoch never changes.
    Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        index: PathLike | ShardIndex,
        labels: SpeakerLabelEncoder,
        crop_seconds: float = 2.0,
        sample_rate: int = 16000,
        speed_factors: Sequence[float] = (1.0,),
        speed_as_new_class: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        batch_size: int | None = None,
        url_template: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        max_retries: int = 10,
    ):
        self.index = index if isinstance(index, ShardIndex) else ShardIndex.load(index)
        unknown = sorted(set(self.index.speakers) - set(labels.speakers))
        if unknown:
            raise ValueError(f"{len(unknown)} speakers of the shard index are not in the label encoder, e.g. {unknown[:3]}")
        self.crops = CropMaker(labels, crop_seconds, sample_rate, speed_factors, speed_as_new_class)
        self.labels = labels
        self.num_classes = self.crops.num_classes
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.url_template = url_template
        self.rank, self.world_size = rank, world_size
        self.max_retries = max_retries
        self.epoch = 0
        self._resume = (0, 1)  # (batches already trained on in this epoch, their size)
        self._distributed = _distributed_rank_and_size()  # the main process's view, carried into workers

    # -- the plan --

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order, crops, shuffle); also ends any :meth:`resume_after`."""
        self.epoch = epoch
        self._resume = (0, 1)
        self._distributed = _distributed_rank_and_size()

    def resume_after(self, batches_done: int, batch_size: int) -> None:
        """Make the coming pass over this epoch continue after the first ``batches_done`` batches of this rank.

        For a killed run resumed mid-epoch: call it after :meth:`set_epoch` with the loader's
        batch size; the batches then continue exactly where they stopped (the skipped items are
        read again, not trained on).

        Why it works: every worker's batch count is within one of the others' and never larger
        than an earlier worker's, so the DataLoader's round-robin puts batch ``i`` of the epoch on
        worker ``i % K``. A new loader starts its round-robin at worker 0, so worker ``k`` here
        plays the part of worker ``(k + batches_done) % K`` and skips that worker's batches among
        the first ``batches_done``.
        """
        if batches_done < 0 or batch_size <= 0:
            raise ValueError(f"need batches_done >= 0 and batch_size > 0, got {batches_done}, {batch_size}")
        self._resume = (int(batches_done), int(batch_size))

    def rank_and_world_size(self) -> tuple[int, int]:
        """This process's rank and the world size: the explicit ones, else torch.distributed's.

        In a DataLoader worker, torch.distributed's as the main process saw them (see the class docstring).
        """
        in_worker = torch.utils.data.get_worker_info() is not None
        rank, size = self._distributed if in_worker else _distributed_rank_and_size()
        return (rank if self.rank is None else self.rank), (size if self.world_size is None else self.world_size)

    def __len__(self) -> int:
        """Items this rank yields per epoch, all its workers together: ``N // world_size``."""
        return self.index.num_utterances // self.rank_and_world_size()[1]

    def num_batches(self, batch_size: int, num_workers: int = 0, drop_last: bool = True) -> int:
        """Batches (= optimiser steps) per epoch on every rank, for a DataLoader with these settings."""
        counts = worker_item_counts(len(self), max(num_workers, 1), self.batch_size)
        return sum(c // batch_size if drop_last else math.ceil(c / batch_size) for c in counts)

    def worker_spans(self, rank: int, world_size: int, worker: int, num_workers: int) -> list[ShardSpan]:
        """The shard pieces that one (rank, worker) slot reads this epoch."""
        per_rank = self.index.num_utterances // world_size
        counts = worker_item_counts(per_rank, num_workers, self.batch_size)
        order = epoch_shard_order(len(self.index.shards), self.seed, self.epoch)
        sizes = [s.num_utterances for s in self.index.shards]
        return slot_spans(sizes, order, rank * per_rank + sum(counts[:worker]), counts[worker])

    def shard_url(self, name: str) -> str:
        if self.url_template is not None:
            return self.url_template.format(name=name, root=self.index.root)
        return str((self.index.root or Path(".")) / name)

    # -- the stream --

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        rank, world_size = self.rank_and_world_size()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if self.index.num_utterances < world_size:
            raise ValueError(f"{self.index.num_utterances} utterances cannot be split over {world_size} ranks")
        info = torch.utils.data.get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches_done, batch_size = self._resume
        worker = (loader_worker + batches_done) % num_workers
        spans = self.worker_spans(rank, world_size, worker, num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker, num_workers])
        items = buffered_shuffle(self._read_spans(spans), self.shuffle_buffer, rng)
        return itertools.islice(items, len(range(worker, batches_done, num_workers)) * batch_size, None)

    def _read_spans(self, spans: Sequence[ShardSpan]) -> Iterator[tuple[str, torch.Tensor, int]]:
        """Items of the spans in tar order; damaged samples are replaced by extra crops of the next good one."""
        owed, failures_in_a_row, last_good = 0, 0, None
        for span in spans:
            url = self.shard_url(self.index.shards[span.shard].name)
            seen = 0
            try:
                for key, members in read_shard(url, span.first, span.stop):
                    seen += 1
                    item = self._try_item(url, key, members, extra=0)
                    if item is None:
                        owed, failures_in_a_row = owed + 1, failures_in_a_row + 1
                        if failures_in_a_row > self.max_retries:
                            raise RuntimeError(f"{failures_in_a_row} damaged samples in a row, the last in {url}")
                        continue
                    failures_in_a_row, last_good = 0, (url, key, members)
                    yield item
                    owed = yield from self._replacements(last_good, owed)
            except DamagedShard as err:
                warnings.warn(f"{url}: {err}; its remaining samples are replaced", RuntimeWarning)
            if seen < span.stop - span.first:
                warnings.warn(f"{url}: read {seen} of the {span.stop - span.first} utterances expected "
                              f"(samples {span.first}..{span.stop - 1})", RuntimeWarning)
                owed += span.stop - span.first - seen
        if owed and last_good is not None:
            owed = yield from self._replacements(last_good, owed)
        if owed:
            raise RuntimeError(f"{owed} items could not be replaced: no readable utterance in {len(spans)} shard pieces")

    def _replacements(self, sample: tuple[str, str, dict[str, bytes]], owed: int):
        """Yield up to ``owed`` extra crops of ``sample`` (replacing damaged ones); returns how many are still owed."""
        extra = 0
        while owed and extra < owed + self.max_retries:
            extra += 1
            item = self._try_item(*sample, extra=extra)
            if item is not None:
                owed -= 1
                yield item
        return owed

    def _try_item(self, url: str, key: str, members: dict[str, bytes], extra: int) -> tuple[str, torch.Tensor, int] | None:
        """The crop of one sample, or None (with a warning naming shard and member) if it is damaged.

        ``extra`` > 0 draws a replacement crop, with a generator of its own.
        """
        extension = next((ext for ext in AUDIO_EXTENSIONS if ext in members), None)
        try:
            metadata = json.loads(members["json"])
            speaker = self.labels.encode(metadata["spk_id"])
            utt_id, duration, row_number = str(metadata["id"]), float(metadata["duration"]), int(metadata["index"])
        except (KeyError, ValueError, TypeError) as err:
            warnings.warn(f"skipping a damaged training sample: {url}: member {key}.json: missing or malformed ({err!r})",
                          RuntimeWarning)
            return None
        if extension is None:
            warnings.warn(f"skipping a damaged training sample: {url}: sample {key} has no audio member", RuntimeWarning)
            return None
        name = f"{url}: member {key}.{extension}"
        sample_rate = self.crops.sample_rate

        def read_segment(start: int, num_samples: int | None) -> torch.Tensor:
            return load_audio_bytes(members[extension], name, sample_rate, start, num_samples)

        rng = np.random.default_rng([self.seed, self.epoch, row_number] + ([extra] if extra else []))
        try:
            crop, label = self.crops.make(read_segment, duration, speaker, rng)
        except AudioError as err:
            warnings.warn(f"skipping a damaged training sample: {err}", RuntimeWarning)
            return None
        return utt_id, crop, label
