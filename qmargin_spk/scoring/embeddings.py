"""Embedding extraction for unique utterances, batched by length, cached on disk.

Each utterance is embedded once, whole (or, with ``chunk_seconds``, as near-equal
chunks whose embeddings are averaged). Zero padding changes what a convolutional
embedder computes near the end of a row (filterbank frames, convolution context), so
an embedding would depend on its batch-mates: by default only segments of exactly
equal length share a batch (``max_padding=0``), and a batch never holds more than
``max_batch_seconds`` of padded audio, so one very long file is embedded alone and
memory stays bounded. ``embed_fn`` gets the padded batch and each row's length as a
fraction of the batch width. The cache is keyed on the model id, the utterance ->
path mapping and every extraction setting (batch policy included), written
atomically, and reused only when the key matches.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from qmargin_spk.data.audio import audio_info, load_audio, pad_waveforms
from qmargin_spk.utils.atomic import atomic_torch_save

logger = logging.getLogger(__name__)

EmbedFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CACHE_FORMAT = 2


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


@dataclass(frozen=True)
class _Segment:
    """A stretch of one utterance, counted in samples at the extraction rate."""

    row: int
    start: int
    length: int
    whole: bool


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
) -> EmbeddingTable:
    """Embed every utterance of ``paths`` (utt id -> audio file) with ``embed_fn``.

    ``embed_fn(wavs [B, T], rel_lens [B]) -> [B, D]`` (``[B, 1, D]`` is accepted) runs
    under ``torch.no_grad``; it receives CPU float32 tensors and moves them where it
    needs. Utterances longer than 1.5 ``chunk_seconds`` are cut into near-equal chunks
    of about ``chunk_seconds`` whose embeddings are averaged. ``cache_path`` None
    disables the cache.

    Batching: at most ``batch_size`` segments, each at least ``1 - max_padding`` times
    as long as the batch's longest (0: equal lengths only, so no padding and results
    independent of batching; up to 1: any lengths, only for an ``embed_fn`` that
    masks padding exactly), and at most ``max_batch_seconds`` of padded audio (rows
    x width) unless the batch is a single segment.
    """
    if not paths:
        raise ValueError("no utterances to embed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0.0 <= max_padding <= 1.0:
        raise ValueError(f"max_padding must be in [0, 1], got {max_padding}")
    if not max_batch_seconds > 0:
        raise ValueError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
    utt_ids = sorted(paths)
    settings = {
        "chunk_seconds": chunk_seconds,
        "sample_rate": sample_rate,
        "batch_size": batch_size,
        "max_padding": max_padding,
        "max_batch_seconds": max_batch_seconds,
    }
    key = _cache_key(model_id, utt_ids, paths, settings)
    cached = _load_cache(cache_path, key)
    if cached is not None:
        logger.info("embeddings of %d utterances reused from %s", len(utt_ids), cache_path)
        return cached

    files = [str(paths[utt]) for utt in utt_ids]
    segments = _segments(files, chunk_seconds, sample_rate)
    sums: torch.Tensor | None = None
    counts = torch.zeros(len(files), dtype=torch.float64)
    with torch.no_grad():
        for batch in _batches(segments, batch_size, max_padding, int(max_batch_seconds * sample_rate)):
            embeddings = _embed_batch(batch, files, embed_fn, sample_rate)
            if sums is None:
                sums = torch.zeros(len(files), embeddings.shape[1], dtype=torch.float64)
            rows = torch.tensor([segment.row for segment in batch])
            sums.index_add_(0, rows, embeddings)
            counts.index_add_(0, rows, torch.ones(len(batch), dtype=torch.float64))
    table = EmbeddingTable(utt_ids, (sums / counts[:, None]).to(torch.float32))
    if cache_path is not None:
        atomic_torch_save(
            {
                "format": CACHE_FORMAT,
                "key": key,
                "model_id": model_id,
                "utt_ids": table.utt_ids,
                "vectors": table.vectors,
            },
            cache_path,
        )
    logger.info("embedded %d utterances (%d segments)", len(files), len(segments))
    return table


def _cache_key(
    model_id: str,
    utt_ids: list[str],
    paths: Mapping[str, str | os.PathLike],
    settings: Mapping[str, object],
) -> str:
    """SHA-256 of everything that determines the embeddings, except the audio bytes."""
    description = {
        "format": CACHE_FORMAT,
        "model_id": model_id,
        **settings,
        "utterances": [[utt, str(paths[utt])] for utt in utt_ids],
    }
    return hashlib.sha256(json.dumps(description).encode("utf-8")).hexdigest()


def _load_cache(cache_path: str | os.PathLike | None, key: str) -> EmbeddingTable | None:
    """The cached table if ``cache_path`` holds one with this ``key``, else None."""
    if cache_path is None or not Path(cache_path).is_file():
        return None
    stored = torch.load(cache_path, map_location="cpu", weights_only=True)
    if not isinstance(stored, dict) or stored.get("key") != key:
        logger.info("embedding cache %s is for other settings or another model: recomputing", cache_path)
        return None
    return EmbeddingTable(list(stored["utt_ids"]), stored["vectors"])


def _segments(files: list[str], chunk_seconds: float | None, sample_rate: int) -> list[_Segment]:
    """Segments of every file, longest first (lengths from the headers)."""
    chunk = None if chunk_seconds is None else int(round(chunk_seconds * sample_rate))
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk_seconds too small: {chunk_seconds}")
    segments = []
    for row, path in enumerate(files):
        info = audio_info(path)
        length = max(1, int(info.frames * sample_rate // info.sample_rate))
        pieces = 1 if chunk is None else max(1, int(round(length / chunk)))
        bounds = np.linspace(0, length, pieces + 1).round().astype(int)
        segments.extend(_Segment(row, int(a), int(b - a), pieces == 1) for a, b in zip(bounds[:-1], bounds[1:]))
    segments.sort(key=lambda segment: -segment.length)
    return segments


def _batches(
    segments: list[_Segment], batch_size: int, max_padding: float, max_samples: int
) -> list[list[_Segment]]:
    """Split longest-first ``segments`` into batches that respect the padding and size bounds."""
    batches: list[list[_Segment]] = []
    for segment in segments:
        batch = batches[-1] if batches else None
        fits = (
            batch is not None
            and len(batch) < batch_size
            and batch[0].length - segment.length <= max_padding * batch[0].length
            and (len(batch) + 1) * batch[0].length <= max_samples
        )
        if fits:
            batch.append(segment)
        else:
            batches.append([segment])
    return batches


def _embed_batch(batch: list[_Segment], files: list[str], embed_fn: EmbedFn, sample_rate: int) -> torch.Tensor:
    """Load, pad and embed one batch; returns float64 CPU embeddings [B, D]."""
    wavs = [
        load_audio(files[s.row], sample_rate, start=s.start, num_samples=None if s.whole else s.length)
        for s in batch
    ]
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
