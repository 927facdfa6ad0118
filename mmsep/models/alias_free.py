"""Anti-aliased periodic activations of BigVGAN (Snake / SnakeBeta between 2x resampling).

A point-wise non-linearity applied at the signal rate creates harmonics above Nyquist that fold
back as aliasing. BigVGAN therefore upsamples 2x with a Kaiser-windowed sinc low-pass, applies the
activation, low-passes again and decimates 2x. The filters are fixed constants; they are kept as
persistent buffers named ``filter`` because NVIDIA's released generator state dict stores them.

Everything is plain tensor ops (replicate padding, depthwise conv1d / conv_transpose1d) with
static shapes derived from the module configuration, so the modules export to ONNX as-is.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Upstream keeps the reciprocal finite when an activation's magnitude parameter is ~0.
SNAKE_EPS = 1e-9


def kaiser_beta(half_size: int, half_width: float) -> float:
    """Kaiser window beta of the alias-free-torch / julius low-pass design.

    Attenuation estimate A = 2.285 (half_size - 1) pi (4 half_width) + 7.95 dB, then Kaiser's
    empirical beta(A) (the same rule as ``scipy.signal.kaiser_beta``).
    """
    atten = 2.285 * (half_size - 1) * math.pi * (4.0 * half_width) + 7.95
    if atten > 50.0:
        return 0.1102 * (atten - 8.7)
    if atten >= 21.0:
        return 0.5842 * (atten - 21.0) ** 0.4 + 0.07886 * (atten - 21.0)
    return 0.0


def kaiser_sinc_filter1d(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Low-pass FIR taps, shape (1, 1, kernel_size), normalised to unit DC gain.

    ``cutoff`` and ``half_width`` are in cycles per sample (0.5 = Nyquist). Even kernels are
    centred between two taps (times k + 0.5), odd kernels on the middle tap. Computed in float64.
    """
    if not 0.0 < cutoff <= 0.5:
        raise ValueError(f"low-pass cutoff must be in (0, 0.5] cycles/sample, got {cutoff}")
    half_size = kernel_size // 2
    window = np.kaiser(kernel_size, kaiser_beta(half_size, half_width))
    if kernel_size % 2 == 0:
        time = np.arange(-half_size, half_size, dtype=np.float64) + 0.5
    else:
        time = np.arange(kernel_size, dtype=np.float64) - half_size
    taps = 2.0 * cutoff * window * np.sinc(2.0 * cutoff * time)
    taps /= taps.sum()
    return torch.tensor(taps, dtype=torch.float32).view(1, 1, kernel_size)


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, one alpha per channel (stored as log(alpha) if ``logscale``)."""

    def __init__(self, channels: int, logscale: bool = True):
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        if self.logscale:
            alpha = torch.exp(alpha)
        return x + (1.0 / (alpha + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class SnakeBeta(nn.Module):
    """x + sin^2(alpha x) / beta: separate frequency (alpha) and magnitude (beta) per channel."""

    def __init__(self, channels: int, logscale: bool = True):
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init.clone())
        self.beta = nn.Parameter(init.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        beta = self.beta[None, :, None]
        if self.logscale:
            alpha = torch.exp(alpha)
            beta = torch.exp(beta)
        return x + (1.0 / (beta + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class LowPassFilter1d(nn.Module):
    """Depthwise low-pass with replicate padding and optional decimation (``stride``)."""

    def __init__(self, channels: int, cutoff: float, half_width: float, stride: int = 1,
                 kernel_size: int = 12):
        super().__init__()
        self.channels = channels
        self.stride = stride
        # Even kernels have one more tap right of centre than left of it.
        self.pad_left = kernel_size // 2 - int(kernel_size % 2 == 0)
        self.pad_right = kernel_size // 2
        self.register_buffer("filter", kaiser_sinc_filter1d(cutoff, half_width, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        weight = self.filter.expand(self.channels, -1, -1)
        return F.conv1d(x, weight, stride=self.stride, groups=self.channels)


class UpSample1d(nn.Module):
    """Zero-stuffing upsampler with a Kaiser-sinc interpolation filter (output length T * ratio)."""

    def __init__(self, channels: int, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        if kernel_size <= ratio:
            raise ValueError(f"upsampling kernel ({kernel_size}) must be longer than ratio {ratio}")
        self.channels = channels
        self.ratio = ratio
        # Replicate-pad the input by ``pad`` frames, then cut the transposed-conv output back to
        # exactly T * ratio samples aligned with the input.
        self.pad = kernel_size // ratio - 1
        self.crop_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.crop_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_filter1d(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        weight = self.filter.expand(self.channels, -1, -1)
        # Zero-stuffing divides the signal's energy by ``ratio``; the gain restores it.
        x = self.ratio * F.conv_transpose1d(x, weight, stride=self.ratio, groups=self.channels)
        return x[..., self.crop_left:-self.crop_right]


class DownSample1d(nn.Module):
    """Anti-aliasing low-pass followed by decimation by ``ratio``."""

    def __init__(self, channels: int, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.lowpass = LowPassFilter1d(channels, cutoff=0.5 / ratio, half_width=0.6 / ratio,
                                       stride=ratio, kernel_size=kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class Activation1d(nn.Module):
    """Upsample 2x -> periodic activation -> low-pass and decimate 2x (BigVGAN's AMP activation)."""

    def __init__(self, act: Snake | SnakeBeta, channels: int, ratio: int = 2,
                 kernel_size: int = 12):
        super().__init__()
        self.act = act
        self.upsample = UpSample1d(channels, ratio, kernel_size)
        self.downsample = DownSample1d(channels, ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


def make_activation(kind: str, channels: int, logscale: bool) -> Activation1d:
    """An anti-aliased ``"snake"`` or ``"snakebeta"`` activation over ``channels`` channels."""
    if kind == "snake":
        act: Snake | SnakeBeta = Snake(channels, logscale)
    elif kind == "snakebeta":
        act = SnakeBeta(channels, logscale)
    else:
        raise ValueError(f"unknown BigVGAN activation {kind!r}; expected 'snake' or 'snakebeta'")
    return Activation1d(act, channels)
