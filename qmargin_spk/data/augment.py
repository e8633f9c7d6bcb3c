"""Waveform augmentation of training batches: reverberation, then additive noise.

Noise comes from a folder of wavs. With MUSAN-style subfolders ``noise/``, ``music/``
and ``speech/`` each category gets its usual SNR range (0-15, 5-15, 13-20 dB) and
``speech`` is mixed as babble (the sum of several talkers); a folder without them is
all ``noise``. Without a noise folder, synthetic coloured noise (power ~ f^-beta,
beta in [0, 2]) is added at 5-20 dB so that training still sees noise. Reverberation
convolves with a random RIR from a folder (unit-energy RIR, aligned on its direct
path, output rescaled to the input level); there is none without a folder. A folder
laid out as RIRS_NOISES gives its impulse responses only, never its noises.

In place of the folders, list files (one path per line, written by ``run.sh --stage 0``,
``qmargin_spk.data.augment_lists``) give the noise, music, babble and RIR files. A
multichannel file (RIRS_NOISES' real RIRs and isotropic noises) is used through its
channel 0.

SpeechBrain's AddNoise/AddReverb are not used: they load audio with torchaudio,
which cannot read files in this environment.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional

from qmargin_spk.data.audio import AudioError, audio_info, load_audio, repeat_pad
from qmargin_spk.data.augment_lists import read_lists, rir_files, wavs_under

CATEGORY_SNR_DB = {"noise": (0.0, 15.0), "music": (5.0, 15.0), "speech": (13.0, 20.0)}
SYNTHETIC_SNR_DB = (5.0, 20.0)
BABBLE_TALKERS = (3, 7)


def add_noise_at_snr(clean: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """``clean + g * noise`` with ``g`` chosen so that the power ratio is ``snr_db`` (silent inputs pass through)."""
    noise = noise.to(clean)
    clean_power = clean.pow(2).mean()
    noise_power = noise.pow(2).mean()
    if clean_power == 0 or noise_power == 0:
        return clean
    return clean + noise * torch.sqrt(clean_power / (noise_power * 10.0 ** (snr_db / 10.0)))


def reverberate(clean: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """Convolve with a unit-energy ``rir``, keep the samples aligned with its direct path, restore the input level."""
    rir = rir.to(clean) / rir.norm().clamp_min(1e-12)
    direct = int(rir.abs().argmax())
    wet = torchaudio.functional.fftconvolve(clean, rir)[direct : direct + len(clean)]
    return wet * clean.norm() / wet.norm().clamp_min(1e-12)


def coloured_noise(length: int, slope: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise whose power spectrum falls as f^-slope (0 white, 1 pink, 2 brown)."""
    spectrum = torch.fft.rfft(torch.randn(length, generator=generator))
    spectrum *= torch.arange(len(spectrum)).clamp_min(1.0) ** (-slope / 2.0)
    return torch.fft.irfft(spectrum, n=length)


def _channels(path: str | os.PathLike) -> int:
    """The channel count in the header of ``path``; 1 when it cannot be read (:func:`load_audio` then says why)."""
    try:
        return int(soundfile.info(str(path)).channels)
    except (RuntimeError, soundfile.LibsndfileError):
        return 1


def load_channel_zero(path: str | os.PathLike, sample_rate: int) -> torch.Tensor:
    """All of ``path`` at ``sample_rate``: :func:`load_audio` for a mono file, channel 0 of a multichannel one."""
    if _channels(path) == 1:
        return load_audio(path, sample_rate)
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from err
    if data.size == 0 or not np.all(np.isfinite(data[:, 0])):
        raise AudioError(f"{path}: empty audio or NaN/inf samples in channel 0")
    wav = torch.from_numpy(np.ascontiguousarray(data[:, 0]))
    return wav if rate == sample_rate else torchaudio.functional.resample(wav, rate, sample_rate)


def noise_categories(noise_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """Noise files by category: MUSAN subfolders if any exist, else everything as ``noise``."""
    noise_dir = Path(noise_dir)
    subfolders = [name for name in CATEGORY_SNR_DB if (noise_dir / name).is_dir()]
    found = (
        {name: wavs_under(noise_dir / name) for name in subfolders} if subfolders else {"noise": wavs_under(noise_dir)}
    )
    categories = {name: files for name, files in found.items() if files}
    if not categories:
        raise ValueError(f"{noise_dir}: no noise wavs found")
    return categories


class WaveformAugmenter:
    """Augment a batch ``[B, T]``: each row is reverberated with ``reverb_prob`` and noised with ``noise_prob``.

    Noise comes from ``noise_dir`` or from lists (``lists_dir`` holding ``noise.list``, ``music.list``,
    ``babble.list``, ``rir.list``, or ``noise_list``/``music_list``/``babble_list``/``rir_list`` each);
    impulse responses from ``rir_dir`` or the lists. A folder and lists of the same kind are refused.

    An integer ``seed`` gives the augmenter a private generator (``self.generator``; the settings
    fragments seed it from the run's seed, ``qmargin_spk/utils/seeds.py``, and training checkpoints
    save its state, so a resumed run augments as an uninterrupted one would); ``None`` draws from
    torch's global generator.
    """

    def __init__(
        self,
        noise_dir: str | os.PathLike | None = None,
        rir_dir: str | os.PathLike | None = None,
        noise_prob: float = 0.6,
        reverb_prob: float = 0.2,
        sample_rate: int = 16000,
        seed: int | None = None,
        lists_dir: str | os.PathLike | None = None,
        noise_list: str | os.PathLike | None = None,
        music_list: str | os.PathLike | None = None,
        babble_list: str | os.PathLike | None = None,
        rir_list: str | os.PathLike | None = None,
    ):
        listed = read_lists(lists_dir, noise=noise_list, music=music_list, speech=babble_list, rir=rir_list)
        listed_noise = {name: files for name, files in listed.items() if name in CATEGORY_SNR_DB}
        if noise_dir is not None and listed_noise:
            raise ValueError(f"{noise_dir}: a noise folder and noise lists were both given; give one")
        if rir_dir is not None and "rir" in listed:
            raise ValueError(f"{rir_dir}: an RIR folder and an RIR list were both given; give one")
        self.noise = noise_categories(noise_dir) if noise_dir is not None else listed_noise
        self.rirs = rir_files(rir_dir) if rir_dir is not None else listed.get("rir", [])
        if rir_dir is not None and not self.rirs:
            raise ValueError(f"{rir_dir}: no RIR wavs found")
        self.noise_prob = noise_prob
        self.reverb_prob = reverb_prob
        self.sample_rate = sample_rate
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, wavs: torch.Tensor) -> torch.Tensor:
        out = wavs.clone()
        for row in range(len(out)):
            if self.rirs and self._uniform(0.0, 1.0) < self.reverb_prob:
                rir = self._load(self.rirs[self._index(len(self.rirs))])
                if rir is not None:
                    out[row] = reverberate(out[row], rir)
            if self._uniform(0.0, 1.0) < self.noise_prob:
                out[row] = self._add_noise(out[row])
        return out

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _index(self, size: int) -> int:
        return int(torch.randint(size, (), generator=self.generator))

    def _load(self, path: Path, length: int | None = None) -> torch.Tensor | None:
        """A whole file, or a random ``length``-sample segment of it (repeat-padded); None if unreadable."""
        try:
            if length is None:
                return load_channel_zero(path, self.sample_rate)
            if _channels(path) > 1:  # RIRS_NOISES' isotropic noises: read whole, then cut
                wav = load_channel_zero(path, self.sample_rate)
                start = self._index(len(wav) - length + 1) if len(wav) > length else 0
                return repeat_pad(wav[start : start + length], length)
            available = int(audio_info(path).duration * self.sample_rate)
            start = self._index(available - length + 1) if available > length else 0
            return repeat_pad(
                load_audio(path, self.sample_rate, start=start, num_samples=min(length, available)), length
            )
        except AudioError as err:
            warnings.warn(f"augmentation skipped an unreadable file: {err}", RuntimeWarning)
            return None

    def _add_noise(self, clean: torch.Tensor) -> torch.Tensor:
        if not self.noise:
            noise = coloured_noise(len(clean), self._uniform(0.0, 2.0), self.generator)
            return add_noise_at_snr(clean, noise, self._uniform(*SYNTHETIC_SNR_DB))
        names = sorted(self.noise)
        category = names[self._index(len(names))]
        files = self.noise[category]
        talkers = (
            BABBLE_TALKERS[0] + self._index(BABBLE_TALKERS[1] - BABBLE_TALKERS[0] + 1) if category == "speech" else 1
        )
        segments = [self._load(files[self._index(len(files))], len(clean)) for _ in range(talkers)]
        segments = [s for s in segments if s is not None]
        if not segments:
            return clean
        return add_noise_at_snr(clean, torch.stack(segments).sum(0), self._uniform(*CATEGORY_SNR_DB[category]))
