"""Embedding extraction for unique utterances, batched by length, cached on disk.

Each utterance is embedded once, whole (or, with ``chunk_seconds``, as near-equal
chunks whose embeddings are averaged). Zero padding changes what a convolutional
embedder computes near the end of a row (filterbank frames, convolution context), so
an embedding would depend on its batch-mates: by default only segments of exactly
equal length share a batch (``max_padding=0``), and a batch never holds more than
``max_batch_seconds`` of padded audio, so one very long file is embedded alone and
memory stays bounded (the plan is :mod:`qmargin_spk.data.batching`'s, shared with
``SpeakerModel`` and the ONNX runner). ``embed_fn`` gets the padded batch and each row's length as a
fraction of the batch width. The cache is keyed on the model id, the front-end
settings, the utterance -> path mapping with each file's content fingerprint
(:func:`~qmargin_spk.data.fingerprint.audio_fingerprint`: size, mtime and edge blocks)
and every extraction setting (batch policy included), written atomically, and reused
only when the key matches; the partial file's entries are matched by path and fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qmargin_spk.data.audio import AudioError, audio_info, load_audio, pad_waveforms
from qmargin_spk.data.batching import (
    Piece,
    batch_pieces,
    check_batching,
    check_min_length,
    max_batch_samples,
    plan_batches,
    plan_pieces,
)
from qmargin_spk.data.fingerprint import audio_fingerprints
from qmargin_spk.utils.atomic import atomic_torch_save

logger = logging.getLogger(__name__)

EmbedFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CACHE_FORMAT = 3  # 3: file fingerprints and front-end settings in the keys
MAX_LISTED_FAILURES = 10


@dataclass(frozen=True)
class EmbeddingTable:
    """Embeddings ``vectors`` [N, D] (float32, CPU) of utterances ``utt_ids`` (sorted)."""

    utt_ids: list[str]
    vectors: torch.Tensor

    def indices(self, utt_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Row of each of ``utt_ids`` (vectorised); KeyError naming those that are absent."""
        table = np.asarray(self.utt_ids, dtype=str)
        wanted = np.asarray(utt_ids, dtype=str)
        rows = np.minimum(np.searchsorted(table, wanted), len(table) - 1)
        absent = table[rows] != wanted
        if absent.any():
            names = np.unique(wanted[absent])
            raise KeyError(f"{names.size} utterances have no embedding, e.g. {names[:5].tolist()}")
        return rows


def extract_embeddings(
    paths: Mapping[str, str | os.PathLike],
    embed_fn: EmbedFn,
    cache_path: str | os.PathLike | None,
    model_id: str,
    batch_size: int = 16,
    chunk_seconds: float | None = None,
    sample_rate: int = 16000,
    max_padding: float = 0.0,
    max_batch_seconds: float = 300.0,
    save_every_seconds: float = 300.0,
    frontend: Mapping | None = None,
    min_samples: int | None = None,
) -> EmbeddingTable:
    """Embed every utterance of ``paths`` (utt id -> audio file) with ``embed_fn``.

    ``embed_fn(wavs [B, T], rel_lens [B]) -> [B, D]`` (``[B, 1, D]`` is accepted) runs
    under ``torch.no_grad``; it receives CPU float32 tensors and moves them where it
    needs. Utterances longer than 1.5 ``chunk_seconds`` are cut into near-equal chunks
    of about ``chunk_seconds`` whose embeddings are averaged. ``cache_path`` None
    disables the cache. ``model_id`` (the weights' identity) and ``frontend`` (the
    front-end settings, a JSON-able mapping) name the model in the cache key; a file
    whose content fingerprint changed is embedded again. A segment shorter than
    ``min_samples`` (the model's shortest input) stops the run before anything is
    embedded, naming the files (:class:`~qmargin_spk.data.batching.TooShortError`).

    Batching: at most ``batch_size`` segments, each at least ``1 - max_padding`` times
    as long as the batch's longest (0: equal lengths only, so no padding and results
    independent of batching; up to 1: any lengths, only for an ``embed_fn`` that
    masks padding exactly), and at most ``max_batch_seconds`` of padded audio (rows
    x width) unless the batch is a single segment.

    Failures keep the work done: finished embeddings are saved to ``<cache_path>.partial``
    every ``save_every_seconds`` and when an error stops the run, and the next run with
    the same model and settings embeds only what is missing. A file whose samples
    cannot be read (e.g. NaN) does not stop the others: all such files are named in
    one :class:`AudioError` at the end.
    """
    if not paths:
        raise ValueError("no utterances to embed")
    check_batching(batch_size, max_padding, max_batch_seconds, chunk_seconds, sample_rate)
    utt_ids = sorted(paths)
    settings = {
        "chunk_seconds": chunk_seconds,
        "sample_rate": sample_rate,
        "batch_size": batch_size,
        "max_padding": max_padding,
        "max_batch_seconds": max_batch_seconds,
    }
    model = {"model_id": model_id, "frontend": None if frontend is None else dict(frontend)}
    files = [str(paths[utt]) for utt in utt_ids]
    fingerprints = audio_fingerprints(files)  # None for a file that cannot be opened: _segments names it
    key = _digest({**model, **settings, "utterances": [list(entry) for entry in zip(utt_ids, files, fingerprints)]})
    cached = _load_cache(cache_path, key)
    if cached is not None:
        logger.info("embeddings of %d utterances reused from %s", len(utt_ids), cache_path)
        return cached

    settings_key = _digest({**model, **settings})
    progress = _Progress(files, fingerprints, cache_path, settings_key)
    segments = _segments(files, chunk_seconds, sample_rate, skip=progress.resumed.keys())
    check_min_length(segments, min_samples, sample_rate, files.__getitem__)
    progress.expect(segments)
    max_samples = max_batch_samples(max_batch_seconds, sample_rate)
    last_save = time.monotonic()
    try:
        with torch.no_grad():
            for planned in batch_pieces(segments, batch_size, max_padding, max_samples):
                loaded, wavs = progress.load(planned, sample_rate)
                # A resampled file can come out a sample off its planned length: regroup by actual length.
                for rows in plan_batches([wav.numel() for wav in wavs], batch_size, max_padding, max_samples):
                    batch = [loaded[row] for row in rows]
                    progress.add(batch, _embed_batch(batch, [wavs[row] for row in rows], files, embed_fn))
                if progress.path is not None and time.monotonic() - last_save >= save_every_seconds:
                    progress.save()
                    last_save = time.monotonic()
    except BaseException:
        progress.save_quietly()
        raise
    if progress.failures:
        progress.save_quietly()
        raise progress.failure_error()
    table = EmbeddingTable(utt_ids, progress.vectors())
    if cache_path is not None:
        atomic_torch_save(
            {
                "format": CACHE_FORMAT,
                "key": key,
                "model_id": model_id,
                "utt_ids": table.utt_ids,
                "vectors": table.vectors,
                # per file, as in the partial file: a later run reuses the entries of unchanged files
                "settings_key": settings_key,
                "paths": files,
                "fingerprints": fingerprints,
            },
            cache_path,
        )
        progress.discard()
    logger.info("embedded %d utterances (%d segments, %d resumed)", len(files), len(segments), len(progress.resumed))
    return table


def cached_embeddings(cache_path: str | os.PathLike) -> EmbeddingTable:
    """The table a finished :func:`extract_embeddings` stored at ``cache_path`` (what that call returned)."""
    stored = torch.load(cache_path, map_location="cpu", weights_only=True)
    return EmbeddingTable(list(stored["utt_ids"]), stored["vectors"])


class _Progress:
    """What an extraction has finished, kept on disk (``<cache>.partial``) so a failed run resumes.

    The partial file holds the embeddings of finished utterances with their paths and
    content fingerprints, under a key of the model and the settings (not of the utterance
    set, so a run on a subset or superset reuses it); an entry is reused only for the same
    path with the same fingerprint. The complete cache of an earlier run with the same
    settings is read the same way, so only new and changed files are embedded again.
    Failed files are remembered and skipped.
    """

    def __init__(
        self, files: list[str], fingerprints: list[str | None], cache_path: str | os.PathLike | None, settings_key: str
    ) -> None:
        self.files = files
        self.fingerprints = fingerprints
        self.path = _partial_path(cache_path)
        self.settings_key = settings_key
        wanted = list(zip(files, fingerprints))
        earlier, _ = _load_entries(None if cache_path is None else Path(cache_path), settings_key, wanted)
        self.resumed, self.others_stored = _load_entries(self.path, settings_key, wanted)
        self.resumed = earlier | self.resumed
        if self.resumed:
            logger.info("resuming extraction: %d of %d embeddings reused", len(self.resumed), len(files))
        self.expected = torch.zeros(len(files), dtype=torch.float64)
        self.counts = torch.zeros(len(files), dtype=torch.float64)
        self.sums: torch.Tensor | None = None
        self.failures: dict[int, str] = {}

    def expect(self, segments: list[Piece]) -> None:
        """Count the segments each utterance still needs."""
        rows = torch.tensor([s.row for s in segments], dtype=torch.long)
        self.expected.index_add_(0, rows, torch.ones(len(segments), dtype=torch.float64))

    def load(self, batch: list[Piece], sample_rate: int) -> tuple[list[Piece], list[torch.Tensor]]:
        """Audio of the batch's segments; a file that fails is recorded and left out, with its other segments."""
        kept, wavs = [], []
        for s in batch:
            if s.row in self.failures:
                continue
            try:
                wavs.append(
                    load_audio(self.files[s.row], sample_rate, start=s.start, num_samples=None if s.whole else s.length)
                )
            except AudioError as err:
                self.failures[s.row] = str(err)
                continue
            kept.append(s)
        return kept, wavs

    def add(self, batch: list[Piece], embeddings: torch.Tensor) -> None:
        if self.sums is None:
            self.sums = torch.zeros(len(self.files), embeddings.shape[1], dtype=torch.float64)
        rows = torch.tensor([segment.row for segment in batch], dtype=torch.long)
        self.sums.index_add_(0, rows, embeddings)
        self.counts.index_add_(0, rows, torch.ones(len(batch), dtype=torch.float64))

    def finished(self) -> dict[int, torch.Tensor]:
        """Float32 embedding of every utterance with all its segments embedded (resumed ones included)."""
        done = dict(self.resumed)
        if self.sums is not None:
            complete = ((self.counts == self.expected) & (self.expected > 0)).nonzero().flatten().tolist()
            done.update(
                {
                    row: (self.sums[row] / self.counts[row]).to(torch.float32)
                    for row in complete
                    if row not in self.failures
                }
            )
        return done

    def vectors(self) -> torch.Tensor:
        """[N, D] embeddings of all utterances (call once every segment is embedded)."""
        done = self.finished()
        return torch.stack([done[row] for row in range(len(self.files))])

    def save(self) -> None:
        if self.path is None:
            return
        done = self.finished()
        if not done:
            return
        rows = sorted(done)
        atomic_torch_save(
            {
                "format": CACHE_FORMAT,
                "settings_key": self.settings_key,
                "paths": [self.files[row] for row in rows],
                "fingerprints": [self.fingerprints[row] for row in rows],
                "vectors": torch.stack([done[row] for row in rows]),
            },
            self.path,
        )

    def save_quietly(self) -> None:
        """Save during error handling: a second failure is logged, never raised over the first."""
        try:
            self.save()
        except Exception as err:  # noqa: BLE001 - the original error matters more
            logger.error("could not save partial embeddings to %s: %s", self.path, err)

    def discard(self) -> None:
        """Remove the partial file once the cache holds all it had (it may serve another utterance set)."""
        if self.path is not None and not self.others_stored:
            self.path.unlink(missing_ok=True)

    def failure_error(self) -> AudioError:
        kept = len(self.finished())
        where = f"kept in {self.path} and reused by the next run" if self.path is not None else "not kept (no cache)"
        problems = [self.failures[row] for row in sorted(self.failures)]
        listed = problems[:MAX_LISTED_FAILURES]
        more = f"\n  ... and {len(problems) - len(listed)} more" if len(problems) > len(listed) else ""
        return AudioError(
            f"{len(problems)} of {len(self.files)} files could not be embedded; the embeddings of {kept} others are "
            f"{where}:\n  " + "\n  ".join(listed) + more
        )


def _partial_path(cache_path: str | os.PathLike | None) -> Path | None:
    return None if cache_path is None else Path(f"{cache_path}.partial")


def _load_entries(
    path: Path | None, settings_key: str, files: list[tuple[str, str | None]]
) -> tuple[dict[int, torch.Tensor], bool]:
    """Rows of ``files`` (path, fingerprint) whose embedding a partial or cache file with these settings
    holds (same path and fingerprint), and whether it holds embeddings of other files too."""
    if path is None or not path.is_file():
        return {}, False
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable file only costs recomputation
        logger.warning("ignoring unreadable embeddings %s: %s", path, err)
        return {}, False
    if not isinstance(stored, dict) or stored.get("settings_key") != settings_key:
        return {}, False
    by_file = dict(zip(zip(stored["paths"], stored["fingerprints"]), stored["vectors"]))
    resumed = {row: by_file[file] for row, file in enumerate(files) if file[1] is not None and file in by_file}
    return resumed, len(resumed) < len(by_file)


def _digest(description: Mapping[str, object]) -> str:
    """SHA-256 of what determines the embeddings (model, settings, files' fingerprints), with the cache format."""
    text = json.dumps({"format": CACHE_FORMAT, **description}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _load_cache(cache_path: str | os.PathLike | None, key: str) -> EmbeddingTable | None:
    """The cached table if ``cache_path`` holds one with this ``key``, else None."""
    if cache_path is None or not Path(cache_path).is_file():
        return None
    stored = torch.load(cache_path, map_location="cpu", weights_only=True)
    if not isinstance(stored, dict) or stored.get("key") != key:
        logger.info("embedding cache %s is for other files, settings or model: embedding what changed", cache_path)
        return None
    return EmbeddingTable(list(stored["utt_ids"]), stored["vectors"])


def _segments(files: list[str], chunk_seconds: float | None, sample_rate: int, skip: Iterable[int] = ()) -> list[Piece]:
    """Pieces of every file (except rows in ``skip``), longest first, lengths from the headers.

    Every unusable header is found before anything is embedded, and all are named in one error.
    """
    skip = set(skip)
    lengths, problems = {}, []
    for row, path in enumerate(files):
        if row in skip:
            continue
        try:
            info = audio_info(path)
        except AudioError as err:
            problems.append(str(err))
            continue
        lengths[row] = max(1, int(info.frames * sample_rate // info.sample_rate))
    if problems:
        listed = problems[:MAX_LISTED_FAILURES]
        more = f"\n  ... and {len(problems) - len(listed)} more" if len(problems) > len(listed) else ""
        raise AudioError(f"{len(problems)} of {len(files)} files cannot be embedded:\n  " + "\n  ".join(listed) + more)
    return plan_pieces(lengths, chunk_seconds, sample_rate)


def _embed_batch(batch: list[Piece], wavs: list[torch.Tensor], files: list[str], embed_fn: EmbedFn) -> torch.Tensor:
    """Pad and embed one batch of loaded segments; returns float64 CPU embeddings [B, D]."""
    output = embed_fn(*pad_waveforms(wavs))
    if output.ndim == 3 and output.shape[1] == 1:
        output = output[:, 0]
    if output.ndim != 2 or output.shape[0] != len(batch):
        raise ValueError(f"embed_fn must return [B, D] (B={len(batch)}), got shape {tuple(output.shape)}")
    output = output.detach().to(device="cpu", dtype=torch.float64)
    bad_rows = (~torch.isfinite(output)).any(dim=1).nonzero().flatten().tolist()
    if bad_rows:
        raise ValueError(f"embed_fn returned NaN/inf embeddings for {[files[batch[i].row] for i in bad_rows]}")
    return output
