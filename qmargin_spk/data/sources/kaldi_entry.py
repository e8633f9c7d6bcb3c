"""Samples of a ``wav.scp`` pipe or ark entry, read with kaldiio, as float32 mono (what soundfile gives).

kaldiio's output depends on the audio: ``int16`` for 16-bit WAV (``/ 32768`` equals soundfile's
float samples), ``uint8`` for 8-bit WAV (unsigned, ``(x - 128) / 128``), float64 in [-1, 1] for
FLAC. It cannot read 24-bit or float WAV, nor OGG; a failing command or a bad ark offset comes
back as a bare ``AssertionError``. Each of these ends here in a :class:`SourceError` of one line
naming the entry, so the same audio gives the same samples whether it is a file, a pipe or an ark.
"""

from __future__ import annotations

import numpy as np

from qmargin_spk.data.sources.address import ARK, PIPE, SourceError, ark_location, entry_kind

_UNSUPPORTED_WAV = "bytes_per_sample"  # kaldiio's ValueError for sample widths other than 8 and 16 bits


def _what_failed(entry: str) -> str:
    if entry_kind(entry) == PIPE:
        return f"the command failed or wrote no audio ({entry.strip()})"
    ark, offset = ark_location(entry)
    return f"no audio object at offset {offset} of {ark}"


def read_entry(entry: str, name: str) -> tuple[int, np.ndarray]:
    """``(sample rate, float32 samples [T])`` of a pipe or ark ``entry``; :class:`SourceError` naming ``name``."""
    import kaldiio

    if entry_kind(entry) not in (PIPE, ARK):
        raise SourceError(f"{name}: {entry} is neither a command ending in '|' nor file.ark:offset")
    try:
        loaded = kaldiio.load_mat(entry.strip())
    except AssertionError:
        raise SourceError(f"{name}: {_what_failed(entry)}") from None
    except FileNotFoundError:
        raise SourceError(f"{name}: ark file {ark_location(entry)[0]} not found") from None
    except UnicodeDecodeError:
        if entry_kind(entry) == ARK:
            raise SourceError(f"{name}: {_what_failed(entry)} (neither WAV, FLAC nor a Kaldi object there)") from None
        raise SourceError(
            f"{name}: the entry gives neither WAV, FLAC nor a Kaldi object (OGG or another format? "
            "decode it to 16-bit WAV or FLAC in the command)"
        ) from None
    except ValueError as err:
        if _UNSUPPORTED_WAV in str(err):
            raise SourceError(
                f"{name}: 24-bit or float WAV, which kaldiio does not read (write 16-bit PCM WAV or FLAC)"
            ) from None
        raise SourceError(f"{name}: unreadable entry ({err})") from None
    except Exception as err:  # noqa: BLE001 - kaldiio raises whatever its parsers meet; one line, never a traceback
        raise SourceError(f"{name}: unreadable entry ({type(err).__name__}: {err})") from None
    return _as_float_samples(loaded, name)


def _as_float_samples(loaded: object, name: str) -> tuple[int, np.ndarray]:
    """kaldiio's ``(rate, array)`` -> float32 mono samples scaled like soundfile's."""
    if not (isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[1], np.ndarray)):
        raise SourceError(f"{name}: the entry holds a matrix or vector, not audio")
    rate, samples = int(loaded[0]), loaded[1]
    if samples.ndim == 2 and samples.shape[1] == 1:
        samples = samples[:, 0]
    if samples.ndim != 1:
        raise SourceError(f"{name}: {samples.shape[1]} channels, expected mono")
    if samples.size == 0:
        raise SourceError(f"{name}: empty audio (0 samples; a streamed WAV header with no data?)")
    if samples.dtype == np.int16:
        out = samples.astype(np.float32) / np.float32(32768)
    elif samples.dtype == np.uint8:
        out = (samples.astype(np.float32) - np.float32(128)) / np.float32(128)
    elif samples.dtype.kind == "f":
        out = samples.astype(np.float32)
    else:
        raise SourceError(f"{name}: samples of type {samples.dtype}, expected 8/16-bit WAV or FLAC")
    if not np.all(np.isfinite(out)):
        raise SourceError(f"{name}: audio contains NaN or inf samples")
    return rate, out
