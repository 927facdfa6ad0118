"""Building blocks of the MMAudio mel VAE with every magnitude-preserving gain folded away.

Upstream builds the VAE from EDM2 magnitude-preserving layers: each convolution's weight is
normalised per output channel (once, by ``remove_weight_norm`` before inference), SiLU is divided
by 0.596, residual sums are ``lerp(skip, branch, 0.3) / sqrt(0.7^2 + 0.3^2)`` and the last
convolution is scaled by ``learnable_gain + 1``. All of these are constants at inference, so
here they are multiplied into plain ``Conv1d`` weights when a checkpoint is loaded (see
``FoldedConv1d``), and the runtime graph only holds convolutions, SiLU, clamps, a pixel norm and
one attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-4  # EDM2 normalize() epsilon, used for weights and activations alike
SILU_GAIN = 1.0 / 0.596  # magnitude-preserving SiLU
_SUM_T = 0.3  # blend of the residual branch in every magnitude-preserving sum
_SUM_NORM = math.sqrt((1 - _SUM_T) ** 2 + _SUM_T ** 2)
SKIP_GAIN = (1 - _SUM_T) / _SUM_NORM
BRANCH_GAIN = _SUM_T / _SUM_NORM
CLIP_ACT = 256.0  # activations are clamped to +-CLIP_ACT between blocks


def edm2_normalize_weight(raw: torch.Tensor) -> torch.Tensor:
    """Upstream ``MPConv1D.remove_weight_norm`` in float32: unit-magnitude rows over sqrt(fan_in).

    ``w / (eps + |w_o| / sqrt(fan_in)) / sqrt(fan_in)`` for every output channel ``o``.
    """
    w = raw.to(torch.float32)
    fan_in = w[0].numel()
    norm = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)
    w = w / (NORM_EPS + norm / math.sqrt(fan_in))
    return w / math.sqrt(fan_in)


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    """Scale every position to unit RMS over channels (dim 1); the norm is taken in float32."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
    norm = NORM_EPS + norm / math.sqrt(x.shape[1])
    return x / norm.to(x.dtype)


class FoldedConv1d(nn.Conv1d):
    """Bias-free 'same' Conv1d whose weight holds an upstream MPConv1D weight, folded.

    ``fixed_gain`` is the product of the constant gains around this convolution (the 1/0.596 of
    the SiLU feeding it, the residual-sum coefficient of its output); it is folded into the weight
    together with EDM2's weight normalisation by ``fold``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 fixed_gain: float = 1.0):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                         bias=False)
        self.fixed_gain = fixed_gain

    def fold(self, raw: torch.Tensor, gain: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Runtime weight for a raw upstream weight and an optional extra gain."""
        return edm2_normalize_weight(raw) * (torch.as_tensor(gain, dtype=torch.float32)
                                             * self.fixed_gain)


class ResnetBlock(nn.Module):
    """Pixel norm -> SiLU -> conv -> SiLU -> conv, plus a (1x1-projected) skip."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv1 = FoldedConv1d(in_dim, out_dim, 3, fixed_gain=SILU_GAIN)
        self.conv2 = FoldedConv1d(out_dim, out_dim, 3, fixed_gain=SILU_GAIN * BRANCH_GAIN)
        if in_dim != out_dim:
            self.nin_shortcut = FoldedConv1d(in_dim, out_dim, 1, fixed_gain=SKIP_GAIN)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pixel_norm(x)
        h = self.conv1(F.silu(x))
        h = self.conv2(F.silu(h))
        skip = x * SKIP_GAIN if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over time with per-position normalised q, k, v."""

    def __init__(self, channels: int):
        super().__init__()
        self.qkv = FoldedConv1d(channels, 3 * channels, 1)
        self.proj_out = FoldedConv1d(channels, channels, 1, fixed_gain=BRANCH_GAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, length = x.shape
        # upstream's qkv rows are interleaved: row 3 * i + j is channel i of q (j=0), k (1), v (2)
        y = pixel_norm(self.qkv(x).reshape(b, c, 3, length))
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in y.unbind(2))  # (B, 1, L, C)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2)
        return x * SKIP_GAIN + self.proj_out(h)


class Downsample(nn.Module):
    """1x1 conv -> average pool by 2 -> 1x1 conv (T -> T // 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = FoldedConv1d(channels, channels, 1)
        self.conv2 = FoldedConv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.avg_pool1d(self.conv1(x), kernel_size=2, stride=2))


class Upsample(nn.Module):
    """Repeat every frame twice (= upstream's nearest-exact x2) -> conv (T -> 2T)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = FoldedConv1d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # expand + reshape instead of interpolate: exports without a Resize/GatherND op
        x = x.unsqueeze(-1).expand(-1, -1, -1, 2).flatten(-2)
        return self.conv(x)
