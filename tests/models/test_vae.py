"""MMAudio VAE: folding against an on-the-fly EDM2 reference, checkpoints, shapes and errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmsep.models.io import CheckpointError
from mmsep.models.vae import (REAL_HIDDEN, VAE, VAEConfig, build_vae, detect_vae_config,
                              load_vae)
from tests.helpers import rel_l2

# Upstream parameter counts (get_my_vae(mode), counted once with the public code); they include
# the two scalar learnable gains that loading folds away.
UPSTREAM_PARAMS = {"16k": 171_657_218, "44k": 305_479_682}
UPSTREAM_ENTRIES = 57  # state-dict entries of an upstream VAE: 53 conv weights, 2 gains, 2 stats


# ---- an unfolded reference: upstream's formulas applied on the fly to a raw state dict ----------

def _normalize(x, dim):
    return x / (1e-4 + torch.linalg.vector_norm(x, dim=dim, keepdim=True) / math.sqrt(x.shape[dim]))


def _mp_conv(sd, key, x, gain=1.0):
    w = sd[key].double()
    fan_in = w[0].numel()
    w = _normalize(w.flatten(1), 1).view_as(w) / math.sqrt(fan_in) * gain
    return F.conv1d(x, w, padding=w.shape[-1] // 2)


def _mp_silu(x):
    return F.silu(x) / 0.596


def _mp_sum(a, b, t=0.3):
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def _resblock(sd, p, x):
    x = _normalize(x, 1)
    h = _mp_conv(sd, p + "conv1.weight", _mp_silu(x))
    h = _mp_conv(sd, p + "conv2.weight", _mp_silu(h))
    if p + "nin_shortcut.weight" in sd:
        x = _mp_conv(sd, p + "nin_shortcut.weight", x)
    return _mp_sum(x, h)


def _attn(sd, p, x):
    b, c, n = x.shape
    y = _mp_conv(sd, p + "qkv.weight", x).reshape(b, 1, c, 3, n)
    q, k, v = _normalize(y, 2).unbind(3)  # (b, 1, c, n)
    att = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(c), dim=-1)  # (b, 1, n, n)
    h = (att @ v.transpose(-1, -2)).transpose(-1, -2).reshape(b, c, n)
    return _mp_sum(x, _mp_conv(sd, p + "proj_out.weight", h))


def _middle(sd, p, h):
    h = _resblock(sd, p + "mid.block_1.", h)
    h = _attn(sd, p + "mid.attn_1.", h)
    return _resblock(sd, p + "mid.block_2.", h).clamp(-256, 256)


def reference_encode_mean(sd, mel):
    moments = reference_moments(sd, mel)
    return moments[:, :moments.shape[1] // 2]


def reference_posterior(sd, mel):
    """Upstream DiagonalGaussianDistribution: (mean, exp(0.5 * clamp(logvar, -30, 20)))."""
    mean, logvar = torch.chunk(reference_moments(sd, mel), 2, dim=1)
    return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))


def reference_moments(sd, mel):
    x = (mel.double() - sd["data_mean"].double()) / sd["data_std"].double()
    h = _mp_conv(sd, "encoder.conv_in.weight", x)
    for level in range(3):
        for i in range(2):
            h = _resblock(sd, f"encoder.down.{level}.block.{i}.", h).clamp(-256, 256)
        if f"encoder.down.{level}.downsample.conv1.weight" in sd:
            h = _mp_conv(sd, f"encoder.down.{level}.downsample.conv1.weight", h)
            h = F.avg_pool1d(h, 2, 2)
            h = _mp_conv(sd, f"encoder.down.{level}.downsample.conv2.weight", h)
    h = _middle(sd, "encoder.", h)
    gain = sd["encoder.learnable_gain"].double() + 1
    return _mp_conv(sd, "encoder.conv_out.weight", _mp_silu(h), gain)


def reference_decode(sd, z):
    h = _middle(sd, "decoder.", _mp_conv(sd, "decoder.conv_in.weight", z.double()))
    for level in reversed(range(3)):
        for i in range(3):
            h = _resblock(sd, f"decoder.up.{level}.block.{i}.", h).clamp(-256, 256)
        if f"decoder.up.{level}.upsample.conv.weight" in sd:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest-exact")
            h = _mp_conv(sd, f"decoder.up.{level}.upsample.conv.weight", h)
    gain = sd["decoder.learnable_gain"].double() + 1
    out = _mp_conv(sd, "decoder.conv_out.weight", _mp_silu(h), gain)
    return out * sd["data_std"].double() + sd["data_mean"].double()


def upstream_state(config: VAEConfig, seed: int = 0) -> dict:
    """A raw upstream-layout state dict with every entry random (weights, gains, statistics)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        layout = VAE(config).state_dict()
    state = {}
    for key, t in layout.items():
        state[key] = torch.randn(t.shape, generator=gen)
    state["data_std"] = 0.5 + torch.rand(layout["data_std"].shape, generator=gen)
    state["data_mean"] = state["data_mean"] - 4.0
    state["encoder.learnable_gain"] = 0.3 * torch.randn((), generator=gen)
    state["decoder.learnable_gain"] = 0.3 * torch.randn((), generator=gen)
    return state


TINY = VAEConfig("44k", 16)
TINY_16K = VAEConfig("16k", 8)


@pytest.fixture(scope="module")
def tiny_upstream(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "v1-tiny.pth"
    state = upstream_state(TINY)
    torch.save(state, path)
    return path, state


def _mel(config, frames, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return -4.0 + 2.0 * torch.randn(batch, config.n_mels, frames, generator=gen)


# ---- folding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [TINY, TINY_16K], ids=["44k", "16k"])
def test_folded_module_matches_unfolded_reference(config, tmp_path):
    state = upstream_state(config, seed=3)
    torch.save(state, tmp_path / "v.pth")
    vae = load_vae(tmp_path / "v.pth")
    mel = _mel(config, 64)
    with torch.no_grad():
        z = vae.encode_mean(mel)
        z_ref = reference_encode_mean(state, mel)
        assert z.shape == (2, config.latent_dim, 32)
        assert z.abs().mean() > 0.1  # not a vacuous comparison
        assert rel_l2(z, z_ref) <= 1e-5
        out = vae.decode(z_ref.float())
        out_ref = reference_decode(state, z_ref)
        assert out.shape == (2, config.n_mels, 64)
        assert rel_l2(out - state["data_mean"], out_ref - state["data_mean"]) <= 1e-5


def test_runtime_module_is_plain_convolutions(tiny_upstream):
    vae = load_vae(tiny_upstream[0])
    owners = {name.rsplit(".", 1)[0] for name, _ in vae.named_parameters()}
    modules = dict(vae.named_modules())
    assert all(type(modules[o]).__mro__[1] is torch.nn.Conv1d and modules[o].bias is None
               for o in owners)
    assert not any("learnable_gain" in k for k in vae.state_dict())


def test_encode_is_deterministic_mean(tiny_upstream):
    vae = load_vae(tiny_upstream[0])
    mel = _mel(TINY, 32)
    with torch.no_grad():
        assert torch.equal(vae.encode_mean(mel), vae.encode_mean(mel))


# ---- checkpoints -------------------------------------------------------------------------------

def test_folded_state_round_trip(tiny_upstream, tmp_path):
    vae = load_vae(tiny_upstream[0])
    torch.save(vae.state_dict(), tmp_path / "folded.pth")
    again = load_vae(tmp_path / "folded.pth", mode="44k")
    for key, value in vae.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    mel = _mel(TINY, 32)
    with torch.no_grad():
        assert torch.equal(again.encode_mean(mel), vae.encode_mean(mel))


@pytest.mark.parametrize("mode, geometry, latents", [("44k", TINY, 345), ("16k", TINY_16K, 250)])
def test_build_tiny_round_trip_and_shapes(tmp_path, mode, geometry, latents):
    vae = build_vae(mode, tiny=True)
    n_mels, latent_dim = geometry.n_mels, geometry.latent_dim
    assert (vae.mode, vae.latent_dim, vae.n_mels) == (mode, latent_dim, n_mels)
    torch.save(vae.state_dict(), tmp_path / "tiny.pth")
    again = load_vae(tmp_path / "tiny.pth")
    assert again.config == vae.config
    mel = _mel(geometry, 2 * latents, batch=1)  # one 8 s window
    with torch.no_grad():
        z = again.encode_mean(mel)
        assert z.shape == (1, latent_dim, latents)
        assert torch.equal(z, vae.encode_mean(mel))
        assert again.decode(z).shape == (1, n_mels, 2 * latents)


def test_16k_geometry_shapes():
    vae = VAE(TINY_16K).eval()
    with torch.no_grad():
        z = vae.encode_mean(_mel(TINY_16K, 500, batch=1))  # 8 s at 16 kHz
        assert z.shape == (1, 20, 250)
        assert vae.decode(z).shape == (1, 80, 500)


@pytest.mark.parametrize("mode", ["16k", "44k"])
def test_real_size_layout(mode):
    with torch.device("meta"):
        vae = VAE(VAEConfig(mode, REAL_HIDDEN[mode]))
    state = vae.state_dict()
    assert len(state) == UPSTREAM_ENTRIES - 2
    assert sum(p.numel() for p in vae.parameters()) == UPSTREAM_PARAMS[mode] - 2
    width, mels, latent = REAL_HIDDEN[mode], vae.n_mels, vae.latent_dim
    expected = {
        "data_mean": (1, mels, 1),
        "encoder.conv_in.weight": (width, mels, 3),
        "encoder.down.0.downsample.conv1.weight": (width, width, 1),
        "encoder.down.2.block.0.nin_shortcut.weight": (4 * width, 2 * width, 1),
        "encoder.mid.attn_1.qkv.weight": (12 * width, 4 * width, 1),
        "encoder.conv_out.weight": (2 * latent, 4 * width, 3),
        "decoder.conv_in.weight": (4 * width, latent, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (2 * width, 4 * width, 1),
        "decoder.up.1.upsample.conv.weight": (2 * width, 2 * width, 3),
        "decoder.up.0.block.2.conv2.weight": (width, width, 3),
        "decoder.conv_out.weight": (mels, width, 3),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert detect_vae_config(state).mode == mode


@pytest.mark.slow
@pytest.mark.parametrize("mode,frames", [("16k", 500), ("44k", 690)])
def test_real_size_round_trip(mode, frames, tmp_path):
    state = upstream_state(VAEConfig(mode, REAL_HIDDEN[mode]))
    torch.save(state, tmp_path / "v.pth")
    vae = load_vae(tmp_path / "v.pth", mode=mode)
    mel = _mel(vae.config, frames, batch=1)
    with torch.no_grad():
        z = vae.encode_mean(mel)
        assert z.shape == (1, vae.latent_dim, frames // 2)
        assert rel_l2(z, reference_encode_mean(state, mel)) <= 1e-4
        assert vae.decode(z).shape == (1, vae.n_mels, frames)


def test_posterior_mean_and_std_match_upstream(tmp_path):
    state = upstream_state(TINY, seed=5)
    torch.save(state, tmp_path / "v.pth")
    vae = load_vae(tmp_path / "v.pth")
    mel = _mel(TINY, 64)
    with torch.no_grad():
        mean, std = vae.encode_posterior(mel)
        mean_ref, std_ref = reference_posterior(state, mel)
        assert mean.shape == std.shape == (2, TINY.latent_dim, 32)
        assert rel_l2(mean, mean_ref) <= 1e-5 and rel_l2(std, std_ref) <= 1e-5
        assert torch.equal(mean, vae.encode_mean(mel))


def test_posterior_std_clamps_the_log_variance():
    vae = build_vae("44k", tiny=True)
    logvar = torch.tensor([-40.0, -30.0, 0.0, 20.0, 25.0]).repeat(2 * TINY.latent_dim, 1)

    class Moments(torch.nn.Module):  # stands in for the encoder: fixed moments
        def forward(self, x):
            return torch.cat([torch.zeros_like(logvar[:TINY.latent_dim]),
                              logvar[:TINY.latent_dim]])[None]

    vae.encoder = Moments()
    _, std = vae.encode_posterior(_mel(TINY, 10, batch=1))
    want = torch.exp(0.5 * torch.tensor([-30.0, -30.0, 0.0, 20.0, 20.0]))
    assert torch.allclose(std[0, 0], want)


# ---- errors ------------------------------------------------------------------------------------

def test_missing_and_truncated_files(tiny_upstream, tmp_path):
    with pytest.raises(CheckpointError, match="nothing.pth: MMAudio VAE not found"):
        load_vae(tmp_path / "nothing.pth")
    bad = tmp_path / "cut.pth"
    bad.write_bytes(tiny_upstream[0].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.pth: not a readable MMAudio VAE"):
        load_vae(bad)


def test_other_network_is_rejected(tmp_path):
    path = tmp_path / "flow.pth"
    torch.save({"audio_input_proj.0.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(CheckpointError, match=r"flow.pth: not an MMAudio VAE state dict .*"
                                              r"audio_input_proj"):
        load_vae(path)


def test_unknown_mel_count(tiny_upstream, tmp_path):
    state = dict(tiny_upstream[1])
    state["encoder.conv_in.weight"] = torch.zeros(16, 64, 3)
    torch.save(state, tmp_path / "v64.pth")
    with pytest.raises(CheckpointError, match="v64.pth: MMAudio VAE with 64 mel channels"):
        load_vae(tmp_path / "v64.pth")


def test_mode_mismatch(tiny_upstream):
    with pytest.raises(CheckpointError, match=r"is a 44k MMAudio VAE \(128 mels\), but mode '16k'"):
        load_vae(tiny_upstream[0], mode="16k")


def test_missing_misshapen_and_extra_keys(tiny_upstream, tmp_path):
    state = dict(tiny_upstream[1])
    del state["decoder.mid.attn_1.qkv.weight"]
    state["encoder.conv_out.weight"] = torch.zeros(10, 64, 3)
    state["vocoder.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        load_vae(tmp_path / "broken.pth")
    message = str(err.value)
    assert "broken.pth: does not match the MMAudio VAE" in message
    assert "1 missing: decoder.mid.attn_1.qkv.weight" in message
    assert "1 unexpected: vocoder.weight" in message
    assert "encoder.conv_out.weight (10, 64, 3) != (80, 64, 3)" in message


def test_one_gain_missing(tiny_upstream, tmp_path):
    state = dict(tiny_upstream[1])
    del state["decoder.learnable_gain"]
    torch.save(state, tmp_path / "half.pth")
    with pytest.raises(CheckpointError, match="half.pth: .* missing: decoder.learnable_gain"):
        load_vae(tmp_path / "half.pth")


def test_build_errors():
    with pytest.raises(ValueError, match="unknown audio mode"):
        build_vae("8k")
    with pytest.raises(ValueError, match="unknown audio mode"):
        build_vae("8k", tiny=True)
