"""BigVGAN v1 (MMAudio's 16 kHz vocoder, ext_weights/best_netG.pt): layout, parity, loading."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from mmsep.models import build_vocoder, load_vocoder
from mmsep.models.bigvgan import BigVGAN
from mmsep.models.bigvgan_v1 import BIGVGAN_V1_16K, TINY_V1_CONFIG, BigVGANv1
from mmsep.models.io import CheckpointError
from mmsep.models.randomize import randomize_
from tests.helpers import rel_l2
from tests.models.test_bigvgan import _save, _with_weight_norm

# Generator keys of mmaudio/ext/bigvgan/bigvgan_vocoder.yml (MMAudio).
MMAUDIO_V1_YML = {
    "resblock": "1", "num_mels": 80, "upsample_rates": (4, 4, 2, 2, 2, 2),
    "upsample_kernel_sizes": (8, 8, 4, 4, 4, 4), "upsample_initial_channel": 1536,
    "resblock_kernel_sizes": (3, 7, 11), "resblock_dilation_sizes": ((1, 3, 5),) * 3,
    "activation": "snakebeta", "snake_logscale": True,
}


def _tiny_v1(seed=0):
    return randomize_(build_vocoder(tiny=True, mode="16k"), seed=seed, scale=0.5).eval()


def _save_v1(path, state):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": state}, path)
    return path


# --- an independent float64 re-statement of upstream's v1 forward, from the state dict ---------

def _weight(state, prefix):
    """Upstream's weight-normed conv weight g * v / ||v|| (dim 0), either storage style."""
    if f"{prefix}.weight_g" in state:
        g, v = state[f"{prefix}.weight_g"], state[f"{prefix}.weight_v"]
    else:
        g = state[f"{prefix}.parametrizations.weight.original0"]
        v = state[f"{prefix}.parametrizations.weight.original1"]
    g, v = g.double(), v.double()
    norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))
    return g * v / norm


def _kaiser_lowpass(cutoff=0.25, half_width=0.3, taps=12):
    """alias_free_torch's kaiser_sinc_filter1d (even length), in float64."""
    atten = 2.285 * (taps // 2 - 1) * math.pi * 4 * half_width + 7.95
    beta = 0.1102 * (atten - 8.7) if atten > 50 else (
        0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21) if atten >= 21 else 0.0)
    window = torch.kaiser_window(taps, periodic=False, beta=beta, dtype=torch.float64)
    time = torch.arange(-taps // 2, taps // 2, dtype=torch.float64) + 0.5
    taps_ = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return (taps_ / taps_.sum()).view(1, 1, -1)


def _act(x, state, prefix):
    """Upsample 2x (replicate pad 5, transposed conv, crop 15/15), SnakeBeta (log scale),
    low-pass (replicate pad 5/6) and decimate 2x."""
    channels, filt = x.shape[1], _kaiser_lowpass().expand(x.shape[1], -1, -1)
    x = 2 * F.conv_transpose1d(F.pad(x, (5, 5), mode="replicate"), filt, stride=2,
                               groups=channels)[..., 15:-15]
    alpha = state[f"{prefix}.act.alpha"].double().exp()[None, :, None]
    beta = state[f"{prefix}.act.beta"].double().exp()[None, :, None]
    x = x + 1.0 / (beta + 1e-9) * torch.sin(alpha * x) ** 2
    return F.conv1d(F.pad(x, (5, 6), mode="replicate"), filt, stride=2, groups=channels)


def _conv(x, state, prefix, dilation=1):
    weight = _weight(state, prefix)
    pad = (weight.shape[-1] * dilation - dilation) // 2
    return F.conv1d(x, weight, state[f"{prefix}.bias"].double(), padding=pad, dilation=dilation)


def _reference_v1(state, mel, config):
    x = _conv(mel.double(), state, "conv_pre")
    blocks = len(config.resblock_kernel_sizes)
    for i, (rate, kernel) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
        x = F.conv_transpose1d(x, _weight(state, f"ups.{i}.0"), state[f"ups.{i}.0.bias"].double(),
                               stride=rate, padding=(kernel - rate) // 2)
        total = 0
        for j, dilations in enumerate(config.resblock_dilation_sizes):
            p, y = f"resblocks.{i * blocks + j}", x
            for n, d in enumerate(dilations):
                h = _conv(_act(y, state, f"{p}.activations.{2 * n}"), state, f"{p}.convs1.{n}", d)
                y = y + _conv(_act(h, state, f"{p}.activations.{2 * n + 1}"), state,
                              f"{p}.convs2.{n}")
            total = total + y
        x = total / blocks
    return torch.tanh(_conv(_act(x, state, "activation_post"), state, "conv_post")).squeeze(1)


# --- tests --------------------------------------------------------------------------------------

def test_config_is_mmaudios_yml():
    assert all(getattr(BIGVGAN_V1_16K, k) == v for k, v in MMAUDIO_V1_YML.items())
    assert (BIGVGAN_V1_16K.hop, BIGVGAN_V1_16K.sampling_rate) == (256, 16000)
    assert BIGVGAN_V1_16K.use_tanh_at_final and BIGVGAN_V1_16K.use_bias_at_final
    assert (TINY_V1_CONFIG.hop, TINY_V1_CONFIG.num_mels) == (256, 80)


def test_real_layout_on_meta():
    with torch.device("meta"):
        model = build_vocoder(mode="16k")
    assert isinstance(model, BigVGANv1) and model.config == BIGVGAN_V1_16K
    state = model.state_dict()
    # MMAudio's BigVGANVocoder after remove_weight_norm: these counts and shapes
    assert sum(p.numel() for p in model.parameters()) == 112_199_473
    assert len(state) == 668
    for key, shape in {"conv_pre.weight": (1536, 80, 7), "ups.0.0.weight": (1536, 768, 8),
                       "ups.5.0.weight": (48, 24, 4), "resblocks.17.convs2.2.weight": (24, 24, 11),
                       "conv_post.weight": (1, 24, 7), "conv_post.bias": (1,)}.items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("style", ["parametrize", "weight_g_v"])
def test_matches_upstream_forward_in_both_weight_norm_styles(tmp_path, style):
    normed = _with_weight_norm(_tiny_v1(), style)
    state = normed.state_dict()
    path = _save_v1(tmp_path / "ext_weights/best_netG.pt", state)
    loaded = load_vocoder(path)
    assert isinstance(loaded, BigVGANv1) and not loaded.training
    assert (loaded.sample_rate, loaded.hop, loaded.num_mels) == (16000, 256, 80)
    mel = -3.0 + torch.randn(2, 80, 9, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = loaded(mel)
    ref = _reference_v1(state, mel, TINY_V1_CONFIG)
    assert out.shape == (2, 9 * 256)
    assert ref.std() > 1e-2 and out.abs().max() < 1.0
    assert rel_l2(out, ref) <= 1e-5


def test_load_vocoder_dispatches_on_the_layout(tmp_path):
    v1_path = _save_v1(tmp_path / "best_netG.pt", _tiny_v1().state_dict())
    v2 = randomize_(build_vocoder(tiny=True), seed=1, scale=0.5)
    v2_dir = _save(tmp_path / "v2", v2.state_dict(), v2.config)
    assert type(load_vocoder(v1_path)) is BigVGANv1
    assert type(load_vocoder(v2_dir)) is BigVGAN
    assert type(load_vocoder(v2_dir / "bigvgan_generator.pt")) is BigVGAN


def _msg(path, text):
    return re.escape(f"{path}: {text}")


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "ext_weights/best_netG.pt"
    with pytest.raises(CheckpointError, match=_msg(missing, "BigVGAN generator weights not found")):
        load_vocoder(missing)
    # a v2 generator without its config.json is not a v1 file
    v2_file = _save_v1(tmp_path / "v2_generator.pt", build_vocoder(tiny=True).state_dict())
    with pytest.raises(CheckpointError, match=_msg(v2_file, "conv_pre maps 128 mels to 32 ")
                       + ".*needs its config.json beside it"):
        load_vocoder(v2_file)
    not_vocoder = tmp_path / "v1-16.pth"
    torch.save({"encoder.conv_in.weight": torch.ones(8, 80, 3)}, not_vocoder)
    with pytest.raises(CheckpointError, match=_msg(not_vocoder, "not a BigVGAN v1 generator")):
        load_vocoder(not_vocoder)
    truncated = tmp_path / "cut/best_netG.pt"
    _save_v1(truncated, _tiny_v1().state_dict())
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=_msg(truncated, "not a readable BigVGAN v1")):
        load_vocoder(truncated)
    state = _tiny_v1().state_dict()
    del state["conv_post.bias"]
    no_bias = _save_v1(tmp_path / "nobias/best_netG.pt", state)
    expected = _msg(no_bias, "does not match the BigVGAN v1 generator: 1 missing: conv_post.bias")
    with pytest.raises(CheckpointError, match=expected):
        load_vocoder(no_bias)


def test_build_vocoder_modes():
    model = build_vocoder(tiny=True, mode="16k")
    assert isinstance(model, BigVGANv1) and model.config == TINY_V1_CONFIG
    with pytest.raises(ValueError, match="unknown audio mode '8k'"):
        build_vocoder(mode="8k")
    with pytest.raises(ValueError, match="either config or"):
        build_vocoder(TINY_V1_CONFIG, mode="16k")
