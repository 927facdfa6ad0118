"""BigVGAN v1, the mel -> waveform vocoder of MMAudio's 16 kHz models
(``ext_weights/best_netG.pt``).

MMAudio ships it as ``{'generator': state_dict}`` with weight-normed convolutions and a fixed
architecture (its ``bigvgan_vocoder.yml``; there is no config file beside the weights). The network
is the one of ``bigvgan.BigVGAN``; what differs from the 44.1 kHz v2 vocoder is explicit here:
80 mels at 16 kHz, 256 samples per frame (4, 4, 2, 2, 2, 2), a biased final convolution followed
by tanh (v2 omits the bias and clamps).
"""

from __future__ import annotations

import os

import torch

from .bigvgan import BigVGAN, BigVGANConfig, load_generator_state, read_generator_state
from .io import CheckpointError

WHAT = "BigVGAN v1 generator"
FILE_NAME = "best_netG.pt"

# mmaudio/ext/bigvgan/bigvgan_vocoder.yml (generator keys)
BIGVGAN_V1_16K = BigVGANConfig(
    num_mels=80, sampling_rate=16000, upsample_rates=(4, 4, 2, 2, 2, 2),
    upsample_kernel_sizes=(8, 8, 4, 4, 4, 4), upsample_initial_channel=1536, resblock="1",
    resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
    activation="snakebeta", snake_logscale=True, use_tanh_at_final=True, use_bias_at_final=True)

# Same interface (80 mels, 16 kHz, 256x) with a few thousand parameters, for fast tests; three
# dilations per block, as upstream's v1 AMP block hard-codes.
TINY_V1_CONFIG = BigVGANConfig(
    num_mels=80, sampling_rate=16000, upsample_rates=(8, 8, 4), upsample_kernel_sizes=(16, 16, 8),
    upsample_initial_channel=32, resblock="1", resblock_kernel_sizes=(3, 5),
    resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)), activation="snakebeta", snake_logscale=True,
    use_tanh_at_final=True, use_bias_at_final=True)

_CONFIGS = (BIGVGAN_V1_16K, TINY_V1_CONFIG)


class BigVGANv1(BigVGAN):
    """Log10-mel (B, 80, T) as the 16 kHz VAE decodes it -> 16 kHz waveform (B, 256 T) in
    (-1, 1)."""

    def __init__(self, config: BigVGANConfig = BIGVGAN_V1_16K):
        super().__init__(config)


def build_vocoder_v1(tiny: bool = False) -> BigVGANv1:
    """A randomly initialised BigVGAN v1 (MMAudio's 16 kHz configuration, or the tiny one)."""
    return BigVGANv1(TINY_V1_CONFIG if tiny else BIGVGAN_V1_16K)


def _detect_config(state: dict[str, torch.Tensor], path: str) -> BigVGANConfig:
    weight = state.get("conv_pre.weight")
    if weight is None or weight.dim() != 3:
        sample = ", ".join(sorted(state)[:5])
        raise CheckpointError(f"{path}: not a {WHAT} (MMAudio's {FILE_NAME}): no 3-d "
                              f"conv_pre weight (first keys: {sample}); a BigVGAN v2 generator "
                              "needs its config.json beside it")
    width, n_mels = int(weight.shape[0]), int(weight.shape[1])
    for config in _CONFIGS:
        if (config.upsample_initial_channel, config.num_mels) == (width, n_mels):
            return config
    raise CheckpointError(f"{path}: conv_pre maps {n_mels} mels to {width} channels; a {WHAT} "
                          f"maps {BIGVGAN_V1_16K.num_mels} mels to "
                          f"{BIGVGAN_V1_16K.upsample_initial_channel} (or "
                          f"{TINY_V1_CONFIG.upsample_initial_channel}, the tiny test model); a "
                          "BigVGAN v2 generator needs its config.json beside it")


def load_vocoder_v1(path: str | os.PathLike) -> BigVGANv1:
    """Load MMAudio's ``best_netG.pt`` (or an mmsep-saved one): eval mode, weight norm folded."""
    path = os.fspath(path)
    state = read_generator_state(path, what=WHAT)
    model = BigVGANv1(_detect_config(state, path))
    return load_generator_state(model, state, path, what=WHAT)
