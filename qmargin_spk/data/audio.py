"""Audio reading through soundfile, with the checks a corpus needs.

Every failure raises :class:`AudioError` naming the file. Policy (documented in the
README): files must be mono; a sample rate other than the requested one is resampled
on load with ``torchaudio.functional.resample``; empty audio and NaN/inf samples are
refused. Headers are cheap to read, samples are not: :func:`check_finite_samples`
reads only files whose coding can hold NaN/inf (float, or decoded to float).

Every function here also takes an address (:mod:`qmargin_spk.data.sources.address`): a
``wav.scp`` pipe or ark entry, read with kaldiio, or a segment of a recording. Its samples are
those the same audio gives as a file, so training, scoring and export read every input form alike.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch

from qmargin_spk.data.sources.address import FILE, SourceAddress, SourceError, is_address, parse_address
from qmargin_spk.data.sources.kaldi_entry import read_entry


class AudioError(ValueError):
    """A file that cannot be used as speech audio; the message names the file."""


@dataclass(frozen=True)
class AudioInfo:
    """What the header says about a file."""

    sample_rate: int
    frames: int
    channels: int
    subtype: str = ""

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Read the header of ``path``; raise :class:`AudioError` if it is missing, unreadable, empty or not mono.

    For a pipe or ark address the samples are decoded (there is no header to read).
    """
    if is_address(path):
        address = _parsed(path)
        if address.kind == FILE:
            info = audio_info(address.entry)
            first, last = address.frame_range(info.sample_rate, info.frames)
            return AudioInfo(info.sample_rate, _checked_segment(path, last - first), 1, info.subtype)
        rate, samples = _entry_samples(path, address)
        return AudioInfo(rate, samples.size, 1, "FLOAT")
    problem = _file_problem(path)
    if problem is not None:
        raise AudioError(f"{path}: {problem}")
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from err
    if info.frames <= 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if info.channels != 1:
        raise AudioError(f"{path}: {info.channels} channels, expected mono")
    return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels), str(info.subtype))


def _file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a readable regular file (missing, dangling or looping link, ...), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"dangling symbolic link (to {os.readlink(path)})" if os.path.islink(path) else "no such audio file"
    except OSError as err:
        return "symbolic link loop" if err.errno == errno.ELOOP else f"cannot access ({err.strerror or err})"
    return None if stat.S_ISREG(mode) else "not a regular file"


# Codings that store integers (PCM, companded, ADPCM, lossless): decoded samples are always finite.
_INTEGER_CODINGS = (
    "PCM_",
    "ULAW",
    "ALAW",
    "DPCM_",
    "DWVW_",
    "ALAC_",
    "G72",
    "GSM610",
    "IMA_ADPCM",
    "MS_ADPCM",
    "VOX_ADPCM",
    "NMS_ADPCM",
)


def check_finite_samples(path: str | os.PathLike, info: AudioInfo | None = None, block_frames: int = 1 << 20) -> None:
    """Raise :class:`AudioError` if ``path`` holds NaN or inf samples (as :func:`load_audio` reads them).

    Integer-coded files cannot, so only their header is read; others are read once,
    in blocks of ``block_frames`` (bounded memory).
    """
    info = info or audio_info(path)
    if is_address(path):
        address = _parsed(path)
        if address.kind == FILE:  # pipe and ark samples were checked as they were decoded
            check_finite_samples(address.entry)
        return
    if info.subtype.startswith(_INTEGER_CODINGS):
        return
    try:
        for block in soundfile.blocks(str(path), blocksize=block_frames, dtype="float32", always_2d=False):
            if not np.all(np.isfinite(block)):
                raise AudioError(f"{path}: audio contains NaN or inf samples")
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from err


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    start: int = 0,
    num_samples: int | None = None,
) -> torch.Tensor:
    """Load mono float32 audio ``[T]`` at ``sample_rate``.

    ``start`` and ``num_samples`` select a segment, counted at ``sample_rate``
    (so crops work the same whether or not the file needs resampling).
    """
    if is_address(path):
        return _load_address(path, sample_rate, start, num_samples)
    problem = _file_problem(path)
    if problem is not None:
        raise AudioError(f"{path}: {problem}")
    return _decode(str(path), str(path), sample_rate, start, num_samples)


def load_audio_bytes(
    data: bytes,
    name: str,
    sample_rate: int = 16000,
    start: int = 0,
    num_samples: int | None = None,
) -> torch.Tensor:
    """:func:`load_audio` for a file held in memory (e.g. a tar member); ``name`` identifies it in errors.

    Mono 16-bit PCM WAV, the common case, is sliced straight out of ``data`` (the values
    soundfile gives, ``int16 / 32768``, at a tenth of the cost); other formats go through soundfile.
    """
    layout = _pcm16_wav_layout(data)
    if layout is None:
        return _decode(io.BytesIO(data), name, sample_rate, start, num_samples)
    file_rate, channels, offset, frames = layout
    info = _checked_info(name, file_rate, frames, channels)
    ratio = info.sample_rate / sample_rate
    first = min(int(round(start * ratio)), frames)
    count = frames - first if num_samples is None else min(int(round(num_samples * ratio)), frames - first)
    if count <= 0:
        raise AudioError(f"{name}: empty audio segment (start={start}, num_samples={num_samples})")
    samples = np.frombuffer(data, dtype="<i2", count=count, offset=offset + 2 * first)
    wav = torch.from_numpy(samples.astype(np.float32) / np.float32(32768))
    if info.sample_rate != sample_rate:
        import torchaudio.functional

        wav = torchaudio.functional.resample(wav, info.sample_rate, sample_rate)
    return wav


def _pcm16_wav_layout(data: bytes) -> tuple[int, int, int, int] | None:
    """``(sample rate, channels, data offset, frames)`` of a plain 16-bit PCM WAV, else None.

    Walks the RIFF chunks; a ``data`` chunk cut short (a truncated file) counts the frames present.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    position, fmt = 12, None
    while position + 8 <= len(data):
        chunk, size = data[position : position + 4], struct.unpack_from("<I", data, position + 4)[0]
        body = position + 8
        if chunk == b"fmt " and size >= 16:
            fmt = struct.unpack_from("<HHIIHH", data, body)  # format, channels, rate, byte rate, block, bits
        elif chunk == b"data":
            if fmt is None or fmt[0] != 1 or fmt[5] != 16 or fmt[4] != 2 * fmt[1]:
                return None
            return fmt[2], fmt[1], body, min(size, len(data) - body) // fmt[4]
        position = body + size + (size & 1)
    return None


def _checked_info(name: str, sample_rate: int, frames: int, channels: int) -> AudioInfo:
    """The checks of :func:`audio_info` on a header already read (empty, not mono)."""
    if frames <= 0:
        raise AudioError(f"{name}: empty audio (0 samples)")
    if channels != 1:
        raise AudioError(f"{name}: {channels} channels, expected mono")
    return AudioInfo(int(sample_rate), int(frames), int(channels))


def _decode(
    source: str | io.BytesIO,
    name: str,
    sample_rate: int,
    start: int,
    num_samples: int | None,
    segment: SourceAddress | None = None,
) -> torch.Tensor:
    """Open once, check the header, read the segment of :func:`load_audio` and resample it.

    With ``segment`` (an address of a file), ``start`` and ``num_samples`` count from its start.
    """
    try:
        with soundfile.SoundFile(source) as handle:
            info = _checked_info(name, handle.samplerate, handle.frames, handle.channels)
            ratio = info.sample_rate / sample_rate
            low, high = (0, info.frames) if segment is None else segment.frame_range(info.sample_rate, info.frames)
            first = min(low + int(round(start * ratio)), high)
            handle.seek(first)
            if segment is None:
                count = -1 if num_samples is None else int(round(num_samples * ratio))
            else:
                count = high - first if num_samples is None else min(int(round(num_samples * ratio)), high - first)
            data = handle.read(count, dtype="float32", always_2d=False)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise AudioError(f"{name}: unreadable audio ({err})") from err
    if data.size == 0:
        raise AudioError(f"{name}: empty audio segment (start={start}, num_samples={num_samples})")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{name}: audio contains NaN or inf samples")
    wav = torch.from_numpy(np.ascontiguousarray(data))
    if info.sample_rate != sample_rate:
        import torchaudio.functional

        wav = torchaudio.functional.resample(wav, info.sample_rate, sample_rate)
    return wav


def _parsed(path: str) -> SourceAddress:
    try:
        return parse_address(path)
    except SourceError as err:
        raise AudioError(str(err)) from None


def _entry_samples(name: str, address: SourceAddress) -> tuple[int, np.ndarray]:
    """``(rate, float32 samples)`` of a pipe or ark address, cut to its segment; :class:`AudioError` naming it."""
    try:
        rate, samples = read_entry(address.entry, name)
    except SourceError as err:
        raise AudioError(str(err)) from None
    first, last = address.frame_range(rate, samples.size)
    _checked_segment(name, last - first)
    return rate, samples[first:last]


def _checked_segment(name: str, frames: int) -> int:
    if frames <= 0:
        raise AudioError(f"{name}: empty segment (0 samples between its start and end)")
    return frames


def _load_address(path: str, sample_rate: int, start: int, num_samples: int | None) -> torch.Tensor:
    """:func:`load_audio` of an address: a file's segment through soundfile, pipes and arks through kaldiio."""
    address = _parsed(path)
    if address.kind == FILE:
        problem = _file_problem(address.entry)
        if problem is not None:
            raise AudioError(f"{path}: {problem}")
        return _decode(address.entry, path, sample_rate, start, num_samples, segment=address)
    rate, samples = _entry_samples(path, address)
    ratio = rate / sample_rate
    first = min(int(round(start * ratio)), samples.size)
    count = samples.size - first if num_samples is None else min(int(round(num_samples * ratio)), samples.size - first)
    if count <= 0:
        raise AudioError(f"{path}: empty audio segment (start={start}, num_samples={num_samples})")
    wav = torch.from_numpy(np.ascontiguousarray(samples[first : first + count]))
    if rate != sample_rate:
        import torchaudio.functional

        wav = torchaudio.functional.resample(wav, rate, sample_rate)
    return wav


def audio_file_bytes(path: str | os.PathLike) -> tuple[bytes, str]:
    """``(bytes, extension)`` of the audio ``path`` names, as a file would hold it (for tar shards).

    A plain file's own bytes; an address's samples at their own rate as WAV: 16-bit PCM when
    every sample is a multiple of 1/32768 (the samples come back bit for bit), else 32-bit float.
    """
    if not is_address(path):
        return Path(path).read_bytes(), Path(path).suffix.lower().lstrip(".")
    info = audio_info(path)
    samples = load_audio(path, info.sample_rate).numpy()
    scaled = samples.astype(np.float64) * 32768
    exact = bool(np.all(scaled == np.round(scaled)) and np.all(np.abs(scaled) <= 32767))
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, info.sample_rate, subtype="PCM_16" if exact else "FLOAT", format="WAV")
    return buffer.getvalue(), "wav"


def pad_waveforms(wavs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad 1-D waveforms to ``[B, T_max]``; also returns their lengths relative to ``T_max``."""
    lengths = torch.tensor([wav.numel() for wav in wavs])
    padded = torch.zeros(len(wavs), int(lengths.max()))
    for row, wav in zip(padded, wavs):
        row[: wav.numel()] = wav
    return padded, lengths.float() / lengths.max()


def repeat_pad(wav: torch.Tensor, length: int) -> torch.Tensor:
    """Tile ``wav`` until it is ``length`` samples long (or cut it to ``length``, without a copy)."""
    if len(wav) >= length:
        return wav[:length]
    return wav.repeat(math.ceil(length / len(wav)))[:length]
