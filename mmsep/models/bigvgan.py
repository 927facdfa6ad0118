"""BigVGAN v2 generator (NVIDIA), the mel -> waveform vocoder of the 44.1 kHz MMAudio models.

The module is shared with BigVGAN v1 (``bigvgan_v1``, the 16 kHz vocoder): both generators are
the same network, differing only in configuration and file layout.

State-dict compatible with NVIDIA's released ``bigvgan_generator.pt`` once weight norm is folded:
convolutions hold plain ``weight``/``bias``; both weight-norm encodings found in the wild (old
``weight_g``/``weight_v`` hooks and ``parametrizations.weight.original0/1``) are folded at load.
Inference only: no weight norm, no CUDA kernel, nothing the exporter cannot trace.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .alias_free import make_activation
from .io import CheckpointError, load_checked, read_state_dict

CONFIG_FILE = "config.json"
GENERATOR_FILE = "bigvgan_generator.pt"


@dataclass(frozen=True)
class BigVGANConfig:
    """The keys of NVIDIA's config.json that shape the generator (training keys are ignored)."""

    num_mels: int = 128
    sampling_rate: int = 44100
    upsample_rates: tuple[int, ...] = (8, 4, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 8, 4, 4, 4, 4)
    upsample_initial_channel: int = 1536
    resblock: str = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    activation: str = "snakebeta"
    snake_logscale: bool = True
    # v2 options; absent keys mean the v1 behaviour (tanh output, bias on conv_post).
    use_tanh_at_final: bool = True
    use_bias_at_final: bool = True
    hop_size: int | None = field(default=None, compare=False)

    def __post_init__(self):
        for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "resblock_dilation_sizes",
                           tuple(tuple(int(d) for d in ds) for ds in self.resblock_dilation_sizes))
        object.__setattr__(self, "resblock", str(self.resblock))
        self.validate()

    @property
    def hop(self) -> int:
        """Waveform samples per mel frame: the product of the upsampling rates."""
        return math.prod(self.upsample_rates)

    def validate(self) -> None:
        """Raise ValueError describing the first inconsistency."""
        if self.resblock not in ("1", "2"):
            raise ValueError(f"resblock must be '1' or '2', got {self.resblock!r}")
        if self.activation not in ("snake", "snakebeta"):
            raise ValueError(f"activation must be 'snake' or 'snakebeta', got {self.activation!r}")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes) or not self.upsample_rates:
            raise ValueError("upsample_rates and upsample_kernel_sizes must be non-empty and of "
                             f"equal length, got {self.upsample_rates} and "
                             f"{self.upsample_kernel_sizes}")
        for rate, kernel in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if rate < 1 or kernel < rate or (kernel - rate) % 2:
                # Otherwise a transposed conv stage does not produce exactly T * rate samples.
                raise ValueError(f"upsample kernel {kernel} with rate {rate}: need kernel >= rate "
                                 "and kernel - rate even")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes) or \
                not self.resblock_kernel_sizes:
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes must be non-empty "
                             "and of equal length")
        if self.upsample_initial_channel % 2 ** len(self.upsample_rates):
            raise ValueError(f"upsample_initial_channel {self.upsample_initial_channel} is not "
                             f"divisible by 2**{len(self.upsample_rates)}")
        if self.hop_size is not None and self.hop_size != self.hop:
            raise ValueError(f"hop_size {self.hop_size} != product of upsample_rates {self.hop}")

    @classmethod
    def from_dict(cls, data: Mapping) -> BigVGANConfig:
        """Build from a config.json mapping; unknown (training) keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        required = ("num_mels", "upsample_rates", "upsample_kernel_sizes",
                    "upsample_initial_channel", "resblock", "resblock_kernel_sizes",
                    "resblock_dilation_sizes", "activation")
        missing = [k for k in required if k not in values]
        if missing:
            raise ValueError(f"missing key(s) {', '.join(missing)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BigVGANConfig:
        """Read NVIDIA's config.json; CheckpointError naming the file if unusable."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: BigVGAN config not found")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, Mapping):
                raise ValueError("top level is not a JSON object")
            return cls.from_dict(data)
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a usable BigVGAN config: {exc}") from exc

    def to_dict(self) -> dict:
        """JSON-ready mapping with NVIDIA's key names (readable by upstream and ``from_dict``)."""
        data = dataclasses.asdict(self)
        data["hop_size"] = self.hop
        return data


# nvidia/bigvgan_v2_44khz_128band_512x, the vocoder of MMAudio's 44.1 kHz models.
BIGVGAN_V2_44K_128BAND_512X = BigVGANConfig(use_tanh_at_final=False, use_bias_at_final=False)

# Same interface (128 mels, 44.1 kHz, 512x) with a few thousand parameters, for fast tests.
TINY_CONFIG = BigVGANConfig(
    upsample_rates=(8, 8, 8), upsample_kernel_sizes=(16, 16, 16), upsample_initial_channel=32,
    resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 3), (1, 3)),
    use_tanh_at_final=False, use_bias_at_final=False)


def _dilated_convs(channels: int, kernel_size: int, dilations: Sequence[int]) -> nn.ModuleList:
    """One length-preserving convolution per dilation."""
    return nn.ModuleList(
        nn.Conv1d(channels, channels, kernel_size, dilation=d,
                  padding=(kernel_size - 1) * d // 2) for d in dilations)


class AMPBlock1(nn.Module):
    """Residual units act -> dilated conv -> act -> conv (dilation 1), one per dilation."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int],
                 activation: str, logscale: bool):
        super().__init__()
        self.convs1 = _dilated_convs(channels, kernel_size, dilations)
        self.convs2 = _dilated_convs(channels, kernel_size, [1] * len(dilations))
        # Interleaved as upstream stores them: activations[2i] before convs1[i], [2i+1] before
        # convs2[i].
        self.activations = nn.ModuleList(
            make_activation(activation, channels, logscale) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2)):
            y = conv1(self.activations[2 * i](x))
            y = conv2(self.activations[2 * i + 1](y))
            x = x + y
        return x


class AMPBlock2(nn.Module):
    """Residual units act -> dilated conv, one per dilation."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int],
                 activation: str, logscale: bool):
        super().__init__()
        self.convs = _dilated_convs(channels, kernel_size, dilations)
        self.activations = nn.ModuleList(
            make_activation(activation, channels, logscale) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs, self.activations):
            x = x + conv(act(x))
        return x


class BigVGAN(nn.Module):
    """Mel spectrogram (B, num_mels, T) -> waveform (B, T * hop) in [-1, 1]."""

    def __init__(self, config: BigVGANConfig = BIGVGAN_V2_44K_128BAND_512X):
        super().__init__()
        self.config = config
        self.sample_rate = config.sampling_rate
        self.hop = config.hop
        self.num_mels = config.num_mels
        width = config.upsample_initial_channel

        self.conv_pre = nn.Conv1d(config.num_mels, width, 7, padding=3)
        # One-element lists keep upstream's ``ups.{i}.0.weight`` key names.
        self.ups = nn.ModuleList(
            nn.ModuleList([nn.ConvTranspose1d(width >> i, width >> (i + 1), k, stride=u,
                                              padding=(k - u) // 2)])
            for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)))

        block = AMPBlock1 if config.resblock == "1" else AMPBlock2
        self.num_kernels = len(config.resblock_kernel_sizes)
        self.resblocks = nn.ModuleList(
            block(width >> (i + 1), k, d, config.activation, config.snake_logscale)
            for i in range(len(self.ups))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes))

        channels = width >> len(self.ups)
        self.activation_post = make_activation(config.activation, channels, config.snake_logscale)
        self.conv_post = nn.Conv1d(channels, 1, 7, padding=3, bias=config.use_bias_at_final)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            # Multi-receptive-field fusion: average of the parallel AMP blocks.
            total = blocks[0](x)
            for blk in blocks[1:]:
                total = total + blk(x)
            x = total / self.num_kernels
        x = self.conv_post(self.activation_post(x))
        x = torch.tanh(x) if self.config.use_tanh_at_final else torch.clamp(x, -1.0, 1.0)
        return x.squeeze(1)


def build_vocoder(config: BigVGANConfig | Mapping | None = None, tiny: bool = False,
                  mode: str = "44k") -> BigVGAN:
    """A randomly initialised vocoder: ``config`` (or config.json mapping), else the vocoder of
    ``mode``: BigVGAN v2 44.1 kHz 128-band 512x for "44k", MMAudio's BigVGAN v1 for "16k", or
    their tiny test configurations if ``tiny``."""
    if config is not None and (tiny or mode != "44k"):
        raise ValueError("pass either config or tiny=True / mode, not both")
    if mode == "16k":
        from .bigvgan_v1 import build_vocoder_v1

        return build_vocoder_v1(tiny=tiny)
    if mode != "44k":
        raise ValueError(f"unknown audio mode {mode!r}; expected '16k' or '44k'")
    if config is None:
        config = TINY_CONFIG if tiny else BIGVGAN_V2_44K_128BAND_512X
    elif isinstance(config, Mapping):
        config = BigVGANConfig.from_dict(config)
    return BigVGAN(config)


def fold_weight_norm(state: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>"
                     ) -> dict[str, torch.Tensor]:
    """Replace weight-norm pairs by plain ``weight`` tensors: w = g * v / ||v||.

    Accepts ``X.weight_g``/``X.weight_v`` (torch.nn.utils.weight_norm) and
    ``X.parametrizations.weight.original0``/``original1`` (torch.nn.utils.parametrizations),
    both with dim=0: the norm runs over every axis but the first. Other keys pass through.
    """
    encodings = ((".weight_g", ".weight_v"),
                 (".parametrizations.weight.original0", ".parametrizations.weight.original1"))
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        for suffixes in encodings:
            hit = next((i for i, s in enumerate(suffixes) if key.endswith(s)), None)
            if hit is not None:
                pairs.setdefault(key[:-len(suffixes[hit])], {})[hit] = value
                break
        else:
            out[key] = value
    for prefix, pair in pairs.items():
        if len(pair) != 2:
            raise CheckpointError(f"{os.fspath(path)}: weight-norm tensors of {prefix} are "
                                  "incomplete (need both magnitude g and direction v)")
        g, v = pair[0], pair[1]
        expected = (v.shape[0],) + (1,) * (v.dim() - 1)
        if tuple(g.shape) != expected:
            raise CheckpointError(f"{os.fspath(path)}: {prefix} weight-norm magnitude has shape "
                                  f"{tuple(g.shape)}, expected {expected} (dim=0 weight norm)")
        out[f"{prefix}.weight"] = _weight_norm(v.float(), g.float()).to(v.dtype)
    return out


def _weight_norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """v * (g / ||v||) with the norm over all axes but 0."""
    # torch's own kernel is what both weight-norm implementations evaluate (and what upstream's
    # remove_weight_norm bakes in): using it makes the folded weights bit-identical to theirs.
    # Its float32 reduction order differs from a plain norm by an ulp, which random-weight
    # parity checks amplify to ~1e-6.
    kernel = getattr(torch, "_weight_norm", None)
    if kernel is not None:
        return kernel(v, g, 0)
    return v * (g / v.flatten(1).norm(dim=1).view(g.shape))


def _resolve_files(path: str | os.PathLike) -> tuple[str, str]:
    path = os.fspath(path)
    if os.path.isdir(path):
        generator = os.path.join(path, GENERATOR_FILE)
        config = os.path.join(path, CONFIG_FILE)
    else:
        generator = path
        config = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    if not os.path.isfile(generator):
        raise CheckpointError(f"{generator}: BigVGAN generator weights not found")
    if not os.path.isfile(config):
        raise CheckpointError(f"{config}: BigVGAN config not found (expected next to {generator})")
    return config, generator


def _is_v2_layout(path: str) -> bool:
    """NVIDIA's v2 layout: a directory, its generator file, or any file with config.json beside."""
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    return (os.path.isdir(path) or os.path.basename(path) == GENERATOR_FILE
            or os.path.isfile(beside))


def load_vocoder(path: str | os.PathLike) -> BigVGAN:
    """Load a vocoder in eval mode, weight norm folded.

    NVIDIA's BigVGAN v2 layout (a directory with config.json + bigvgan_generator.pt, or the .pt
    file with config.json beside it), else MMAudio's 16 kHz BigVGAN v1 file (best_netG.pt, whose
    architecture is fixed and has no config file).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: BigVGAN generator weights not found (expected a BigVGAN "
                              "v2 directory or MMAudio's BigVGAN v1 file best_netG.pt)")
    if not _is_v2_layout(path):
        from .bigvgan_v1 import load_vocoder_v1

        return load_vocoder_v1(path)
    config_path, generator_path = _resolve_files(path)
    model = BigVGAN(BigVGANConfig.from_json(config_path))
    state = read_generator_state(generator_path, what="BigVGAN generator")
    return load_generator_state(model, state, generator_path, what="BigVGAN generator")


def read_generator_state(path: str, *, what: str) -> dict[str, torch.Tensor]:
    """The generator tensors of a BigVGAN file (v1 or v2), weight norm folded."""
    return fold_weight_norm(read_state_dict(path, what=what), path)


def load_generator_state(model: BigVGAN, state: dict[str, torch.Tensor], path: str, *,
                         what: str) -> BigVGAN:
    """Load folded generator tensors strictly into ``model``; returns it in eval mode."""
    # The anti-aliasing filters are constants of the architecture: take them from the file when
    # present (upstream saves them), else keep the ones computed here.
    for key, value in model.state_dict().items():
        if key.endswith(".filter") and key not in state:
            state[key] = value
    load_checked(model, state, path, what=what)
    return model.eval().requires_grad_(False)
