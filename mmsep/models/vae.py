"""The MMAudio mel VAEs (ext_weights/v1-16.pth, v1-44.pth) as plain convolutional modules.

Upstream files hold the bare VAE state dict (no prefix, no vocoder): ``data_mean``/``data_std``
of shape (1, n_mels, 1), ``encoder.*`` / ``decoder.*`` convolution weights without biases, and one
scalar ``learnable_gain`` per half. ``load_vae`` folds EDM2's weight normalisation, the learnable
gains and the fixed magnitude-preserving gains into the weights (``vae_layers``), keeping the
upstream key names; the mel statistics stay buffers applied inside ``encode_mean``/``decode``, so
callers pass and receive raw log-mel. A module's own ``state_dict()`` is the folded form: it has no
``learnable_gain`` entries, which is how ``load_vae`` tells the two apart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .io import CheckpointError, load_checked, read_state_dict
from .presets import AUDIO_MODES
from .vae_layers import (CLIP_ACT, SILU_GAIN, AttnBlock, Downsample, FoldedConv1d, ResnetBlock,
                         Upsample)

# Per-mel-bin statistics of the training data, used by upstream to normalise the VAE input
# (n_mels -> mean, std). They are also stored in the checkpoints (data_mean / data_std); these are
# the initial values.
_DATA_STATS_FILE = Path(__file__).with_name("data") / "mel_statistics.json"


def _data_stats(n_mels: int) -> tuple[list[float], list[float]]:
    stats = json.loads(_DATA_STATS_FILE.read_text(encoding="utf-8"))[str(n_mels)]
    return stats["mean"], stats["std"]


REAL_HIDDEN = {"16k": 384, "44k": 512}
TINY_HIDDEN = 16
CH_MULT = (1, 2, 4)  # channel multiplier per level
NUM_RES_BLOCKS = 2
DOWN_LEVELS = (0,)  # encoder levels followed by a 2x downsampling (decoder mirrors them)
UPSTREAM_GAIN_KEYS = ("encoder.learnable_gain", "decoder.learnable_gain")
# upstream's DiagonalGaussianDistribution clamps the log-variance to this range before exp
LOGVAR_RANGE = (-30.0, 20.0)
_WHAT = "MMAudio VAE"


@dataclass(frozen=True)
class VAEConfig:
    mode: str  # "16k" or "44k"
    hidden_dim: int  # width of the first level; levels are hidden_dim * CH_MULT

    @property
    def n_mels(self) -> int:
        return AUDIO_MODES[self.mode].n_mels

    @property
    def latent_dim(self) -> int:
        return AUDIO_MODES[self.mode].latent_dim


class Encoder(nn.Module):
    """Normalised mel (B, M, T) -> posterior moments (B, 2 * C, T // 2): mean, then log-variance."""

    def __init__(self, in_dim: int, hidden_dim: int, latent_dim: int):
        super().__init__()
        self.conv_in = FoldedConv1d(in_dim, hidden_dim, 3)
        self.down = nn.ModuleList()
        width = hidden_dim
        for level, mult in enumerate(CH_MULT):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(NUM_RES_BLOCKS):
                stage.block.append(ResnetBlock(width, hidden_dim * mult))
                width = hidden_dim * mult
            if level in DOWN_LEVELS:
                stage.downsample = Downsample(width)
            self.down.append(stage)
        self.mid = _middle(width)
        self.conv_out = FoldedConv1d(width, 2 * latent_dim, 3, fixed_gain=SILU_GAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for block in stage.block:
                h = block(h).clamp(-CLIP_ACT, CLIP_ACT)
            if level in DOWN_LEVELS:
                h = stage.downsample(h)
        h = _run_middle(self.mid, h)
        return self.conv_out(F.silu(h))


class Decoder(nn.Module):
    """Latent (B, C, N) -> normalised mel (B, M, 2N)."""

    def __init__(self, out_dim: int, hidden_dim: int, latent_dim: int):
        super().__init__()
        width = hidden_dim * CH_MULT[-1]
        self.conv_in = FoldedConv1d(latent_dim, width, 3)
        self.mid = _middle(width)
        stages = []
        for level in reversed(range(len(CH_MULT))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(NUM_RES_BLOCKS + 1):
                stage.block.append(ResnetBlock(width, hidden_dim * CH_MULT[level]))
                width = hidden_dim * CH_MULT[level]
            if level - 1 in DOWN_LEVELS:  # undo the encoder's downsampling after `level - 1`
                stage.upsample = Upsample(width)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # indexed by level, run from the deepest
        self.conv_out = FoldedConv1d(width, out_dim, 3, fixed_gain=SILU_GAIN)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_middle(self.mid, self.conv_in(z))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for block in stage.block:
                h = block(h).clamp(-CLIP_ACT, CLIP_ACT)
            if level - 1 in DOWN_LEVELS:
                h = stage.upsample(h)
        return self.conv_out(F.silu(h))


def _middle(width: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(width, width)
    mid.attn_1 = AttnBlock(width)
    mid.block_2 = ResnetBlock(width, width)
    return mid


def _run_middle(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h))).clamp(-CLIP_ACT, CLIP_ACT)


class VAE(nn.Module):
    """MMAudio mel VAE: raw log-mel (B, M, T) <-> latent (B, C, T / 2), channels first."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        mean, std = _data_stats(config.n_mels)
        self.register_buffer("data_mean", torch.tensor(mean).view(1, -1, 1))
        self.register_buffer("data_std", torch.tensor(std).view(1, -1, 1))
        self.encoder = Encoder(config.n_mels, config.hidden_dim, config.latent_dim)
        self.decoder = Decoder(config.n_mels, config.hidden_dim, config.latent_dim)

    mode = property(attrgetter("config.mode"))
    latent_dim = property(attrgetter("config.latent_dim"))
    n_mels = property(attrgetter("config.n_mels"))
    def encode_mean(self, mel: torch.Tensor) -> torch.Tensor:
        """Posterior mean (B, C, T // 2) of a raw log-mel (B, M, T); no sampling."""
        return self._moments(mel)[:, :self.latent_dim]

    def encode_posterior(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std), each (B, C, T // 2), of a raw log-mel (B, M, T).

        As upstream's DiagonalGaussianDistribution: the moments split into mean and log-variance,
        ``std = exp(0.5 * clamp(logvar, -30, 20))``; a sample is ``mean + std * eps``.
        """
        mean, logvar = self._moments(mel).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))

    def _moments(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encoder((mel - self.data_mean) / self.data_std)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw log-mel (B, M, 2N) of a latent (B, C, N)."""
        return self.decoder(z) * self.data_std + self.data_mean

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode_mean(mel))


def folded_convs(vae: VAE) -> dict[str, FoldedConv1d]:
    return {name: m for name, m in vae.named_modules() if isinstance(m, FoldedConv1d)}


@torch.no_grad()
def build_vae(mode: str, tiny: bool = False) -> VAE:
    """A VAE with upstream's initialisation (unit-normal raw weights, gains 1), already folded.

    ``tiny``: the mode's geometry (mels in, latent size, T -> T / 2) with width 16 instead of
    384 / 512.
    """
    if mode not in AUDIO_MODES:
        raise ValueError(f"unknown audio mode {mode!r}; expected one of {sorted(AUDIO_MODES)}")
    vae = VAE(VAEConfig(mode, TINY_HIDDEN if tiny else REAL_HIDDEN[mode]))
    for conv in folded_convs(vae).values():
        conv.weight.copy_(conv.fold(torch.randn_like(conv.weight)))
    return vae.eval()


def is_upstream_state(state: Mapping[str, torch.Tensor]) -> bool:
    """True for an upstream (unfolded) VAE state dict, recognised by its learnable gains."""
    return any(key in state for key in UPSTREAM_GAIN_KEYS)


@torch.no_grad()
def fold_upstream_state(state: Mapping[str, torch.Tensor], vae: VAE,
                        path: str | os.PathLike = "<state dict>") -> dict[str, torch.Tensor]:
    """Upstream VAE state dict -> the folded state dict of ``vae`` (same key names, no gains).

    Keys that are missing or misshapen are passed through untouched for the caller's check.
    """
    missing = [key for key in UPSTREAM_GAIN_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{os.fspath(path)}: does not match the {_WHAT}: "
                              f"{len(missing)} missing: {', '.join(missing)}")
    folded = {k: v for k, v in state.items() if k not in UPSTREAM_GAIN_KEYS}
    gains = {"encoder.conv_out": 1 + state["encoder.learnable_gain"].float(),
             "decoder.conv_out": 1 + state["decoder.learnable_gain"].float()}
    for name, conv in folded_convs(vae).items():
        key = f"{name}.weight"
        if key in folded and folded[key].shape == conv.weight.shape:
            folded[key] = conv.fold(folded[key], gains.get(name, 1.0))
    return folded


def detect_vae_config(state: Mapping[str, torch.Tensor],
                      path: str | os.PathLike = "<state dict>") -> VAEConfig:
    """Mode and width of a VAE state dict (folded or upstream) from its input convolution."""
    path = os.fspath(path)
    weight = state.get("encoder.conv_in.weight")
    if weight is None or weight.dim() != 3:
        sample = ", ".join(sorted(state)[:5])
        raise CheckpointError(f"{path}: not an {_WHAT} state dict (no 3-d 'encoder.conv_in.weight';"
                              f" first keys: {sample})")
    n_mels = weight.shape[1]
    modes = [name for name, mode in AUDIO_MODES.items() if mode.n_mels == n_mels]
    if not modes:
        known = ", ".join(f"{m.n_mels} ({name})" for name, m in AUDIO_MODES.items())
        raise CheckpointError(f"{path}: {_WHAT} with {n_mels} mel channels; expected {known}")
    return VAEConfig(modes[0], int(weight.shape[0]))


def load_vae(path: str | os.PathLike, mode: str | None = None) -> VAE:
    """Load an upstream (ext_weights/v1-16.pth, v1-44.pth) or mmsep-saved VAE from a local file.

    The mode is read from the tensors; a given ``mode`` must agree with it.
    """
    state = read_state_dict(path, what=_WHAT)
    config = detect_vae_config(state, path)
    if mode is not None and mode != config.mode:
        raise CheckpointError(f"{os.fspath(path)}: is a {config.mode} {_WHAT} "
                              f"({config.n_mels} mels), but mode {mode!r} was requested")
    with torch.device("meta"):
        vae = VAE(config)
    vae = vae.to_empty(device="cpu")
    if is_upstream_state(state):
        state = fold_upstream_state(state, vae, path)
    load_checked(vae, state, path, what=_WHAT)
    return vae.eval()
