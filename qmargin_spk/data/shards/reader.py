"""Streaming the tar shards as training crops, in exact epochs (:class:`ShardCropDataset`).

Every epoch concatenates the shards in an order shuffled by ``(seed, epoch)``; rank ``r`` of
``W`` takes the contiguous run of ``N // W`` utterances starting at ``r * (N // W)``, and cuts
it into one contiguous run per DataLoader worker. Each utterance is thus read at most once per
epoch, and exactly once when ``W`` divides ``N``; the ``N mod W`` (< W) left out are the last
ones of that epoch's shard order, so they change from epoch to epoch. Every rank yields the same
number of items, split the same way over its workers, so every rank runs the same number of
steps (what DDP needs). Given ``batch_size``, the worker runs are whole batches (the partial
one, if any, goes to one worker), so a loader with ``drop_last=True`` drops fewer than
``batch_size`` items per rank. Items are ``(utt_id, crop [T] float32, label)`` exactly as
:class:`CropDataset` makes them (the same :class:`CropMaker`, with the random generator seeded
by ``(seed, epoch, manifest index)``), so a shard item equals ``CropDataset(rows)[index]`` for
the same rows and epoch.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from qmargin_spk.data.audio import AudioError, load_audio_bytes
from qmargin_spk.data.dataset import CropMaker, SpeakerLabelEncoder
from qmargin_spk.data.shards.index import AUDIO_EXTENSIONS, PathLike, ShardIndex
from qmargin_spk.data.tar_stream import DamagedShard, read_shard


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
            raise ValueError(
                f"{len(unknown)} speakers of the shard index are not in the label encoder, e.g. {unknown[:3]}"
            )
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
                warnings.warn(
                    f"{url}: read {seen} of the {span.stop - span.first} utterances expected "
                    f"(samples {span.first}..{span.stop - 1})",
                    RuntimeWarning,
                )
                owed += span.stop - span.first - seen
        if owed and last_good is not None:
            owed = yield from self._replacements(last_good, owed)
        if owed:
            raise RuntimeError(
                f"{owed} items could not be replaced: no readable utterance in {len(spans)} shard pieces"
            )

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

    def _try_item(
        self, url: str, key: str, members: dict[str, bytes], extra: int
    ) -> tuple[str, torch.Tensor, int] | None:
        """The crop of one sample, or None (with a warning naming shard and member) if it is damaged.

        ``extra`` > 0 draws a replacement crop, with a generator of its own.
        """
        extension = next((ext for ext in AUDIO_EXTENSIONS if ext in members), None)
        try:
            metadata = json.loads(members["json"])
            speaker = self.labels.encode(metadata["spk_id"])
            utt_id, duration, row_number = str(metadata["id"]), float(metadata["duration"]), int(metadata["index"])
        except (KeyError, ValueError, TypeError) as err:
            warnings.warn(
                f"skipping a damaged training sample: {url}: member {key}.json: missing or malformed ({err!r})",
                RuntimeWarning,
            )
            return None
        if extension is None:
            warnings.warn(
                f"skipping a damaged training sample: {url}: sample {key} has no audio member", RuntimeWarning
            )
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
