"""The reference Euler + CFG sampler, against Euler steps written out from direct net calls."""

import numpy as np
import pytest
import torch

from mmsep.models.checkpoint import convert_to_separation
from mmsep.models.flow import build
from mmsep.models.sampler import initial_noise, mixture_latent, sample
from mmsep.stages import NORMALIZED_MEAN, POSTERIOR_SAMPLE
from tests.helpers import rel_l2


@pytest.fixture(scope="module")
def net():
    return build("tiny", separation=True, seed=0).eval()


@pytest.fixture(scope="module")
def data(net):
    c = net.config
    g = torch.Generator().manual_seed(7)
    x0 = initial_noise(2, c, seed=0).x0
    return dict(
        x0=x0,
        x_mix=torch.randn(2, c.latent_seq_len, c.latent_dim, generator=g),
        cond=dict(clip_f=torch.randn(2, c.clip_seq_len, c.clip_dim, generator=g),
                  sync_f=torch.randn(2, c.sync_seq_len, c.sync_dim, generator=g),
                  text_f=torch.randn(2, c.text_seq_len, c.text_dim, generator=g)),
        neg=torch.randn(1, c.text_seq_len, c.text_dim, generator=g))


def test_initial_noise_is_the_numpy_recipe(net):
    """x0 of all items first, then per window: its posterior noise (separation)."""
    noise = initial_noise(3, net.config, seed=42, windows=2)
    rng = np.random.default_rng(42)
    shape = (345, 40)
    assert noise.x0.dtype == noise.posterior_noise.dtype == torch.float32
    assert np.array_equal(noise.x0.numpy(), rng.standard_normal((3, *shape), dtype=np.float32))
    for w in range(2):
        assert np.array_equal(noise.posterior_noise[w].numpy(),
                              rng.standard_normal(shape, dtype=np.float32))
    assert noise.noise_audio is None
    assert initial_noise(3, net.config, 42, convention=NORMALIZED_MEAN).posterior_noise is None


def test_initial_noise_of_generation_mode(net):
    """Per window: 0.9 * white-noise audio of one window, then its posterior noise."""
    c = net.config
    noise = initial_noise(2, c, seed=1, generation=True)
    rng = np.random.default_rng(1)
    rng.standard_normal((2, 345, 40), dtype=np.float32)
    for w in range(2):
        audio = rng.standard_normal(c.lengths.audio_samples, dtype=np.float32)
        assert np.array_equal(noise.noise_audio[w].numpy(), np.float32(0.9) * audio)
        assert np.array_equal(noise.posterior_noise[w].numpy(),
                              rng.standard_normal((345, 40), dtype=np.float32))
    normalized = initial_noise(2, c, seed=1, generation=True, convention=NORMALIZED_MEAN)
    assert normalized.posterior_noise is None
    rng = np.random.default_rng(1)
    rng.standard_normal((2, 345, 40), dtype=np.float32)
    audio = [rng.standard_normal(c.lengths.audio_samples, dtype=np.float32) for _ in range(2)]
    assert np.array_equal(normalized.noise_audio.numpy(), np.float32(0.9) * np.stack(audio))
    generation_net = build("tiny", separation=False, seed=0).config
    only_x0 = initial_noise(2, generation_net, seed=1, generation=True)
    assert only_x0.noise_audio is None and only_x0.posterior_noise is None


@torch.no_grad()
def test_mixture_latent_conventions(net):
    from mmsep.models import MelSpectrogram
    from mmsep.models.vae import build_vae

    vae, mel = build_vae("44k", tiny=True), MelSpectrogram("44k")
    c = net.config
    g = torch.Generator().manual_seed(2)
    wave = 0.3 * torch.randn(2, c.lengths.audio_samples, generator=g)
    eps = torch.randn(2, c.latent_seq_len, c.latent_dim, generator=g)
    stats = (net.latent_mean, net.latent_std)
    moments = vae.encoder((mel(wave) - vae.data_mean) / vae.data_std)
    mean, logvar = moments.chunk(2, dim=1)
    want = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps.transpose(1, 2)
    got = mixture_latent(wave, mel, vae, *stats, convention=POSTERIOR_SAMPLE, noise=eps)
    assert rel_l2(got, want.transpose(1, 2)) < 1e-6
    got = mixture_latent(wave, mel, vae, *stats, convention=NORMALIZED_MEAN)
    assert rel_l2(got, (mean.transpose(1, 2) - stats[0]) / stats[1]) < 1e-6
    with pytest.raises(ValueError, match="needs its noise"):
        mixture_latent(wave, mel, vae, *stats, convention=POSTERIOR_SAMPLE)
    with pytest.raises(ValueError, match="unknown mixture latent convention 'mean'"):
        mixture_latent(wave, mel, vae, *stats, convention="mean")


def test_deterministic(net, data):
    a = sample(net, data["x0"], data["cond"], data["x_mix"], steps=2)
    b = sample(net, data["x0"].clone(), data["cond"], data["x_mix"], steps=2)
    assert torch.equal(a, b) and a.shape == data["x0"].shape and not a.requires_grad


@torch.no_grad()
@pytest.mark.parametrize("cfg", [1.0, 0.5, 0.0])
def test_cfg_one_or_below_is_conditional_euler(net, data, cfg):
    """At 1 the guided formula is the conditional velocity; below 1 the authors' ode_wrapper
    takes the conditional velocity alone."""
    steps = 3
    out = sample(net, data["x0"], data["cond"], data["x_mix"], steps=steps, cfg=cfg)
    x = data["x0"].clone()
    for i in range(steps):
        t = torch.full((2,), i / steps)
        x = x + (1 / steps) * net(x, t, **data["cond"], x_mix=data["x_mix"])
    assert torch.equal(out, x)


@torch.no_grad()
@pytest.mark.parametrize("cfg", [4.5, 1.5])
def test_cfg_algebra_one_step(net, data, cfg):
    x0, mix, cond = data["x0"], data["x_mix"], data["cond"]
    t = torch.zeros(2)
    v_c = net(x0, t, **cond, x_mix=mix)
    v_u = net(x0, t, *net.empty_conditions(2), x_mix=mix)
    expected = x0 + 1.0 * (cfg * v_c + (1 - cfg) * v_u)
    assert rel_l2(sample(net, x0, cond, mix, steps=1, cfg=cfg), expected) < 1e-6
    # two steps: the second evaluates at t = 1/2 from the first step's result
    x1 = sample(net, x0, cond, mix, steps=2, cfg=cfg)
    xh = x0 + 0.5 * (cfg * v_c + (1 - cfg) * v_u)
    th = torch.full((2,), 0.5)
    v = cfg * net(xh, th, **cond, x_mix=mix) + (1 - cfg) * net(xh, th, *net.empty_conditions(2),
                                                             x_mix=mix)
    assert rel_l2(x1, xh + 0.5 * v) < 1e-6


@torch.no_grad()
def test_negative_text_replaces_the_empty_text(net, data):
    x0, mix, cond, neg = data["x0"], data["x_mix"], data["cond"], data["neg"]
    t = torch.zeros(2)
    clip_e, sync_e, _ = net.empty_conditions(2)
    v_c = net(x0, t, **cond, x_mix=mix)
    v_u = net(x0, t, clip_e, sync_e, neg.expand(2, -1, -1), x_mix=mix)
    out = sample(net, x0, cond, mix, steps=1, cfg=3.0, negative_text_f=neg)
    assert rel_l2(out, x0 + 3.0 * v_c - 2.0 * v_u) < 1e-6
    assert rel_l2(out, sample(net, x0, cond, mix, steps=1, cfg=3.0)) > 1e-4


@torch.no_grad()
def test_missing_modalities_use_learned_empty_features(net, data):
    clip_e, sync_e, text_e = net.empty_conditions(1)
    only_text = {"text_f": data["cond"]["text_f"]}
    explicit = {"clip_f": clip_e, "sync_f": sync_e, "text_f": data["cond"]["text_f"]}
    kw = dict(x_mix=data["x_mix"], steps=1, cfg=2.0)
    assert rel_l2(sample(net, data["x0"], only_text, **kw),
                  sample(net, data["x0"], explicit, **kw)) < 1e-6
    nothing = sample(net, data["x0"], {"clip_f": None}, **kw)
    # with every modality empty both branches agree: v = v_uncond
    v_u = net(data["x0"], torch.zeros(2), *net.empty_conditions(2), x_mix=data["x_mix"])
    assert rel_l2(nothing, data["x0"] + v_u) < 1e-6


@torch.no_grad()
def test_mixture_reaches_both_branches(net, data):
    x0, cond = data["x0"], data["cond"]
    other = torch.randn_like(data["x_mix"])
    for cfg in (1.0, 4.5):
        a = sample(net, x0, cond, data["x_mix"], steps=1, cfg=cfg)
        b = sample(net, x0, cond, other, steps=1, cfg=cfg)
        assert rel_l2(a, b) > 1e-3
    # the unconditional branch alone (no query at all) still depends on the mixture
    a = sample(net, x0, {}, data["x_mix"], steps=1, cfg=4.5)
    b = sample(net, x0, {}, other, steps=1, cfg=4.5)
    assert rel_l2(a, b) > 1e-3
    # a converted generation network has zero mixture weights: the mixture cannot matter
    conv = convert_to_separation(build("tiny", separation=False, seed=0).eval())
    a = sample(conv, x0, cond, data["x_mix"], steps=1, cfg=4.5)
    b = sample(conv, x0, cond, other, steps=1, cfg=4.5)
    assert rel_l2(a, b) < 1e-6


def test_input_errors(net, data):
    with pytest.raises(ValueError, match="unknown condition keys"):
        sample(net, data["x0"], {"video": data["cond"]["clip_f"]}, data["x_mix"], steps=1)
    with pytest.raises(ValueError, match="needs the mixture latent x_mix.*initial_noise"):
        sample(net, data["x0"], data["cond"], steps=1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sample(net, data["x0"], data["cond"], data["x_mix"], steps=0)
    with pytest.raises(ValueError, match=r"clip_f: expected \(B, T, C\) with B = 1 or 2"):
        sample(net, data["x0"], {"clip_f": data["cond"]["clip_f"][:, 0]}, data["x_mix"], steps=1)


@torch.no_grad()
def test_follows_the_network_dtype(data):
    net64 = build("tiny", separation=True, seed=0).eval().double()
    net32 = build("tiny", separation=True, seed=0).eval()
    a = sample(net64, data["x0"], data["cond"], data["x_mix"], steps=2, cfg=2.0)
    b = sample(net32, data["x0"], data["cond"], data["x_mix"], steps=2, cfg=2.0)
    assert a.dtype == torch.float32
    assert rel_l2(b, a) < 1e-5
