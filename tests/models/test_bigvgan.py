"""BigVGAN v2 generator: NVIDIA state-dict layout, weight-norm folding, anti-aliasing, errors."""

import copy
import dataclasses
import json
import re
import warnings

import numpy as np
import pytest
import torch
from scipy import signal
from torch import nn
from torch.nn.utils import parametrizations

from mmsep.models.alias_free import DownSample1d, Snake, SnakeBeta, UpSample1d
from mmsep.models.bigvgan import (BIGVGAN_V2_44K_128BAND_512X, TINY_CONFIG, BigVGANConfig,
                                  build_vocoder, fold_weight_norm, load_vocoder)
from mmsep.models.io import CheckpointError
from mmsep.models.randomize import randomize_
from tests.helpers import rel_l2

# configs/bigvgan_v2_44khz_128band_512x.json of NVIDIA/BigVGAN (generator keys + a few training
# keys, which the reader must ignore).
NVIDIA_44K_512X_JSON = {
    "resblock": "1", "num_gpus": 0, "batch_size": 4, "learning_rate": 0.0001,
    "upsample_rates": [8, 4, 2, 2, 2, 2], "upsample_kernel_sizes": [16, 8, 4, 4, 4, 4],
    "upsample_initial_channel": 1536, "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "use_tanh_at_final": False, "use_bias_at_final": False,
    "activation": "snakebeta", "snake_logscale": True, "use_cqtd_instead_of_mrd": True,
    "segment_size": 65536, "num_mels": 128, "num_freq": 2049, "n_fft": 2048, "hop_size": 512,
    "win_size": 2048, "sampling_rate": 44100, "fmin": 0, "fmax": None,
    "dist_config": {"dist_backend": "nccl", "world_size": 1},
}
# The other branch of every option: AMPBlock2, plain Snake, linear-scale alpha, tanh, final bias.
TINY_V1_STYLE = dataclasses.replace(TINY_CONFIG, resblock="2", activation="snake",
                                    snake_logscale=False, use_tanh_at_final=True,
                                    use_bias_at_final=True)


def _tiny(config=TINY_CONFIG, seed=0):
    # scale 0.5 keeps the random network's waveform well inside the final clamp.
    return randomize_(build_vocoder(config), seed=seed, scale=0.5).eval()


def _convs(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]


def _with_weight_norm(model, style, seed=1):
    """A copy of ``model`` with dim=0 weight norm on every conv and the direction tensors
    rescaled per output row (which leaves the effective weights unchanged)."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for conv in _convs(model):
            if style == "parametrize":
                parametrizations.weight_norm(conv)
                direction = conv.parametrizations.weight.original1
            else:
                torch.nn.utils.weight_norm(conv)
                direction = conv.weight_v
            with torch.no_grad():
                shape = (direction.shape[0],) + (1,) * (direction.dim() - 1)
                direction.mul_(torch.rand(shape, generator=gen) * 3.0 + 0.5)
    return model


def _msg(path, text):
    """Regex for an error message that starts with ``path: text``."""
    return re.escape(f"{path}: {text}")


def _save(tmp_path, state, config):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": state}, tmp_path / "bigvgan_generator.pt")
    data = dict(config.to_dict(), learning_rate=1e-4, segment_size=65536)  # + training keys
    (tmp_path / "config.json").write_text(json.dumps(data))
    return tmp_path


def test_output_shape_and_attributes():
    model = _tiny()
    assert (model.sample_rate, model.hop, model.num_mels) == (44100, 512, 128)
    with torch.no_grad():
        wave = model(torch.randn(2, 128, 5))
    assert wave.shape == (2, 5 * 512)
    assert wave.abs().max() <= 1.0 and wave.std() > 1e-3


@pytest.mark.parametrize("config", [TINY_CONFIG, TINY_V1_STYLE], ids=["v2", "v1-style"])
@pytest.mark.parametrize("style", ["parametrize", "weight_g_v"])
def test_weight_norm_round_trip(tmp_path, config, style):
    plain = _tiny(config)
    normed = _with_weight_norm(plain, style)
    state = normed.state_dict()
    marker = ".parametrizations.weight.original1" if style == "parametrize" else ".weight_v"
    assert sum(k.endswith(marker) for k in state) == len(_convs(plain))
    assert not any(k.endswith(".weight") for k in state)
    path = _save(tmp_path, state, config)
    # Directory form for one style, the .pt path with config.json beside it for the other.
    loaded = load_vocoder(path if style == "parametrize" else path / "bigvgan_generator.pt")

    assert not loaded.training and loaded.config == config
    assert set(loaded.state_dict()) == set(plain.state_dict())
    mel = torch.randn(1, 128, 3)
    with torch.no_grad():
        ref, out, out_normed = plain(mel), loaded(mel), normed(mel)
    assert rel_l2(out, ref) < 1e-5
    assert rel_l2(out, out_normed) < 1e-5
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_fold_weight_norm_formula():
    g = torch.rand(4, 1, 1) + 0.5
    v = torch.randn(4, 3, 5, dtype=torch.float64).float()
    w = fold_weight_norm({"c.weight_g": g, "c.weight_v": v, "c.bias": torch.ones(4)})
    assert set(w) == {"c.weight", "c.bias"}
    ref = g.double() * v.double() / v.double().reshape(4, -1).norm(dim=1).reshape(4, 1, 1)
    assert rel_l2(w["c.weight"], ref) < 1e-6
    with pytest.raises(CheckpointError, match=r"x\.pt: weight-norm tensors of c are incomplete"):
        fold_weight_norm({"c.weight_v": v}, "x.pt")


def test_filters_missing_from_file_are_computed(tmp_path):
    plain = _tiny()
    state = {k: v for k, v in plain.state_dict().items() if not k.endswith(".filter")}
    loaded = load_vocoder(_save(tmp_path, state, TINY_CONFIG))
    mel = torch.randn(1, 128, 3)
    with torch.no_grad():
        assert rel_l2(loaded(mel), plain(mel)) < 1e-6


def test_real_config_layout_on_meta():
    config = BigVGANConfig.from_dict(NVIDIA_44K_512X_JSON)
    assert config == BIGVGAN_V2_44K_128BAND_512X and config.hop == 512
    with torch.device("meta"):
        model = build_vocoder(config)
    state = model.state_dict()
    n_params = sum(p.numel() for p in model.parameters())
    # NVIDIA states ~122M; NVIDIA's BigVGAN after remove_weight_norm counts exactly this.
    assert n_params == 122_152_752
    assert len(state) == 667
    filters = [k for k in state if k.endswith(".filter")]
    assert len(filters) == 2 * (6 * 3 * 6 + 1)
    for key, shape in {
        "conv_pre.weight": (1536, 128, 7),
        "ups.0.0.weight": (1536, 768, 16),
        "ups.5.0.bias": (24,),
        "resblocks.0.convs1.2.weight": (768, 768, 3),
        "resblocks.17.convs2.2.weight": (24, 24, 11),
        "resblocks.17.activations.5.act.beta": (24,),
        "resblocks.0.activations.0.upsample.filter": (1, 1, 12),
        "resblocks.0.activations.0.downsample.lowpass.filter": (1, 1, 12),
        "activation_post.act.alpha": (24,),
        "activation_post.downsample.lowpass.filter": (1, 1, 12),
        "conv_post.weight": (1, 24, 7),
    }.items():
        assert tuple(state[key].shape) == shape, key
    assert "conv_post.bias" not in state  # use_bias_at_final: false


@pytest.mark.parametrize("ratio", [2, 3])
def test_antialias_filter_matches_kaiser_firwin(ratio):
    # Upstream design: cutoff 0.5/ratio, half-width 0.6/ratio (cycles/sample), 12 taps, Kaiser
    # beta from A = 2.285 (taps/2 - 1) pi (4 half-width) + 7.95, unit DC gain.
    taps, cutoff, half_width = 12, 0.5 / ratio, 0.6 / ratio
    beta = signal.kaiser_beta(signal.kaiser_atten(taps // 2, 4 * half_width))
    ref = signal.firwin(taps, cutoff, window=("kaiser", beta), fs=1.0)
    up = UpSample1d(channels=3, ratio=ratio)
    down = DownSample1d(channels=3, ratio=ratio)
    for filt in (up.filter, down.lowpass.filter):
        assert filt.shape == (1, 1, taps)
        np.testing.assert_allclose(filt.flatten().numpy(), ref, rtol=1e-5, atol=1e-7)
    model = build_vocoder(tiny=True)
    np.testing.assert_allclose(model.resblocks[3].activations[1].upsample.filter.flatten(),
                               signal.firwin(12, 0.25, window=("kaiser", signal.kaiser_beta(
                                   signal.kaiser_atten(6, 1.2))), fs=1.0), rtol=1e-5, atol=1e-7)


def test_resampling_preserves_band_limited_signal():
    n = np.arange(256)
    freq = 0.03  # cycles per input sample, well inside the pass band
    x = torch.tensor(np.sin(2 * np.pi * freq * n), dtype=torch.float32).view(1, 1, -1)
    up = UpSample1d(channels=1)(x)[0, 0].numpy()
    assert up.shape == (512,)
    # Output sample m sits at input time (m - 0.5) / 2 (even-length interpolation kernel).
    m = np.arange(512)
    np.testing.assert_allclose(up[32:-32], np.sin(2 * np.pi * freq * (m[32:-32] - 0.5) / 2),
                               atol=3e-3)
    back = DownSample1d(channels=1)(torch.tensor(up).view(1, 1, -1))[0, 0].numpy()
    np.testing.assert_allclose(back[16:-16], x[0, 0, 16:-16].numpy(), atol=3e-3)


@pytest.mark.parametrize("logscale", [True, False])
def test_snake_formulas(logscale):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, generator=gen) * 3
    snake, snake_beta = Snake(5, logscale), SnakeBeta(5, logscale)
    with torch.no_grad():
        for p in (snake.alpha, snake_beta.alpha, snake_beta.beta):
            p.copy_(torch.randn(5, generator=gen) * 0.5 + (0.0 if logscale else 1.5))
    xs = x.double().numpy()

    def positive(p):
        p = p.detach().double().numpy()[None, :, None]
        return np.exp(p) if logscale else p

    a = positive(snake.alpha)
    ref = xs + np.sin(a * xs) ** 2 / a
    assert rel_l2(snake(x), ref) < 1e-6
    a, b = positive(snake_beta.alpha), positive(snake_beta.beta)
    ref = xs + np.sin(a * xs) ** 2 / b
    assert rel_l2(snake_beta(x), ref) < 1e-6


def test_missing_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=_msg(missing, "BigVGAN generator weights not found")):
        load_vocoder(missing)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps(TINY_CONFIG.to_dict()))
    expected = only_config / "bigvgan_generator.pt"
    with pytest.raises(CheckpointError, match=_msg(expected, "BigVGAN generator weights not")):
        load_vocoder(only_config)

    only_weights = tmp_path / "only_weights"
    only_weights.mkdir()
    torch.save({"generator": _tiny().state_dict()}, only_weights / "bigvgan_generator.pt")
    expected = only_weights / "config.json"
    with pytest.raises(CheckpointError, match=_msg(expected, "BigVGAN config not found")):
        load_vocoder(only_weights)
    with pytest.raises(CheckpointError, match=_msg(expected, "BigVGAN config not found")):
        load_vocoder(only_weights / "bigvgan_generator.pt")


def test_bad_config_and_mismatched_weights(tmp_path):
    path = _save(tmp_path, _tiny().state_dict(), TINY_CONFIG)
    config_file = path / "config.json"
    config_file.write_text("{not json")
    with pytest.raises(CheckpointError, match=_msg(config_file, "not a usable BigVGAN config")):
        load_vocoder(path)
    config_file.write_text(json.dumps({"num_mels": 128}))
    with pytest.raises(CheckpointError, match="missing key.*upsample_rates"):
        load_vocoder(path)
    config_file.write_text(json.dumps(dict(TINY_CONFIG.to_dict(), activation="relu")))
    with pytest.raises(CheckpointError, match="activation must be 'snake' or 'snakebeta'"):
        load_vocoder(path)
    # A config that does not describe these weights: 80 mels and a final bias.
    config_file.write_text(json.dumps(dict(TINY_CONFIG.to_dict(), num_mels=80,
                                           use_bias_at_final=True)))
    weights = path / "bigvgan_generator.pt"
    with pytest.raises(CheckpointError,
                       match=_msg(weights, "does not match the BigVGAN generator: ")
                             + r"1 missing: conv_post\.bias; 1 misshapen: conv_pre\.weight"):
        load_vocoder(path)
    weights.write_bytes(weights.read_bytes()[:2000])  # truncated download
    config_file.write_text(json.dumps(TINY_CONFIG.to_dict()))
    with pytest.raises(CheckpointError, match=_msg(weights, "not a readable BigVGAN generator")):
        load_vocoder(path)


def test_build_vocoder_arguments():
    model = build_vocoder(TINY_V1_STYLE.to_dict())
    assert model.config == TINY_V1_STYLE and model.conv_post.bias is not None
    with pytest.raises(ValueError, match="either config or tiny"):
        build_vocoder(TINY_CONFIG, tiny=True)
    with pytest.raises(ValueError, match="hop_size 256 != product of upsample_rates 512"):
        BigVGANConfig.from_dict(dict(NVIDIA_44K_512X_JSON, hop_size=256))
