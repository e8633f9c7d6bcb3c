"""Audio reading through soundfile, with the checks a corpus needs.

Every failure raises :class:`AudioError` naming the file. Policy (documented in the
README): files must be mono; a sample rate other than the requested one is resampled
on load with ``torchaudio.functional.resample``; empty audio and NaN/inf samples are
refused. Headers are cheap to read, samples are not: :func:`check_finite_samples`
reads only files whose coding can hold NaN/inf (float, or decoded to float).
"""
from __future__ import annotations

import errno
import math
import os
import stat
from dataclasses import dataclass
from typing import Sequence

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
_INTEGER_CODINGS = ("PCM_", "ULAW", "ALAW", "DPCM_", "DWVW_", "ALAC_", "G72", "GSM610", "IMA_ADPCM", "MS_ADPCM",
                    "VOX_ADPCM", "NMS_ADPCM")


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
    info = audio_info(path)
    ratio = info.sample_rate / sample_rate
    first = int(round(start * ratio))
    count = -1 if num_samples is None else int(round(num_samples * ratio))
    try:
        data, _ = soundfile.read(str(path), start=first, frames=count, dtype="float32", always_2d=False)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from err
    if data.size == 0:
        raise AudioError(f"{path}: empty audio segment (start={start}, num_samples={num_samples})")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: audio contains NaN or inf samples")
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
    """Tile ``wav`` until it is ``length`` samples long (or cut it to ``length``)."""
    return wav.repeat(math.ceil(length / len(wav)))[:length]
