"""A cheap content fingerprint of an audio file, for the keys of everything cached from audio.

The embedding cache (:func:`qmargin_spk.scoring.embeddings.extract_embeddings`, its partial
file included) and the tar shards' index (:mod:`qmargin_spk.data.shards.writer`) put it in
their keys, so an audio file changed in place invalidates what was computed from it.

Addresses (:mod:`qmargin_spk.data.sources.address`) are fingerprinted by what they read: a pipe
entry by its command and the SHA-256 of the samples it writes (the command runs once more), an
ark entry by the ark file's fingerprint plus the offset, a plain file by its own; a segment adds
its start and end.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from qmargin_spk.data.sources.address import ARK, PIPE, SourceError, ark_location, is_address, parse_address
from qmargin_spk.data.sources.kaldi_entry import read_entry

EDGE_BYTES = 64 * 1024


def audio_fingerprint(path: str | os.PathLike) -> str:
    """``"<size>:<mtime_ns>:<sha256>"`` of ``path``: SHA-256 over its first and last ``EDGE_BYTES`` bytes.

    Not a hash of the whole file: a 1M-utterance list would then read the whole corpus on
    every run, even when every embedding or shard is already there. Size and mtime catch
    ordinary edits (a rewrite, a truncation, a re-encoding); the edge blocks catch a file
    replaced by another of the same size whose mtime was restored (``cp -p``, ``rsync -t``,
    ``os.utime``), since the first block holds the header and the first samples. Missed: a
    same-size edit confined to the middle of the file that also restores the mtime. The
    fingerprint is taken before the file is read, so a file changed while it is being read
    is taken again next time. Raises ``OSError`` if it is not a regular file or cannot be opened.
    """
    if is_address(path):
        return _address_fingerprint(path)
    if not stat.S_ISREG(os.stat(path).st_mode):  # never open a FIFO or a device: it could block
        raise OSError(f"{path}: not a regular file")
    with open(path, "rb") as handle:
        status = os.fstat(handle.fileno())
        digest = hashlib.sha256(handle.read(EDGE_BYTES))
        if status.st_size > EDGE_BYTES:
            handle.seek(max(EDGE_BYTES, status.st_size - EDGE_BYTES))
            digest.update(handle.read(EDGE_BYTES))
    return f"{status.st_size}:{status.st_mtime_ns}:{digest.hexdigest()}"


def _address_fingerprint(text: str) -> str:
    """``<kind>:<start>:<end>:<what it reads>`` of an address; ``OSError`` if its samples cannot be reached."""
    try:
        address = parse_address(text)
        if address.kind == PIPE:
            rate, samples = read_entry(address.entry, text)
            digest = hashlib.sha256(address.entry.strip().encode())
            digest.update(str(rate).encode() + b"\0" + samples.tobytes())
            content = digest.hexdigest()
        elif address.kind == ARK:
            ark, offset = ark_location(address.entry)
            content = f"{audio_fingerprint(ark)}@{offset}"
        else:
            content = audio_fingerprint(address.entry)
    except SourceError as err:
        raise OSError(str(err)) from None
    return f"{address.kind}:{address.start}:{address.end}:{content}"


def audio_fingerprints(paths: Sequence[str | os.PathLike], num_workers: int = 8, chunk: int = 1024) -> list[str | None]:
    """:func:`audio_fingerprint` of each file, None for one that cannot be opened (the caller names it).

    Runs on ``num_workers`` threads: file reads and SHA-256 release the GIL, and on a cold or
    network file system the reads dominate (about 0.15 ms a file from the page cache).
    """

    def fingerprints(part: Sequence[str | os.PathLike]) -> list[str | None]:
        out: list[str | None] = []
        for path in part:
            try:
                out.append(audio_fingerprint(path))
            except OSError:
                out.append(None)
        return out

    parts = [paths[start : start + chunk] for start in range(0, len(paths), chunk)]
    if num_workers <= 1 or len(parts) <= 1:
        return [fingerprint for part in parts for fingerprint in fingerprints(part)]
    with ThreadPoolExecutor(num_workers) as pool:
        return [fingerprint for part in pool.map(fingerprints, parts) for fingerprint in part]
