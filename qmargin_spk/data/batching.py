"""The one batch planner of embedding extraction: which samples of which item share a batch.

Used by the scoring stage (:func:`qmargin_spk.scoring.embeddings.extract_embeddings`),
:class:`qmargin_spk.inference.SpeakerModel` and the torch-free
:class:`qmargin_spk.inference.onnx_runtime.OnnxSpeakerModel`, so an utterance gets the same
embedding through each of them. numpy only: nothing here (or above it) imports torch.

Policy. An item (utterance) of ``length`` samples is embedded whole, or with ``chunk_seconds``
as ``max(1, round(length / chunk))`` near-equal pieces cut at
``linspace(0, length, pieces + 1).round()``, whose embeddings are averaged. Pieces are
sorted longest first and grouped greedily: a batch holds at most ``batch_size`` pieces,
each at least ``1 - max_padding`` times as long as its first (longest) one, and at most
``max_samples`` samples of padded audio (rows x width) unless it is a single piece. Zero
padding changes a convolutional embedder's output near the end of a row, and an exported
graph takes no lengths, so the default ``max_padding = 0`` lets only equal lengths share a
batch and each embedding is that of the item alone. Every piece must be at least the model's
shortest input (:func:`check_min_length`; the minimum is probed by
:func:`qmargin_spk.models.min_input.shortest_input`), which is checked before anything is embedded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, start + length)`` of item ``row`` (at the model rate); ``whole``: the entire item."""

    row: int
    start: int
    length: int
    whole: bool


def chunk_samples(chunk_seconds: float | None, sample_rate: int) -> int | None:
    """Samples per chunk for ``chunk_seconds`` (None: items are not cut); ValueError when under one sample."""
    if chunk_seconds is None:
        return None
    chunk = int(round(chunk_seconds * sample_rate))
    if chunk < 1:
        raise ValueError(f"chunk_seconds too small: {chunk_seconds}")
    return chunk


def chunk_bounds(length: int, chunk: int | None) -> list[tuple[int, int]]:
    """``(start, end)`` of the near-equal pieces of an item of ``length`` samples (one piece when ``chunk`` is None)."""
    pieces = 1 if chunk is None else max(1, int(round(length / chunk)))
    bounds = np.linspace(0, length, pieces + 1).round().astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def plan_pieces(lengths: Mapping[int, int], chunk_seconds: float | None, sample_rate: int) -> list[Piece]:
    """Pieces of every item (``row -> length`` in samples), longest first (ties in row order)."""
    chunk = chunk_samples(chunk_seconds, sample_rate)
    pieces = []
    for row, length in lengths.items():
        bounds = chunk_bounds(length, chunk)
        pieces.extend(Piece(row, start, end - start, len(bounds) == 1) for start, end in bounds)
    pieces.sort(key=lambda piece: -piece.length)
    return pieces


class TooShortError(ValueError):
    """Audio shorter than the shortest input the model can embed; the message names the items."""


def check_min_length(
    pieces: Sequence[Piece], min_samples: int | None, sample_rate: int, name: Callable[[int], str], max_listed: int = 10
) -> None:
    """:class:`TooShortError` (one line) naming the items, up to ``max_listed``, with a piece under ``min_samples``.

    ``name(row)`` describes an item (its file); None or 1 for ``min_samples``: no minimum.
    """
    if not min_samples or min_samples <= 1:
        return
    short: dict[int, Piece] = {}
    for piece in pieces:
        if piece.length < min_samples and (piece.row not in short or piece.length < short[piece.row].length):
            short[piece.row] = piece
    if not short:
        return
    rows = sorted(short)
    shown = [
        f"{name(row)} ({short[row].length / sample_rate:g} s{'' if short[row].whole else ' chunks'})"
        for row in rows[:max_listed]
    ]
    more = f" and {len(rows) - max_listed} more" if len(rows) > max_listed else ""
    hint = "; raise chunk_seconds" if any(not piece.whole for piece in short.values()) else ""
    minimum = f"{min_samples / sample_rate:g} s ({min_samples} samples at {sample_rate} Hz)"
    if len(rows) == 1:
        raise TooShortError(f"{shown[0]} is shorter than the model's minimum input of {minimum}{hint}")
    raise TooShortError(
        f"{len(rows)} inputs are shorter than the model's minimum input of {minimum}: " + ", ".join(shown) + more + hint
    )


def check_batching(
    batch_size: int,
    max_padding: float = 0.0,
    max_batch_seconds: float | None = None,
    chunk_seconds: float | None = None,
    sample_rate: int = 16000,
) -> None:
    """ValueError naming the first setting of the policy that is out of range (before any work starts)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0.0 <= max_padding <= 1.0:
        raise ValueError(f"max_padding must be in [0, 1], got {max_padding}")
    max_batch_samples(max_batch_seconds, sample_rate)
    chunk_samples(chunk_seconds, sample_rate)


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_padding: float = 0.0, max_samples: int | None = None
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches by the module's policy (longest first, ties in order)."""
    check_batching(batch_size, max_padding)
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        batch = batches[-1] if batches else None
        if batch is not None:
            width = lengths[batch[0]]
            fits = (
                len(batch) < batch_size
                and width - lengths[index] <= max_padding * width
                and (max_samples is None or (len(batch) + 1) * width <= max_samples)
            )
            if fits:
                batch.append(index)
                continue
        batches.append([index])
    return batches


def batch_pieces(
    pieces: Sequence[Piece], batch_size: int, max_padding: float = 0.0, max_samples: int | None = None
) -> list[list[Piece]]:
    """:func:`plan_batches` of pieces, as lists of pieces."""
    plan = plan_batches([piece.length for piece in pieces], batch_size, max_padding, max_samples)
    return [[pieces[index] for index in batch] for batch in plan]


def max_batch_samples(max_batch_seconds: float | None, sample_rate: int) -> int | None:
    """The samples-per-batch cap of ``max_batch_seconds`` (None: no cap); ValueError unless positive."""
    if max_batch_seconds is None:
        return None
    if not max_batch_seconds > 0:
        raise ValueError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
    return int(max_batch_seconds * sample_rate)


def embed_pieces(
    pieces: Sequence[Piece],
    n_items: int,
    load: Callable[[Piece], np.ndarray],
    embed: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 16,
    max_samples: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Float64 raw embeddings ``[n_items, D]``: each item's the mean of its pieces' embeddings.

    ``load(piece)`` gives the piece's samples (1-D); ``embed(wavs [B, T])`` the raw
    embeddings ``[B, D]`` of an equal-length batch. A loaded piece can be a sample off its
    planned length (resampling): each planned batch is regrouped by the actual lengths, so
    no row is ever padded. ``on_batch(n)`` is called after each planned batch of ``n`` pieces.
    """
    sums = None
    counts = np.zeros(n_items)
    for planned in batch_pieces(pieces, batch_size, max_samples=max_samples):
        wavs = [np.asarray(load(piece), dtype=np.float32) for piece in planned]
        for batch in plan_batches([wav.size for wav in wavs], batch_size, max_samples=max_samples):
            output = np.asarray(embed(np.stack([wavs[index] for index in batch])), dtype=np.float64)
            if sums is None:
                sums = np.zeros((n_items, output.shape[1]))
            rows = [planned[index].row for index in batch]
            np.add.at(sums, rows, output)  # one row at a time, in order (duplicates add up)
            np.add.at(counts, rows, 1)
        if on_batch is not None:
            on_batch(len(planned))
    if sums is None:
        raise ValueError("no audio given")
    return sums / counts[:, None]
