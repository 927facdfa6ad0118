"""The MMAudio / MMAudioSep flow network: configuration, presets and the module.

``MMAudioFlow`` has the parameter names and shapes of the public ``MMAudio`` network, so released
checkpoints load with ``strict=True``. The separation variant (MMAudioSep) differs only in the
first convolution of ``audio_input_proj``, which reads the noisy latent and the mixture latent
concatenated on the channel axis, in that order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from operator import attrgetter
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import presets
from .flow_layers import (ChannelLastConv1d, FinalBlock, GatedConvMLP, GatedMLP, JointBlock,
                          StreamBlock, TimestepEmbedder, rope_table, timestep_frequencies)


@dataclass(frozen=True)
class FlowConfig:
    """Architecture and sequence geometry of a flow network."""

    name: str
    mode: str  # "16k" or "44k"
    latent_dim: int
    hidden_dim: int
    depth: int  # joint blocks + fused blocks
    fused_depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    v2: bool = False
    separation: bool = False
    clip_dim: int = presets.REAL_FEATURES.clip
    sync_dim: int = presets.REAL_FEATURES.sync
    text_dim: int = presets.REAL_FEATURES.text
    duration: float = presets.WINDOW_SECONDS

    def __post_init__(self):
        if self.mode not in presets.AUDIO_MODES:
            raise ValueError(f"flow config {self.name!r}: unknown mode {self.mode!r}; "
                             f"expected one of {sorted(presets.AUDIO_MODES)}")
        if self.hidden_dim % self.num_heads or (self.hidden_dim // self.num_heads) % 2:
            raise ValueError(f"flow config {self.name!r}: hidden size {self.hidden_dim} does not "
                             f"split into {self.num_heads} heads of even size")
        if not 0 <= self.fused_depth < self.depth:
            raise ValueError(f"flow config {self.name!r}: need 0 <= fused_depth < depth, got "
                             f"fused_depth={self.fused_depth}, depth={self.depth}")
        presets.sequence_lengths(self.mode, self.duration)  # validates the duration

    @property
    def joint_depth(self) -> int:
        return self.depth - self.fused_depth

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def features(self) -> presets.FeatureDims:
        return presets.FeatureDims(self.clip_dim, self.sync_dim, self.text_dim)

    @property
    def audio_mode(self) -> presets.AudioMode:
        return presets.AUDIO_MODES[self.mode]

    @property
    def sample_rate(self) -> int:
        return self.audio_mode.sample_rate

    @property
    def lengths(self) -> presets.SequenceLengths:
        return presets.sequence_lengths(self.mode, self.duration)

    latent_seq_len = property(attrgetter("lengths.latent"))
    clip_seq_len = property(attrgetter("lengths.clip"))
    sync_seq_len = property(attrgetter("lengths.sync"))
    text_seq_len = property(attrgetter("lengths.text"))
    @property
    def input_channels(self) -> int:
        """Channels read by the first audio convolution (doubled by the mixture latent)."""
        return self.latent_dim * (2 if self.separation else 1)


def _real(name: str, mode: str, heads: int, depth: int, fused: int, v2: bool = False) -> FlowConfig:
    # all released networks use 64-channel heads
    return FlowConfig(name, mode, presets.AUDIO_MODES[mode].latent_dim, 64 * heads, depth, fused,
                      heads, v2=v2)


_TINY = presets.TINY_FEATURES
FLOW_PRESETS: dict[str, FlowConfig] = {
    "small_16k": _real("small_16k", "16k", 7, 12, 8),
    "small_44k": _real("small_44k", "44k", 7, 12, 8),
    "medium_44k": _real("medium_44k", "44k", 14, 12, 8),
    "large_44k": _real("large_44k", "44k", 14, 21, 14),
    "large_44k_v2": _real("large_44k_v2", "44k", 14, 21, 14, v2=True),
    # two joint blocks so the full (non pre-only) joint path is exercised, one fused block
    "tiny": FlowConfig("tiny", "44k", 40, 64, 3, 1, 2, v2=True, clip_dim=_TINY.clip,
                       sync_dim=_TINY.sync, text_dim=_TINY.text),
    # the 16 kHz path at toy width: v1 network like small_16k, BigVGAN v1 companion
    "tiny_16k": FlowConfig("tiny_16k", "16k", 20, 64, 3, 1, 2, clip_dim=_TINY.clip,
                           sync_dim=_TINY.sync, text_dim=_TINY.text),
}


class Conditions(NamedTuple):
    """Step-invariant conditioning; every field has the batch axis first.

    clip: (B, Tc, D) projected CLIP stream; sync: (B, N, D) projected Synchformer features
    upsampled to the latent length (per-token condition); text: (B, 77, D) projected text stream;
    global_c: (B, D) global condition before the timestep embedding is added.
    """

    clip: torch.Tensor
    sync: torch.Tensor
    text: torch.Tensor
    global_c: torch.Tensor


class MMAudioFlow(nn.Module):
    """Velocity network ``v(x, t | clip, sync, text[, mixture])`` on normalised latents."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        c = config
        d = c.hidden_dim
        act = nn.SiLU if c.v2 else nn.SELU
        self.audio_input_proj = nn.Sequential(
            ChannelLastConv1d(c.input_channels, d, kernel_size=7, padding=3),
            act(),
            GatedConvMLP(d, d * 4, kernel_size=7))
        # v1 has no activation after the clip/text linear layers
        clip_act, text_act = ([nn.SiLU()], [nn.SiLU()]) if c.v2 else ([], [])
        self.clip_input_proj = nn.Sequential(
            nn.Linear(c.clip_dim, d), *clip_act, GatedConvMLP(d, d * 4, kernel_size=3))
        self.sync_input_proj = nn.Sequential(
            ChannelLastConv1d(c.sync_dim, d, kernel_size=7, padding=3),
            act(),
            GatedConvMLP(d, d * 4, kernel_size=3))
        self.text_input_proj = nn.Sequential(
            nn.Linear(c.text_dim, d), *text_act, GatedMLP(d, d * 4))

        self.clip_cond_proj = nn.Linear(d, d)
        self.text_cond_proj = nn.Linear(d, d)
        self.global_cond_mlp = GatedMLP(d, d * 4)
        # learned position of a token inside its 8-token Synchformer segment
        self.sync_pos_emb = nn.Parameter(torch.zeros(1, 1, presets.SYNC_TOKENS_PER_SEGMENT,
                                                     c.sync_dim))
        self.final_layer = FinalBlock(d, c.latent_dim)
        if c.v2:
            self.t_embed = TimestepEmbedder(d, frequency_size=d, max_period=1)
        else:
            self.t_embed = TimestepEmbedder(d, frequency_size=256, max_period=10000)
        self.joint_blocks = nn.ModuleList([
            JointBlock(d, c.num_heads, c.mlp_ratio, pre_only=(i == c.joint_depth - 1))
            for i in range(c.joint_depth)])
        self.fused_blocks = nn.ModuleList([
            StreamBlock(d, c.num_heads, c.mlp_ratio, kernel_size=3)
            for _ in range(c.fused_depth)])

        # parameters without gradient, as upstream (they count in its parameter totals)
        nan = torch.full((1, 1, c.latent_dim), float("nan"))
        self.latent_mean = nn.Parameter(nan.clone(), requires_grad=False)
        self.latent_std = nn.Parameter(nan.clone(), requires_grad=False)
        self.empty_string_feat = nn.Parameter(torch.zeros(presets.TEXT_LEN, c.text_dim),
                                              requires_grad=False)
        self.empty_clip_feat = nn.Parameter(torch.zeros(1, c.clip_dim))
        self.empty_sync_feat = nn.Parameter(torch.zeros(1, c.sync_dim))
        self._build_tables()

    # ---- constant tables ---------------------------------------------------------------------

    def _build_tables(self) -> None:
        """Rotary tables, the sync upsampling index and the timestep frequencies.

        Always computed on the CPU in fp32 and then moved, so every device gets the same values.
        """
        c = self.config
        latent = rope_table(c.latent_seq_len, c.head_dim, device="cpu")
        # the CLIP stream is rotated on the latent time axis: frequencies scaled by N / Tc
        clip = rope_table(c.clip_seq_len, c.head_dim, scaling=c.latent_seq_len / c.clip_seq_len,
                          device="cpu")
        index = sync_upsample_index(c.sync_seq_len, c.latent_seq_len)
        device = self.latent_mean.device
        self.register_buffer("latent_rot", latent.to(device), persistent=False)
        self.register_buffer("clip_rot", clip.to(device), persistent=False)
        self.register_buffer("sync_index", index.to(device), persistent=False)
        emb = self.t_embed
        emb.freqs = timestep_frequencies(emb.frequency_size, emb.max_period).to(device)

    def _apply(self, fn, recurse=True):
        # Rebuild the constant tables after every cast/move (also after to_empty, which leaves
        # buffers uninitialised) and keep them in fp32 whatever dtype the weights get: rotary
        # angles and timestep-frequency arguments reach 1e4 and lose whole radians in fp16.
        super()._apply(fn, recurse)
        self._build_tables()
        return self

    def set_duration(self, seconds: float) -> MMAudioFlow:
        """Switch the window length in place (rebuilds the constant tables); returns self.

        Also the way to materialise the tables after ``load_state_dict(..., assign=True)`` into a
        network built on the meta device.
        """
        self.config = dataclasses.replace(self.config, duration=float(seconds))
        self._build_tables()
        return self

    # ---- conditions --------------------------------------------------------------------------

    def empty_conditions(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The learned empty (clip_f, sync_f, text_f) features expanded to ``batch``."""
        c = self.config
        clip = self.empty_clip_feat.unsqueeze(0).expand(batch, c.clip_seq_len, -1)
        sync = self.empty_sync_feat.unsqueeze(0).expand(batch, c.sync_seq_len, -1)
        text = self.empty_string_feat.unsqueeze(0).expand(batch, -1, -1)
        return clip, sync, text

    def prepare_conditions(self, clip_f: torch.Tensor, sync_f: torch.Tensor,
                           text_f: torch.Tensor) -> Conditions:
        """Everything that depends on the query features only (computed once per request)."""
        c = self.config
        _check_features("clip_f", clip_f, c.clip_seq_len, c.clip_dim)
        _check_features("sync_f", sync_f, c.sync_seq_len, c.sync_dim)
        _check_features("text_f", text_f, c.text_seq_len, c.text_dim)
        seg = presets.SYNC_TOKENS_PER_SEGMENT
        sync = sync_f.unflatten(1, (c.sync_seq_len // seg, seg)) + self.sync_pos_emb
        sync = self.sync_input_proj(sync.flatten(1, 2))
        # each Synchformer token covers several latent frames: nearest-exact upsampling as a gather
        sync = sync.index_select(1, self.sync_index)
        clip = self.clip_input_proj(clip_f)
        text = self.text_input_proj(text_f)
        global_c = self.global_cond_mlp(self.clip_cond_proj(clip.mean(dim=1))
                                        + self.text_cond_proj(text.mean(dim=1)))
        return Conditions(clip, sync, text, global_c)

    # ---- velocity ----------------------------------------------------------------------------

    def velocity(self, x: torch.Tensor, t: torch.Tensor, conditions: Conditions,
                 x_mix: torch.Tensor | None = None) -> torch.Tensor:
        """The step-dependent part: x (B, N, C), t (B,) -> velocity (B, N, C)."""
        c = self.config
        _check_features("x", x, c.latent_seq_len, c.latent_dim)
        if c.separation:
            if x_mix is None:
                raise ValueError(f"{c.name}: this separation network needs the mixture latent "
                                 "x_mix (B, N, C); for plain generation encode a white-noise "
                                 "mixture (see mmsep.models.sampler.initial_noise)")
            _check_features("x_mix", x_mix, c.latent_seq_len, c.latent_dim)
            x = torch.cat([x, x_mix], dim=-1)
        elif x_mix is not None:
            raise ValueError(f"{c.name}: x_mix was given but this is a generation network "
                             "(no mixture input); load a separation checkpoint or drop x_mix")
        latent = self.audio_input_proj(x)
        global_c = (self.t_embed(t) + conditions.global_c).unsqueeze(1)  # (B, 1, D)
        token_c = global_c + conditions.sync  # (B, N, D): per-token adaLN for the latent stream
        clip, text = conditions.clip, conditions.text
        for block in self.joint_blocks:
            latent, clip, text = block(latent, clip, text, global_c, token_c,
                                       self.latent_rot, self.clip_rot)
        for block in self.fused_blocks:
            latent = block(latent, token_c, self.latent_rot)
        # upstream conditions the final layer on the global (not per-token) condition
        return self.final_layer(latent, global_c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, clip_f: torch.Tensor,
                sync_f: torch.Tensor, text_f: torch.Tensor,
                x_mix: torch.Tensor | None = None) -> torch.Tensor:
        return self.velocity(x, t, self.prepare_conditions(clip_f, sync_f, text_f), x_mix)

    # ---- latent normalisation ----------------------------------------------------------------

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent (B, N, C) -> the network's normalised latent (not in place)."""
        return (z - self.latent_mean) / self.latent_std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.latent_std + self.latent_mean


def sync_upsample_index(sync_len: int, latent_len: int) -> torch.Tensor:
    """Source token of each latent frame under upstream's nearest-exact upsampling, (latent_len,).

    Taken from F.interpolate on fp32 positions, i.e. floor((i + 0.5) * (sync_len / latent_len)) in
    fp32 arithmetic as upstream evaluates it in fp32/fp16/bf16. Interpolating fp64 features would
    round differently (at 8 s / 44k, latent 57 -> sync 32 instead of 31), so the index is fixed
    here and the network computes the same function in every dtype; it exports as one Gather.
    """
    pos = torch.arange(sync_len, dtype=torch.float32, device="cpu").view(1, 1, -1)
    return F.interpolate(pos, size=latent_len, mode="nearest-exact").view(-1).long()


def _check_features(name: str, x: torch.Tensor, length: int, dim: int) -> None:
    if x.dim() != 3 or x.shape[1] != length or x.shape[2] != dim:
        raise ValueError(f"{name}: expected shape (B, {length}, {dim}), got {tuple(x.shape)}")


def resolve_config(preset: str | FlowConfig) -> FlowConfig:
    if isinstance(preset, FlowConfig):
        return preset
    if preset not in FLOW_PRESETS:
        raise ValueError(f"unknown flow preset {preset!r}; expected one of "
                         f"{', '.join(FLOW_PRESETS)}")
    return FLOW_PRESETS[preset]


def build(preset: str | FlowConfig, separation: bool = True, duration: float = 8.0,
          seed: int | None = None) -> MMAudioFlow:
    """A network of ``preset`` (a name or a FlowConfig) for ``duration``-second windows.

    Without a seed the weights are torch's default initialisation and the latent statistics are
    NaN (as upstream: they come from a checkpoint). With a seed every parameter is randomised
    (none zero) and latent_mean/latent_std get sane random values (std in [0.5, 1.5]).
    """
    config = dataclasses.replace(resolve_config(preset), separation=bool(separation),
                                 duration=float(duration))
    net = MMAudioFlow(config)
    if seed is not None:
        from .randomize import randomize_

        randomize_(net, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in net.parameters():  # a normal draw can still be exactly 0.0 (rare)
                p.masked_fill_(p == 0, 1e-3)
            shape = net.latent_mean.shape
            net.latent_mean.copy_(0.5 * torch.randn(shape, generator=gen))
            net.latent_std.copy_(0.5 + torch.rand(shape, generator=gen))
    return net
