"""Log-mel front-end of the MMAudio VAEs, written without an STFT operator.

The spectrogram is the one MMAudio's mel converter computes: the waveform is clamped to [-1, 1],
reflect-padded by (n_fft - hop) / 2 on both sides, framed without centring (periodic Hann window,
win = n_fft), turned into a magnitude ``sqrt(re^2 + im^2 + 1e-9)``, projected on librosa's slaney
mel filterbank, clamped at 1e-5 and logged (natural log at 44.1 kHz, log10 at 16 kHz).

Here the STFT is a strided ``conv1d`` with a fixed basis of windowed cosines and sines, so an
exported graph holds only Pad, Conv, elementwise ops and a MatMul.

Frame count: with ``pad = (n_fft - hop) / 2`` and no centring,
``T = (L + 2 * pad - n_fft) // hop + 1 = L // hop`` (for L > pad, which reflect padding needs);
8 s windows give 353280 // 512 = 690 frames at 44.1 kHz and 128000 // 256 = 500 at 16 kHz.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .presets import AUDIO_MODES, AudioMode

MAGNITUDE_EPS = 1e-9  # added to re^2 + im^2 before the square root, as upstream
LOG_FLOOR = 1e-5  # mel energies are clamped here before the log


# Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    log_part = np.log(np.maximum(hz, _SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOG_STEP
    return np.where(hz >= _SLANEY_MIN_LOG_HZ, _SLANEY_MIN_LOG_MEL + log_part,
                    hz / _SLANEY_HZ_PER_MEL)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    log_part = _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_MIN_LOG_MEL))
    return np.where(mel >= _SLANEY_MIN_LOG_MEL, log_part, _SLANEY_HZ_PER_MEL * mel)


def slaney_mel_filterbank(sample_rate: float, n_fft: int, n_mels: int, f_min: float = 0.0,
                          f_max: float | None = None) -> np.ndarray:
    """Triangular mel filters with slaney area normalisation, float32 (n_mels, n_fft // 2 + 1).

    Reproduces ``librosa.filters.mel(sr=..., n_fft=..., n_mels=..., fmin=..., fmax=...)`` with its
    defaults (htk=False, norm="slaney"), including its float32 rounding steps.
    """
    if f_max is None:
        f_max = sample_rate / 2
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    mel_edges = np.linspace(_hz_to_mel_slaney(f_min), _hz_to_mel_slaney(f_max), n_mels + 2)
    hz_edges = _mel_to_hz_slaney(mel_edges)
    widths = np.diff(hz_edges)
    offsets = hz_edges[:, None] - fft_freqs[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    # librosa stores the triangles in float32 and then scales them in place
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    area_norm = 2.0 / (hz_edges[2:] - hz_edges[:-2])
    return (weights * area_norm[:, None]).astype(np.float32)


def dft_basis(n_fft: int, win_length: int | None = None, *,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Windowed real DFT kernels (2 * (n_fft // 2 + 1), 1, n_fft): cosines, then sines.

    The periodic Hann window (torch.hann_window's default) is folded in; a window shorter than
    n_fft is centred as torch.stft does. Built in float64 with exact integer phases.
    """
    win_length = n_fft if win_length is None else win_length
    n = np.arange(win_length, dtype=np.float64)
    window = np.zeros(n_fft, dtype=np.float64)
    left = (n_fft - win_length) // 2
    window[left:left + win_length] = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)
    bins = np.arange(n_fft // 2 + 1)
    phase = (bins[:, None] * np.arange(n_fft)[None, :]) % n_fft  # exact, avoids huge angles
    angle = 2.0 * np.pi * phase / n_fft
    kernels = np.concatenate([np.cos(angle), -np.sin(angle)], axis=0) * window[None, :]
    return torch.from_numpy(kernels).to(dtype).unsqueeze(1)


class MelSpectrogram(nn.Module):
    """Waveform (B, L) in [-1, 1] -> log-mel (B, n_mels, L // hop), as MMAudio's mel converter."""

    def __init__(self, mode: str | AudioMode):
        super().__init__()
        if isinstance(mode, str):
            if mode not in AUDIO_MODES:
                raise ValueError(
                    f"unknown audio mode {mode!r}; expected one of {sorted(AUDIO_MODES)}")
            mode = AUDIO_MODES[mode]
        self.mode = mode
        self.n_fft = mode.n_fft
        self.hop = mode.hop
        self.n_mels = mode.n_mels
        self.pad = (mode.n_fft - mode.hop) // 2
        # upstream picks the log base per sample rate: log10 for the 16 kHz VAE, ln for 44.1 kHz
        self.log_scale = 1.0 / math.log(10.0) if mode.name == "16k" else 1.0
        fb = slaney_mel_filterbank(mode.sample_rate, mode.n_fft, mode.n_mels, 0.0, mode.f_max)
        self.register_buffer("mel_basis", torch.from_numpy(fb), persistent=False)
        self.register_buffer("dft_basis", dft_basis(mode.n_fft), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """Mel frames for a waveform of ``num_samples`` samples: ``num_samples // hop``."""
        if num_samples <= self.pad:
            raise ValueError(f"a {self.mode.name} waveform needs more than {self.pad} samples for "
                             f"reflect padding, got {num_samples}")
        return (num_samples + 2 * self.pad - self.n_fft) // self.hop + 1

    def magnitude(self, waveform: torch.Tensor) -> torch.Tensor:
        """Linear STFT magnitude (B, n_fft // 2 + 1, T) of a (B, L) waveform."""
        if waveform.dim() != 2:
            raise ValueError(
                f"expected a waveform of shape (batch, samples), got {tuple(waveform.shape)}")
        x = waveform.clamp(-1.0, 1.0).unsqueeze(1)
        x = F.pad(x, (self.pad, self.pad), mode="reflect")
        spec = F.conv1d(x, self.dft_basis.to(x.dtype), stride=self.hop)
        re, im = spec.chunk(2, dim=1)
        return torch.sqrt(re * re + im * im + MAGNITUDE_EPS)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        mag = self.magnitude(waveform)
        mel = torch.matmul(self.mel_basis.to(mag.dtype), mag)
        log_mel = torch.log(mel.clamp(min=LOG_FLOOR))
        if self.log_scale != 1.0:
            log_mel = log_mel * self.log_scale
        return log_mel
