"""Kaldi-compatible log mel filterbanks that export to ONNX (no FFT operator in the graph).

The numbers are those of Kaldi's ``compute-fbank-feats`` (and ``torchaudio.compliance.kaldi.fbank``)
with ``snip_edges=True``, ``round_to_power_of_two=True``, ``remove_dc_offset=True``, preemphasis
0.97, ``use_power=True``, ``use_energy=False``, low frequency 20 Hz and the Nyquist frequency as the
high one. WeSpeaker feeds them samples scaled to the int16 range with a hamming window, 3D-Speaker
samples in [-1, 1] with Kaldi's default povey window.

Every step is a tensor operation the ONNX exporter knows: frames are cut by a strided convolution
with an identity kernel (exact), and the power spectrum is a product with a DFT matrix of the padded
frame length (the zero padding drops out of the product). The spectrum is computed in float64, from
float64 buffers (``module.float()`` would make them float32): in float32 the weakest bins, 80 dB and
more below a frame's energy, lose a few digits (in torchaudio's FFT as in a matrix product).
"""

from __future__ import annotations

import math

import torch

PREEMPHASIS = 0.97
LOW_FREQ = 20.0
WINDOWS = ("hamming", "hanning", "povey", "rectangular", "blackman")
BLACKMAN_COEFF = 0.42
INT16_SCALE = 32768.0


class KaldiFbank(torch.nn.Module):
    """Waveforms ``[B, T]`` (equal lengths) -> Kaldi log mel filterbanks ``[B, frames, n_mels]``.

    ``frames = 1 + (T - window) // shift`` (Kaldi's ``snip_edges``); a waveform shorter than one window
    is an error. ``dither`` (Gaussian, in the scaled sample unit) is added to every frame in training mode only.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mels: int = 80,
        frame_length: float = 25.0,
        frame_shift: float = 10.0,
        window_type: str = "hamming",
        dither: float = 0.0,
        scale_to_int16: bool = False,
    ) -> None:
        super().__init__()
        if window_type not in WINDOWS:
            raise ValueError(f"window_type must be one of {WINDOWS}, got {window_type!r}")
        # Kaldi's sizes in samples: int() of the products, as compute-fbank-feats truncates them.
        self.window_size = int(sample_rate * frame_length * 0.001)
        self.window_shift = int(sample_rate * frame_shift * 0.001)
        if self.window_size < 2 or self.window_shift < 1:
            raise ValueError(f"frame_length {frame_length} ms / frame_shift {frame_shift} ms give no usable frames")
        self.padded_size = 1 << (self.window_size - 1).bit_length()
        self.sample_rate, self.n_mels = sample_rate, n_mels
        self.dither, self.scale = float(dither), INT16_SCALE if scale_to_int16 else 1.0
        self.register_buffer("frame_kernel", torch.eye(self.window_size)[:, None, :], persistent=False)
        self.register_buffer("window", window_function(window_type, self.window_size), persistent=False)
        self.register_buffer("dft", dft_matrix(self.window_size, self.padded_size), persistent=False)
        mel = mel_matrix(n_mels, self.padded_size, sample_rate, LOW_FREQ, 0.0)
        self.register_buffer("mel", mel, persistent=False)
        self.bins = self.padded_size // 2 + 1
        self.floor = torch.finfo(torch.float32).eps

    def forward(self, wavs: torch.Tensor) -> torch.Tensor:
        """Log mel filterbanks ``[B, frames, n_mels]`` of equal-length waveforms ``[B, T]``."""
        samples = wavs.unsqueeze(1) * self.scale if self.scale != 1.0 else wavs.unsqueeze(1)
        frames = torch.nn.functional.conv1d(samples, self.frame_kernel, stride=self.window_shift).transpose(1, 2)
        if self.training and self.dither > 0:
            frames = frames + self.dither * torch.randn_like(frames)
        frames = frames.to(torch.float64)  # weak bins lie 80 dB and more below the frame's energy
        frames = frames - frames.mean(dim=-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - PREEMPHASIS * previous) * self.window
        spectrum = torch.matmul(frames, self.dft)
        power = spectrum[..., : self.bins].square() + spectrum[..., self.bins :].square()
        energies = torch.matmul(power, self.mel).to(wavs.dtype)
        return torch.log(torch.clamp(energies, min=self.floor))


def window_function(window_type: str, size: int) -> torch.Tensor:
    """Kaldi's symmetric analysis window of ``size`` samples (float64)."""
    phase = 2 * math.pi * torch.arange(size, dtype=torch.float64) / (size - 1)
    if window_type == "hamming":
        return 0.54 - 0.46 * torch.cos(phase)
    if window_type == "hanning":
        return 0.5 - 0.5 * torch.cos(phase)
    if window_type == "povey":
        return (0.5 - 0.5 * torch.cos(phase)) ** 0.85
    if window_type == "rectangular":
        return torch.ones(size, dtype=torch.float64)
    if window_type == "blackman":
        return BLACKMAN_COEFF - 0.5 * torch.cos(phase) + (0.5 - BLACKMAN_COEFF) * torch.cos(2 * phase)
    raise ValueError(f"window_type must be one of {WINDOWS}, got {window_type!r}")


def dft_matrix(size: int, padded_size: int) -> torch.Tensor:
    """``[size, 2 * bins]``: real, then imaginary parts of the DFT of frames zero-padded to ``padded_size``."""
    bins = padded_size // 2 + 1
    phase = (
        2
        * math.pi
        * torch.outer(torch.arange(size, dtype=torch.float64), torch.arange(bins, dtype=torch.float64))
        / padded_size
    )
    return torch.cat([torch.cos(phase), -torch.sin(phase)], dim=1)


def mel_matrix(n_mels: int, padded_size: int, sample_rate: float, low_freq: float, high_freq: float) -> torch.Tensor:
    """Kaldi's triangular mel filters as ``[padded_size // 2 + 1, n_mels]`` (float64; the Nyquist bin gets 0).

    Mel scale ``1127 ln(1 + f / 700)``; filters equally spaced in mel between ``low_freq`` and ``high_freq``
    (``high_freq <= 0`` counts down from the Nyquist frequency), each rising and falling linearly in mel.
    """
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist}, got {low_freq}, {high}")

    def to_mel(freq: torch.Tensor) -> torch.Tensor:
        return 1127.0 * torch.log1p(freq / 700.0)

    low_mel, high_mel = (to_mel(torch.tensor(freq, dtype=torch.float64)) for freq in (low_freq, high))
    step = (high_mel - low_mel) / (n_mels + 1)
    left = low_mel + step * torch.arange(n_mels, dtype=torch.float64)[:, None]
    centre, right = left + step, left + 2 * step
    bin_mels = to_mel(sample_rate / padded_size * torch.arange(padded_size // 2, dtype=torch.float64))[None, :]
    rising, falling = (bin_mels - left) / (centre - left), (right - bin_mels) / (right - centre)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)  # [n_mels, padded_size // 2]
    return torch.cat([weights, torch.zeros(n_mels, 1, dtype=torch.float64)], dim=1).T.contiguous()
