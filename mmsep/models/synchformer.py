"""Synchformer's visual encoder: a Motionformer ViT-B/16 with divided space-time attention.

MMAudio conditions on the visual branch of Synchformer only. Each 16-frame, 224x224 segment is
cut into 2x16x16 tubelets (8 time steps x 14 x 14 patches); twelve blocks alternate attention
over time (each patch position across the 8 steps) and over space (the 196 patches of one step),
both with the global CLS token as an extra key. After a final LayerNorm, a one-layer pre-norm
transformer with its own CLS token pools the 196 patches of each time step into one vector, so a
segment gives 8 tokens.

Parameter names follow the ``vfeat_extractor.`` part of MMAudio's ``synchformer_state_dict.pth``
(238 tensors at ViT-B size, 122,440,704 values). ``patch_embed.proj`` (a 2-D patch conv) is in
the file and kept here so the state dict round-trips, but it is never used: tokens come from
the 3-D tubelet conv ``patch_embed_3d``. The file also holds the audio branch and the sync
classifier (``afeat_extractor.*`` etc.), which the loader ignores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .io import CheckpointError, check_state_dict, load_checked, read_state_dict
from .presets import (REAL_FEATURES, SYNC_IMAGE_SIZE, SYNC_SEGMENT_FRAMES, SYNC_SEGMENT_STRIDE,
                      SYNC_TOKENS_PER_SEGMENT, TINY_FEATURES)

PATCH = 16
TUBELET = 2  # frames per tubelet (temporal kernel of the patch conv)
GRID = SYNC_IMAGE_SIZE // PATCH  # 14 patches per side
PATCHES = GRID * GRID  # 196 per time step
STEPS = SYNC_SEGMENT_FRAMES // TUBELET  # 8 time steps per segment
STATE_PREFIX = "vfeat_extractor."
LN_EPS = 1e-6

assert STEPS == SYNC_TOKENS_PER_SEGMENT
# segment_frames relies on segments overlapping by exactly half
assert SYNC_SEGMENT_FRAMES == 2 * SYNC_SEGMENT_STRIDE


@dataclass(frozen=True)
class SynchformerConfig:
    width: int
    depth: int
    heads: int
    mlp_ratio: int = 4


REAL_CONFIG = SynchformerConfig(width=REAL_FEATURES.sync, depth=12, heads=12)
TINY_CONFIG = SynchformerConfig(width=TINY_FEATURES.sync, depth=2, heads=4)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


class _Patchify(nn.Module):
    """Holder of a patch convolution, so its parameters sit under ``<name>.proj``."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj


class DividedAttention(nn.Module):
    """Multi-head attention within time or space groups; the CLS token attends to everything.

    Patch tokens are ordered (time step, patch). In ``time`` mode each patch position attends over
    the time steps, in ``space`` mode each time step attends over its patches; in both, the CLS
    key/value is prepended to every group.
    """

    def __init__(self, dim: int, heads: int, mode: str):
        super().__init__()
        if mode not in ("time", "space"):
            raise ValueError(f"mode must be 'time' or 'space', got {mode!r}")
        self.heads = heads
        self.mode = mode
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        h, d = self.heads, dim // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # (3, b, h, n, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        cls_out = _attention(q[:, :, :1], k, v)  # (b, h, 1, d)

        if self.mode == "time":
            groups, length = PATCHES, STEPS
        else:
            groups, length = STEPS, PATCHES

        def group(t: torch.Tensor) -> torch.Tensor:  # (b, h, n-1, d) -> (b, h*groups, length, d)
            t = t.reshape(b, h, STEPS, PATCHES, d)
            if self.mode == "time":
                t = t.transpose(2, 3)
            return t.reshape(b, h * groups, length, d)

        def with_cls(cls: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            cls = cls.unsqueeze(2).expand(b, h, groups, 1, d).reshape(b, h * groups, 1, d)
            return torch.cat([cls, group(t)], dim=2)

        out = _attention(group(q[:, :, 1:]), with_cls(k[:, :, :1], k[:, :, 1:]),
                         with_cls(v[:, :, :1], v[:, :, 1:]))  # (b, h*groups, length, d)
        if self.mode == "time":
            out = out.reshape(b, h, PATCHES, STEPS, d).transpose(2, 3)
        out = out.reshape(b, h, n - 1, d)
        out = torch.cat([cls_out, out], dim=2).transpose(1, 2).reshape(b, n, dim)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DividedSpaceTimeBlock(nn.Module):
    """Pre-norm block: time attention (norm3), then space attention (norm1), then MLP (norm2)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = DividedAttention(dim, heads, "space")
        self.timeattn = DividedAttention(dim, heads, "time")
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.norm3 = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.timeattn(self.norm3(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PackedAttentionWeights(nn.Module):
    """The parameters of ``torch.nn.MultiheadAttention`` (packed q/k/v projection), names kept."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)


class SpatialPooling(nn.Module):
    """Pools the patches of each time step into its CLS token with one pre-norm encoder layer.

    Upstream runs a full ``nn.TransformerEncoderLayer`` (norm_first, GELU) on [CLS, patches] and
    keeps only the CLS row. Only that row's query, residual and MLP are computed here: the same
    result without the work for the discarded rows.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.self_attn = _PackedAttentionWeights(dim)
        self.linear1 = nn.Linear(dim, dim * mlp_ratio)
        self.linear2 = nn.Linear(dim * mlp_ratio, dim)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, D) tokens -> (N, D) pooled."""
        n, length, dim = x.shape
        h, d = self.heads, dim // self.heads
        cls = self.cls_token.expand(n, 1, dim)
        normed = self.norm1(torch.cat([cls, x], dim=1))
        w_q, w_kv = self.self_attn.in_proj_weight.split([dim, 2 * dim])
        b_q, b_kv = self.self_attn.in_proj_bias.split([dim, 2 * dim])
        q = F.linear(normed[:, :1], w_q, b_q).reshape(n, 1, h, d).transpose(1, 2)
        kv = F.linear(normed, w_kv, b_kv).reshape(n, length + 1, 2, h, d).permute(2, 0, 3, 1, 4)
        attn = _attention(q, kv[0], kv[1]).transpose(1, 2).reshape(n, 1, dim)
        y = cls + self.self_attn.out_proj(attn)
        y = y + self.linear2(F.gelu(self.linear1(self.norm2(y))))
        return y[:, 0]


class Synchformer(nn.Module):
    """Segments (S, 16, 3, 224, 224) in [-1, 1] -> features (S, 8, width)."""

    def __init__(self, config: SynchformerConfig = REAL_CONFIG):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"width {config.width} is not divisible by heads {config.heads}")
        self.config = config
        dim = config.width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, PATCHES + 1, dim))
        self.temp_embed = nn.Parameter(torch.zeros(1, STEPS, dim))
        # unused at inference (see the module docstring); kept for state-dict compatibility
        self.patch_embed = _Patchify(nn.Conv2d(3, dim, PATCH, stride=PATCH))
        self.patch_embed_3d = _Patchify(
            nn.Conv3d(3, dim, (TUBELET, PATCH, PATCH), stride=(TUBELET, PATCH, PATCH)))
        self.blocks = nn.ModuleList(
            DividedSpaceTimeBlock(dim, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.spatial_attn_agg = SpatialPooling(dim, config.heads, config.mlp_ratio)

    @property
    def width(self) -> int:
        return self.config.width

    def forward(self, segments: torch.Tensor) -> torch.Tensor:
        expected = (SYNC_SEGMENT_FRAMES, 3, SYNC_IMAGE_SIZE, SYNC_IMAGE_SIZE)
        if segments.dim() != 5 or tuple(segments.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"Synchformer expects segments of shape (S, {shape}), "
                             f"got {tuple(segments.shape)}")
        s, dim = segments.shape[0], self.config.width
        x = self._tubelets(segments)  # (S, 8*196, D), time-major
        # spatial embedding shared by all time steps + one temporal embedding per step
        pos = self.pos_embed[:, 1:].unsqueeze(1) + self.temp_embed.unsqueeze(2)
        x = x + pos.reshape(1, STEPS * PATCHES, dim)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(s, 1, dim)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x[:, 1:])
        x = self.spatial_attn_agg(x.reshape(s * STEPS, PATCHES, dim))
        return x.reshape(s, STEPS, dim)

    def _tubelets(self, segments: torch.Tensor) -> torch.Tensor:
        """The 2x16x16 tubelet conv, run as a 2-D conv over frame pairs stacked as 6 channels.

        Same result as the upstream Conv3d on (S, 3, 16, H, W), without transposing the input.
        """
        s, dim = segments.shape[0], self.config.width
        conv = self.patch_embed_3d.proj
        weight = conv.weight.transpose(1, 2).reshape(dim, TUBELET * 3, PATCH, PATCH)
        pairs = segments.reshape(s * STEPS, TUBELET * 3, SYNC_IMAGE_SIZE, SYNC_IMAGE_SIZE)
        x = F.conv2d(pairs, weight, conv.bias, stride=PATCH)  # (S*8, D, 14, 14)
        return x.reshape(s, STEPS, dim, PATCHES).transpose(2, 3).reshape(s, STEPS * PATCHES, dim)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (B, T, 3, 224, 224) in [-1, 1] -> sync features (B, n_seg * 8, width).

        Segments are flattened segment-major (segment 0's 8 tokens first), as MMAudio does.
        """
        segments = segment_frames(frames)
        b, n_seg = segments.shape[:2]
        features = self(segments.reshape(b * n_seg, *segments.shape[2:]))
        return features.reshape(b, n_seg * STEPS, self.config.width)


def num_segments(frames: int) -> int:
    """Number of 16-frame segments with stride 8 that fit in ``frames`` frames."""
    return (frames - SYNC_SEGMENT_FRAMES) // SYNC_SEGMENT_STRIDE + 1


def segment_frames(frames: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) -> (B, n_seg, 16, ...): segment i holds frames 8i .. 8i+15.

    Frames past the last full segment are dropped (as MMAudio does). Written with slicing,
    reshape and concatenation only (no gather), since consecutive segments overlap by half.
    """
    if frames.dim() < 2 or frames.shape[1] < SYNC_SEGMENT_FRAMES:
        raise ValueError(f"need at least {SYNC_SEGMENT_FRAMES} frames on axis 1, "
                         f"got shape {tuple(frames.shape)}")
    b, t = frames.shape[:2]
    n_seg = num_segments(t)
    rest = frames.shape[2:]
    halves = frames[:, :SYNC_SEGMENT_STRIDE * (n_seg + 1)].reshape(
        b, n_seg + 1, SYNC_SEGMENT_STRIDE, *rest)
    return torch.cat([halves[:, :-1], halves[:, 1:]], dim=2)


def build_synchformer(tiny: bool = False) -> Synchformer:
    """A randomly initialised visual encoder (real ViT-B size, or the tiny test preset)."""
    return Synchformer(TINY_CONFIG if tiny else REAL_CONFIG)


def _visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``vfeat_extractor.`` tensors, prefix removed; a bare visual state dict passes as is."""
    if any(k.startswith(STATE_PREFIX) for k in state):
        return {k[len(STATE_PREFIX):]: v for k, v in state.items() if k.startswith(STATE_PREFIX)}
    return dict(state)


def _detect_tiny(state: dict[str, torch.Tensor], path: str) -> bool:
    pos = state.get("pos_embed")
    if pos is None or pos.dim() != 3:
        raise CheckpointError(f"{path}: no Synchformer visual encoder found (missing "
                              f"{STATE_PREFIX}pos_embed)")
    width = int(pos.shape[-1])
    if width not in (REAL_CONFIG.width, TINY_CONFIG.width):
        raise CheckpointError(f"{path}: unsupported Synchformer width {width}; expected "
                              f"{REAL_CONFIG.width} (real) or {TINY_CONFIG.width} (tiny)")
    return width == TINY_CONFIG.width


def load_synchformer(path: str | os.PathLike, tiny: bool | None = None) -> Synchformer:
    """Load the visual encoder from ``synchformer_state_dict.pth`` (or a bare visual state dict).

    Only ``vfeat_extractor.*`` tensors are used; every one of them must be present with the right
    shape (CheckpointError otherwise). ``tiny=None`` detects the preset from the tensor shapes.
    Returns the module in eval mode.
    """
    path = os.fspath(path)
    state = _visual_state(read_state_dict(path, what="Synchformer checkpoint"))
    if tiny is None:
        tiny = _detect_tiny(state, path)
    with torch.device("meta"):  # skip the random init: every tensor comes from the file
        model = build_synchformer(tiny)
    check_state_dict(model, state, path, what="Synchformer visual encoder")
    model = model.to_empty(device="cpu")
    load_checked(model, state, path, what="Synchformer visual encoder")
    return model.eval()
