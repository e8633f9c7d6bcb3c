"""Audio reading through soundfile, with the checks a corpus needs.

Every failure raises :class:`AudioError` naming the file. Policy (documented in the
README): files must be mono; a sample rate other than the requested one is resampled
on load with ``torchaudio.functional.resample``; empty audio and NaN/inf samples are
refused. Headers are cheap to read, samples are not: :func:`check_finite_samples`
reads only files whose coding can hold NaN/inf (float, or decoded to float).
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

import numpy as np
import soundfile
import torch


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
    """Read the header of ``path``; raise :class:`AudioError` if it is missing, unreadable, empty or not mono."""
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


def _decode(source: str | io.BytesIO, name: str, sample_rate: int, start: int, num_samples: int | None) -> torch.Tensor:
    """Open once, check the header, read the segment of :func:`load_audio` and resample it."""
    try:
        with soundfile.SoundFile(source) as handle:
            info = _checked_info(name, handle.samplerate, handle.frames, handle.channels)
            ratio = info.sample_rate / sample_rate
            first = min(int(round(start * ratio)), info.frames)
            handle.seek(first)
            count = -1 if num_samples is None else int(round(num_samples * ratio))
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
