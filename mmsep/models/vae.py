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

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .io import CheckpointError, load_checked, read_state_dict
from .presets import AUDIO_MODES
from .vae_layers import (CLIP_ACT, SILU_GAIN, AttnBlock, Downsample, FoldedConv1d, ResnetBlock,
                         Upsample)

# Per-mel-bin statistics of the training data, used by upstream to normalise the VAE input.
# They are also stored in the checkpoints (data_mean / data_std); these are the initial values.
DATA_MEAN_80D = [
    -1.6058, -1.3676, -1.2520, -1.2453, -1.2078, -1.2224, -1.2419, -1.2439, -1.2922, -1.2927,
    -1.3170, -1.3543, -1.3401, -1.3836, -1.3907, -1.3912, -1.4313, -1.4152, -1.4527, -1.4728,
    -1.4568, -1.5101, -1.5051, -1.5172, -1.5623, -1.5373, -1.5746, -1.5687, -1.6032, -1.6131,
    -1.6081, -1.6331, -1.6489, -1.6489, -1.6700, -1.6738, -1.6953, -1.6969, -1.7048, -1.7280,
    -1.7361, -1.7495, -1.7658, -1.7814, -1.7889, -1.8064, -1.8221, -1.8377, -1.8417, -1.8643,
    -1.8857, -1.8929, -1.9173, -1.9379, -1.9531, -1.9673, -1.9824, -2.0042, -2.0215, -2.0436,
    -2.0766, -2.1064, -2.1418, -2.1855, -2.2319, -2.2767, -2.3161, -2.3572, -2.3954, -2.4282,
    -2.4659, -2.5072, -2.5552, -2.6074, -2.6584, -2.7107, -2.7634, -2.8266, -2.8981, -2.9673,
]
DATA_STD_80D = [
    1.0291, 1.0411, 1.0043, 0.9820, 0.9677, 0.9543, 0.9450, 0.9392, 0.9343, 0.9297, 0.9276, 0.9263,
    0.9242, 0.9254, 0.9232, 0.9281, 0.9263, 0.9315, 0.9274, 0.9247, 0.9277, 0.9199, 0.9188, 0.9194,
    0.9160, 0.9161, 0.9146, 0.9161, 0.9100, 0.9095, 0.9145, 0.9076, 0.9066, 0.9095, 0.9032, 0.9043,
    0.9038, 0.9011, 0.9019, 0.9010, 0.8984, 0.8983, 0.8986, 0.8961, 0.8962, 0.8978, 0.8962, 0.8973,
    0.8993, 0.8976, 0.8995, 0.9016, 0.8982, 0.8972, 0.8974, 0.8949, 0.8940, 0.8947, 0.8936, 0.8939,
    0.8951, 0.8956, 0.9017, 0.9167, 0.9436, 0.9690, 1.0003, 1.0225, 1.0381, 1.0491, 1.0545, 1.0604,
    1.0761, 1.0929, 1.1089, 1.1196, 1.1176, 1.1156, 1.1117, 1.1070,
]
DATA_MEAN_128D = [
    -3.3462, -2.6723, -2.4893, -2.3143, -2.2664, -2.3317, -2.1802, -2.4006, -2.2357, -2.4597,
    -2.3717, -2.4690, -2.5142, -2.4919, -2.6610, -2.5047, -2.7483, -2.5926, -2.7462, -2.7033,
    -2.7386, -2.8112, -2.7502, -2.9594, -2.7473, -3.0035, -2.8891, -2.9922, -2.9856, -3.0157,
    -3.1191, -2.9893, -3.1718, -3.0745, -3.1879, -3.2310, -3.1424, -3.2296, -3.2791, -3.2782,
    -3.2756, -3.3134, -3.3509, -3.3750, -3.3951, -3.3698, -3.4505, -3.4509, -3.5089, -3.4647,
    -3.5536, -3.5788, -3.5867, -3.6036, -3.6400, -3.6747, -3.7072, -3.7279, -3.7283, -3.7795,
    -3.8259, -3.8447, -3.8663, -3.9182, -3.9605, -3.9861, -4.0105, -4.0373, -4.0762, -4.1121,
    -4.1488, -4.1874, -4.2461, -4.3170, -4.3639, -4.4452, -4.5282, -4.6297, -4.7019, -4.7960,
    -4.8700, -4.9507, -5.0303, -5.0866, -5.1634, -5.2342, -5.3242, -5.4053, -5.4927, -5.5712,
    -5.6464, -5.7052, -5.7619, -5.8410, -5.9188, -6.0103, -6.0955, -6.1673, -6.2362, -6.3120,
    -6.3926, -6.4797, -6.5565, -6.6511, -6.8130, -6.9961, -7.1275, -7.2457, -7.3576, -7.4663,
    -7.6136, -7.7469, -7.8815, -8.0132, -8.1515, -8.3071, -8.4722, -8.7418, -9.3975, -9.6628,
    -9.7671, -9.8863, -9.9992, -10.0860, -10.1709, -10.5418, -11.2795, -11.3861,
]
DATA_STD_128D = [
    2.3804, 2.4368, 2.3772, 2.3145, 2.2803, 2.2510, 2.2316, 2.2083, 2.1996, 2.1835, 2.1769, 2.1659,
    2.1631, 2.1618, 2.1540, 2.1606, 2.1571, 2.1567, 2.1612, 2.1579, 2.1679, 2.1683, 2.1634, 2.1557,
    2.1668, 2.1518, 2.1415, 2.1449, 2.1406, 2.1350, 2.1313, 2.1415, 2.1281, 2.1352, 2.1219, 2.1182,
    2.1327, 2.1195, 2.1137, 2.1080, 2.1179, 2.1036, 2.1087, 2.1036, 2.1015, 2.1068, 2.0975, 2.0991,
    2.0902, 2.1015, 2.0857, 2.0920, 2.0893, 2.0897, 2.0910, 2.0881, 2.0925, 2.0873, 2.0960, 2.0900,
    2.0957, 2.0958, 2.0978, 2.0936, 2.0886, 2.0905, 2.0845, 2.0855, 2.0796, 2.0840, 2.0813, 2.0817,
    2.0838, 2.0840, 2.0917, 2.1061, 2.1431, 2.1976, 2.2482, 2.3055, 2.3700, 2.4088, 2.4372, 2.4609,
    2.4731, 2.4847, 2.5072, 2.5451, 2.5772, 2.6147, 2.6529, 2.6596, 2.6645, 2.6726, 2.6803, 2.6812,
    2.6899, 2.6916, 2.6931, 2.6998, 2.7062, 2.7262, 2.7222, 2.7158, 2.7041, 2.7485, 2.7491, 2.7451,
    2.7485, 2.7233, 2.7297, 2.7233, 2.7145, 2.6958, 2.6788, 2.6439, 2.6007, 2.4786, 2.2469, 2.1877,
    2.1392, 2.0717, 2.0107, 1.9676, 1.9140, 1.7102, 0.9101, 0.7164,
]
_DATA_STATS = {80: (DATA_MEAN_80D, DATA_STD_80D), 128: (DATA_MEAN_128D, DATA_STD_128D)}

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
        mean, std = _DATA_STATS[config.n_mels]
        self.register_buffer("data_mean", torch.tensor(mean).view(1, -1, 1))
        self.register_buffer("data_std", torch.tensor(std).view(1, -1, 1))
        self.encoder = Encoder(config.n_mels, config.hidden_dim, config.latent_dim)
        self.decoder = Decoder(config.n_mels, config.hidden_dim, config.latent_dim)

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def n_mels(self) -> int:
        return self.config.n_mels

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
