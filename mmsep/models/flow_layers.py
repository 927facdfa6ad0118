"""Building blocks of the MMAudio flow network.

Module and parameter names follow the public MMAudio release so that its checkpoints load with
``strict=True``; the code itself is written for export: channel-last convolutions are plain
transposes around ``F.conv1d``, attention is ``F.scaled_dot_product_attention``, rotary tables are
precomputed fp32 buffers and nothing branches on tensor values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# nn.RMSNorm(eps=None) uses the eps of the input dtype; pinning the fp32 value gives identical fp32
# results and keeps half-precision runs on the norm the network was trained with.
RMS_EPS = torch.finfo(torch.float32).eps
ROPE_THETA = 10000.0


def gated_hidden(hidden: int, multiple_of: int = 256) -> int:
    """Hidden width of the SwiGLU MLPs: 2/3 of ``hidden``, rounded up to ``multiple_of``."""
    hidden = int(2 * hidden / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class ChannelLastConv1d(nn.Conv1d):
    """Conv1d on (B, N, C) tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward, ``w2(silu(w1 x) * w3 x)``, without biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = gated_hidden(hidden)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GatedConvMLP(nn.Module):
    """SwiGLU feed-forward with channel-last convolutions in place of the linear layers."""

    def __init__(self, dim: int, hidden: int, kernel_size: int = 3):
        super().__init__()
        hidden = gated_hidden(hidden)
        pad = kernel_size // 2
        self.w1 = ChannelLastConv1d(dim, hidden, kernel_size, padding=pad, bias=False)
        self.w2 = ChannelLastConv1d(hidden, dim, kernel_size, padding=pad, bias=False)
        self.w3 = ChannelLastConv1d(dim, hidden, kernel_size, padding=pad, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def timestep_frequencies(size: int, max_period: float) -> torch.Tensor:
    """Frequencies of the sinusoidal timestep embedding (size // 2 values, fp32)."""
    freqs = 1.0 / (10000 ** (torch.arange(0, size, 2, dtype=torch.float32, device="cpu") / size))
    return (10000 / max_period) * freqs


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> [cos(t f), sin(t f)] -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, frequency_size: int, max_period: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.frequency_size = frequency_size
        self.max_period = max_period
        freqs = timestep_frequencies(frequency_size, max_period).to(self.mlp[0].weight.device)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs.float()[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def rope_table(length: int, head_dim: int, scaling: float = 1.0,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary table (length, head_dim // 2, 2) holding (cos, sin) of position * frequency, fp32."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
    pos = torch.arange(length, dtype=torch.float32, device=device)
    freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                                device=device) / head_dim))
    freqs = freqs * scaling
    angles = pos[:, None] * freqs[None, :]
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (B, H, N, Dh) by the table (N, Dh/2, 2), in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = table[..., 0].float(), table[..., 1].float()
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.flatten(-2).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, N, Dh) x3 -> (B, N, H * Dh)."""
    # strided views take a different SDPA kernel path (last-bit differences from upstream)
    out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """The q/k/v projection with per-head RMS norms (attention itself runs jointly elsewhere)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=RMS_EPS)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=RMS_EPS)

    def project(self, x: torch.Tensor, rope: torch.Tensor | None):
        # the released weights interleave q, k, v innermost: channel = (head, head_dim, qkv)
        qkv = self.qkv(x).unflatten(-1, (self.num_heads, self.head_dim, 3)).transpose(1, 2)
        q, k, v = qkv.unbind(-1)
        q = self.q_norm(q)
        k = self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, rope)
            k = apply_rope(k, rope)
        return q, k, v


class StreamBlock(nn.Module):
    """One token stream of an MM-DiT block with adaLN modulation (upstream ``MMDitSingleBlock``).

    ``kernel_size`` 1 uses linear layers (text stream), otherwise convolutions. A ``pre_only``
    block only contributes keys/values to the last joint attention and has no output path.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 pre_only: bool = False, kernel_size: int = 3):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads)
        if pre_only:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
            return
        if kernel_size == 1:
            self.linear1 = nn.Linear(dim, dim)
            self.ffn = GatedMLP(dim, int(dim * mlp_ratio))
        else:
            self.linear1 = ChannelLastConv1d(dim, dim, kernel_size, padding=kernel_size // 2)
            self.ffn = GatedConvMLP(dim, int(dim * mlp_ratio), kernel_size=kernel_size)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None):
        """c: (B, 1, D) global or (B, N, D) per-token condition -> (q, k, v), post-attn params."""
        mod = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)
        x = modulate(self.norm1(x), mod[0], mod[1])
        return self.attn.project(x, rope), mod[2:]

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, mod) -> torch.Tensor:
        if self.pre_only:
            return x
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + self.linear1(attn_out) * gate_msa
        return x + self.ffn(modulate(self.norm2(x), shift_mlp, scale_mlp)) * gate_mlp

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        qkv, mod = self.pre_attention(x, c, rope)
        return self.post_attention(x, attention(*qkv), mod)


class JointBlock(nn.Module):
    """Joint attention over the latent, CLIP and text streams, each with its own weights."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.latent_block = StreamBlock(dim, num_heads, mlp_ratio, kernel_size=3)
        self.clip_block = StreamBlock(dim, num_heads, mlp_ratio, pre_only=pre_only, kernel_size=3)
        self.text_block = StreamBlock(dim, num_heads, mlp_ratio, pre_only=pre_only, kernel_size=1)

    def forward(self, latent, clip, text, global_c, token_c, latent_rope, clip_rope):
        x_qkv, x_mod = self.latent_block.pre_attention(latent, token_c, latent_rope)
        c_qkv, c_mod = self.clip_block.pre_attention(clip, global_c, clip_rope)
        t_qkv, t_mod = self.text_block.pre_attention(text, global_c, None)
        n_lat, n_clip = latent.shape[1], clip.shape[1]
        joint = [torch.cat([a, b, c], dim=2) for a, b, c in zip(x_qkv, c_qkv, t_qkv)]
        out = attention(*joint)
        latent = self.latent_block.post_attention(latent, out[:, :n_lat], x_mod)
        if not self.pre_only:
            clip = self.clip_block.post_attention(clip, out[:, n_lat:n_lat + n_clip], c_mod)
            text = self.text_block.post_attention(text, out[:, n_lat + n_clip:], t_mod)
        return latent, clip, text


class FinalBlock(nn.Module):
    """adaLN-modulated norm and a kernel-7 convolution to the latent channels."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.conv = ChannelLastConv1d(dim, out_dim, kernel_size=7, padding=3)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.conv(modulate(self.norm(x), shift, scale))
