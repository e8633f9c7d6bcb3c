"""Synthetic speech by source-filter synthesis: speaker voices, recording channels and utterances.

A Rosenberg glottal pulse train (with aspiration noise) and white frication noise are shaped,
frame by frame in the STFT domain, by formant resonances. A speaker is a stable voice: mean
pitch and pitch range, vocal-tract length (formant scaling) and a per-vowel accent, formant
bandwidths, speaking rate, glottal open quotient, breathiness and a spectral colouring. An
utterance is a random sequence of vowels, fricatives and pauses with a pitch contour; each
"video" adds its own recording channel (EQ, band limit, gain, noise colour) and each utterance
additive noise at a random SNR, so that crops of one speaker are similar but not identical.
Everything is drawn from the generator it is given; the corpus layout is ``synthetic.py``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 128
FREQS = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
WINDOW = np.hanning(N_FFT + 1)[:-1]  # periodic Hann

# F1-F3 (Hz) of nine vowels for a reference adult voice; F4/F5 are added per speaker.
VOWEL_FORMANTS = np.array(
    [
        [270, 2290, 3010],
        [400, 2000, 2550],
        [530, 1840, 2480],
        [730, 1090, 2440],
        [570, 840, 2410],
        [300, 870, 2240],
        [440, 1020, 2240],
        [640, 1190, 2390],
        [500, 1500, 2500],
    ],
    dtype=np.float64,
)
# Centre and width (Hz) of the noise band of four fricative places of articulation.
FRICATIVE_BANDS = np.array([[5800, 1200], [3300, 900], [4500, 2500], [1900, 700]], dtype=np.float64)
SEGMENT_KINDS = ("vowel", "fricative", "pause")
SEGMENT_PROBS = (0.6, 0.25, 0.15)
SEGMENT_SECONDS = {"vowel": (0.07, 0.22), "fricative": (0.05, 0.14), "pause": (0.04, 0.25)}  # at speaking rate 1


@dataclass(frozen=True)
class Voice:
    """What stays the same across all utterances of one synthetic speaker."""

    f0_mean: float  # Hz
    f0_range: float  # semitones of accent movement
    tract_scale: float  # formant scaling: > 1 is a shorter vocal tract
    vowel_shift: np.ndarray  # [vowels, 3] multiplicative per-vowel formant offsets (accent)
    high_formants: np.ndarray  # [2] F4, F5 in Hz before scaling
    bandwidth_scale: float
    rate: float  # speaking-rate factor, > 1 is faster
    open_quotient: float  # glottal open phase share; larger is a softer, darker voice
    breathiness: float  # aspiration noise relative to voicing
    fricative_shift: float  # scales fricative noise bands
    colour_db: np.ndarray  # [bins] spectral colouring of the voice, dB


@dataclass(frozen=True)
class Channel:
    """One recording session ("video"): microphone EQ, band limit, gain, background noise colour."""

    eq_db: np.ndarray  # [bins]
    noise_slope: float  # background noise power ~ f^-slope
    snr_range: tuple[float, float]
    peak_dbfs: float


def _smooth_curve_db(rng: np.random.Generator, max_db: float, terms: int) -> np.ndarray:
    """A random smooth spectral curve over log frequency, within about +-max_db."""
    position = np.log1p(FREQS / 100.0) / np.log1p(FREQS[-1] / 100.0)
    weights = rng.uniform(-1.0, 1.0, terms) / np.sqrt(terms)
    phases = rng.uniform(0.0, 2 * np.pi, terms)
    orders = np.arange(1, terms + 1)
    return max_db * np.cos(np.pi * orders[:, None] * position[None, :] + phases[:, None]).T @ weights


def random_voice(rng: np.random.Generator) -> Voice:
    """Draw one speaker's voice; female-like and male-like voices are equally likely."""
    higher = rng.random() < 0.5
    return Voice(
        f0_mean=rng.uniform(165, 255) if higher else rng.uniform(85, 150),
        f0_range=rng.uniform(1.0, 5.0),
        tract_scale=rng.uniform(1.05, 1.25) if higher else rng.uniform(0.85, 1.05),
        vowel_shift=np.exp(rng.normal(0.0, 0.06, (len(VOWEL_FORMANTS), 3))),
        high_formants=np.array([rng.uniform(3200, 3700), rng.uniform(4200, 4800)]),
        bandwidth_scale=rng.uniform(0.7, 1.6),
        rate=rng.uniform(0.8, 1.25),
        open_quotient=rng.uniform(0.4, 0.75),
        breathiness=rng.uniform(0.0, 0.4),
        fricative_shift=rng.uniform(0.85, 1.15),
        colour_db=_smooth_curve_db(rng, 4.0, 4),
    )


def random_channel(rng: np.random.Generator) -> Channel:
    """Draw one video's recording channel."""
    cutoff = rng.uniform(3500, 8000)
    band_limit_db = -30.0 / (1.0 + np.exp(-(FREQS - cutoff) / 150.0))
    return Channel(
        eq_db=_smooth_curve_db(rng, 6.0, 5) + band_limit_db,
        noise_slope=rng.uniform(0.0, 2.0),
        snr_range=(float(rng.uniform(3, 12)), float(rng.uniform(15, 30))),
        peak_dbfs=float(rng.uniform(-12, -1)),
    )


def _moving_average(values: np.ndarray, width: int) -> np.ndarray:
    """Smooth along axis 0 with a centred box filter of ``width`` frames (edges held)."""
    if width <= 1:
        return values
    padded = np.concatenate(
        [np.repeat(values[:1], width // 2, 0), values, np.repeat(values[-1:], width - 1 - width // 2, 0)]
    )
    kernel = np.ones(width) / width
    if values.ndim == 1:
        return np.convolve(padded, kernel, mode="valid")
    return np.stack([np.convolve(padded[:, k], kernel, mode="valid") for k in range(values.shape[1])], axis=1)


@dataclass
class UtterancePlan:
    """Frame-rate controls of one utterance (one row per STFT frame)."""

    f0: np.ndarray  # [F] Hz
    formants: np.ndarray  # [F, 5] Hz
    bandwidths: np.ndarray  # [F, 5] Hz
    voicing: np.ndarray  # [F] amplitude
    frication: np.ndarray  # [F] amplitude
    fricative_band: np.ndarray  # [F, 2] centre, width Hz


def plan_utterance(rng: np.random.Generator, voice: Voice, num_frames: int) -> UtterancePlan:
    """Draw the content of one utterance: segments, formant targets and pitch contour."""
    frame_seconds = HOP / SAMPLE_RATE
    vowel = np.zeros(num_frames, dtype=int)
    voicing = np.zeros(num_frames)
    frication = np.zeros(num_frames)
    band = np.zeros((num_frames, 2))
    accent = np.zeros(num_frames)
    frame = int(rng.integers(3, 15))
    last_vowel = int(rng.integers(len(VOWEL_FORMANTS)))
    while frame < num_frames:
        kind = SEGMENT_KINDS[rng.choice(len(SEGMENT_KINDS), p=SEGMENT_PROBS)]
        end = min(num_frames, frame + max(2, int(rng.uniform(*SEGMENT_SECONDS[kind]) / voice.rate / frame_seconds)))
        if kind == "vowel":
            last_vowel = int(rng.integers(len(VOWEL_FORMANTS)))
            voicing[frame:end] = rng.uniform(0.6, 1.0)
            accent[frame:end] = rng.uniform(-0.5, 0.5) * voice.f0_range
        elif kind == "fricative":
            frication[frame:end] = rng.uniform(0.05, 0.3)
            band[frame:end] = FRICATIVE_BANDS[rng.integers(len(FRICATIVE_BANDS))] * voice.fricative_shift
        vowel[frame:end] = last_vowel
        frame = end
    band[band[:, 0] == 0] = FRICATIVE_BANDS[0]  # any band where frication is silent, to avoid zero widths

    tract = voice.tract_scale * np.exp(rng.normal(0.0, 0.02))
    low = VOWEL_FORMANTS[vowel] * voice.vowel_shift[vowel]
    high = np.broadcast_to(voice.high_formants, (num_frames, 2))
    formants = _moving_average(np.concatenate([low, high], axis=1) * tract, 5)
    bandwidths = np.array([80.0, 100.0, 140.0, 200.0, 260.0]) * voice.bandwidth_scale

    declination = np.linspace(1.0, -1.0, num_frames) * rng.uniform(0.5, 2.0)
    semitones = _moving_average(accent, 9) + declination + rng.normal(0.0, 0.1, num_frames)
    f0 = voice.f0_mean * np.exp(rng.normal(0.0, 0.06)) * 2.0 ** (semitones / 12.0)
    return UtterancePlan(
        f0=f0,
        formants=formants,
        bandwidths=np.broadcast_to(bandwidths, formants.shape),
        voicing=_moving_average(voicing, 3),
        frication=_moving_average(frication, 3),
        fricative_band=band,
    )


def _stft(signal: np.ndarray) -> np.ndarray:
    """Centred Hann STFT ``[frames, bins]`` with ``1 + len // HOP`` frames."""
    padded = np.pad(signal, (N_FFT // 2, N_FFT // 2 + HOP))
    num_frames = 1 + len(signal) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:num_frames]
    return np.fft.rfft(frames * WINDOW, axis=1)


def _overlap_add(frames: np.ndarray) -> np.ndarray:
    """Sum ``[frames, N_FFT]`` blocks placed HOP apart (N_FFT is a multiple of HOP)."""
    blocks = frames.reshape(len(frames), N_FFT // HOP, HOP)
    total = np.zeros((len(frames) + N_FFT // HOP - 1, HOP))
    for k in range(N_FFT // HOP):
        total[k : k + len(frames)] += blocks[:, k]
    return total.ravel()


def _istft(spectrum: np.ndarray, length: int) -> np.ndarray:
    """Weighted overlap-add inverse of :func:`_stft`, trimmed to ``length`` samples."""
    signal = _overlap_add(np.fft.irfft(spectrum, n=N_FFT, axis=1) * WINDOW)
    norm = _overlap_add(np.broadcast_to(WINDOW**2, (len(spectrum), N_FFT)))
    return (signal / np.maximum(norm, 1e-3))[N_FFT // 2 : N_FFT // 2 + length]


def _glottal_source(rng: np.random.Generator, voice: Voice, f0_frames: np.ndarray, length: int) -> np.ndarray:
    """Differentiated Rosenberg pulses following the f0 contour, plus pulse-synchronous aspiration."""
    f0 = np.interp(np.arange(length), np.arange(len(f0_frames)) * HOP, f0_frames)
    phase = (rng.random() + np.cumsum(f0 / SAMPLE_RATE)) % 1.0
    opening = 0.6 * voice.open_quotient
    closing = voice.open_quotient - opening
    pulse = np.where(
        phase < opening,
        0.5 * (1.0 - np.cos(np.pi * phase / opening)),
        np.where(phase < voice.open_quotient, np.cos(0.5 * np.pi * (phase - opening) / closing), 0.0),
    )
    flow_derivative = np.diff(pulse, prepend=0.0)
    aspiration = voice.breathiness * 0.1 * rng.standard_normal(length) * (0.3 + pulse)
    return flow_derivative + aspiration


def _formant_envelope(formants: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Magnitude response ``[frames, bins]`` of cascaded second-order resonators (unit gain at DC)."""
    f2 = FREQS**2
    envelope = np.ones((len(formants), len(FREQS)))
    for k in range(formants.shape[1]):
        centre2 = formants[:, k : k + 1] ** 2
        envelope *= centre2 / np.sqrt((centre2 - f2) ** 2 + f2 * bandwidths[:, k : k + 1] ** 2)
    return envelope


def _coloured_noise(rng: np.random.Generator, slope: float, length: int) -> np.ndarray:
    """Gaussian noise with power spectrum ~ f^-slope, unit variance."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    freqs = np.fft.rfftfreq(length, 1.0 / SAMPLE_RATE)
    spectrum *= np.maximum(freqs, 20.0) ** (-slope / 2.0)
    noise = np.fft.irfft(spectrum, n=length)
    return noise / (noise.std() + 1e-12)


def _unit_rms(spectrum: np.ndarray) -> np.ndarray:
    """Scale a spectrogram to unit mean power, so that source levels are set by the plan alone."""
    return spectrum / np.sqrt(np.mean(np.abs(spectrum) ** 2) + 1e-20)


def synthesize_utterance(rng: np.random.Generator, voice: Voice, channel: Channel, duration: float) -> np.ndarray:
    """One utterance of ``voice`` recorded through ``channel``: float samples in [-1, 1]."""
    length = int(round(duration * SAMPLE_RATE))
    num_frames = 1 + length // HOP
    plan = plan_utterance(rng, voice, num_frames)

    colour = 10.0 ** (voice.colour_db / 20.0)
    voiced = _stft(_glottal_source(rng, voice, plan.f0, length))[:num_frames]
    voiced *= _formant_envelope(plan.formants, plan.bandwidths)
    hiss = _stft(rng.standard_normal(length))[:num_frames]
    centre, width = plan.fricative_band[:, :1], plan.fricative_band[:, 1:]
    hiss *= np.exp(-0.5 * ((FREQS[None, :] - centre) / width) ** 2)
    speech_spectrum = _unit_rms(voiced) * plan.voicing[:, None] + _unit_rms(hiss) * plan.frication[:, None]
    speech = _istft(speech_spectrum * colour, length)

    snr_db = rng.uniform(*channel.snr_range)
    noise = _coloured_noise(rng, channel.noise_slope, length)
    speech_power = np.mean(speech**2) + 1e-12
    mixture = speech + noise * np.sqrt(speech_power / 10.0 ** (snr_db / 10.0))
    recorded = _istft(_stft(mixture)[:num_frames] * 10.0 ** (channel.eq_db / 20.0), length)
    return recorded * (10.0 ** (channel.peak_dbfs / 20.0) / (np.abs(recorded).max() + 1e-12))
