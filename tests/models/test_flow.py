"""The flow network: structure (against upstream parameter counts), geometry, API and formulas."""

import dataclasses

import numpy as np
import pytest
import torch

from mmsep.models import presets
from mmsep.models.flow import FLOW_PRESETS, Conditions, FlowConfig, build
from mmsep.models.flow_layers import SelfAttention, apply_rope, rope_table, timestep_frequencies
from tests.helpers import rel_l2

# totals printed by the public MMAudio code for its generation networks (all nn.Parameters,
# including latent_mean/latent_std/empty_string_feat)
UPSTREAM_PARAMS = {"small_16k": 157_283_644, "large_44k_v2": 1_030_575_608}


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", sorted(UPSTREAM_PARAMS))
def test_parameter_counts_match_upstream(name):
    with torch.device("meta"):
        gen = build(name, separation=False)
        sep = build(name, separation=True)
    c = gen.config
    assert count(gen) == UPSTREAM_PARAMS[name]
    # only the kernel-7 first audio convolution doubles its input channels
    assert count(sep) - count(gen) == c.hidden_dim * c.latent_dim * 7
    assert sep.audio_input_proj[0].weight.shape == (c.hidden_dim, 2 * c.latent_dim, 7)
    gen_shapes = {k: v.shape for k, v in gen.state_dict().items()}
    sep_shapes = {k: v.shape for k, v in sep.state_dict().items()}
    assert gen_shapes.keys() == sep_shapes.keys()
    changed = [k for k in gen_shapes if gen_shapes[k] != sep_shapes[k]]
    assert changed == ["audio_input_proj.0.weight"]


def test_presets_are_the_upstream_architectures():
    p = FLOW_PRESETS
    small = p["small_16k"]
    assert (small.mode, small.latent_dim, small.hidden_dim, small.depth) == ("16k", 20, 448, 12)
    for name, (hidden, depth, fused, heads, v2) in {
            "small_44k": (448, 12, 8, 7, False), "medium_44k": (896, 12, 8, 14, False),
            "large_44k": (896, 21, 14, 14, False), "large_44k_v2": (896, 21, 14, 14, True)}.items():
        c = p[name]
        assert (c.mode, c.latent_dim) == ("44k", 40)
        assert (c.hidden_dim, c.depth, c.fused_depth, c.num_heads, c.v2) == (hidden, depth, fused,
                                                                            heads, v2)
        assert c.features == presets.REAL_FEATURES and not c.separation
    assert p["tiny"].features == presets.TINY_FEATURES and p["tiny"].mode == "44k"
    assert [n for n, c in p.items() if c.features == presets.REAL_FEATURES] == \
        list(presets.RELEASED_VARIANTS)  # what mmsep-export --variant's help lists


def test_config_sequence_lengths():
    c = FLOW_PRESETS["large_44k_v2"]
    assert (c.latent_seq_len, c.clip_seq_len, c.sync_seq_len, c.text_seq_len) == (345, 64, 192, 77)
    assert c.sample_rate == 44100
    c16 = FLOW_PRESETS["small_16k"]
    assert (c16.latent_seq_len, c16.sample_rate) == (250, 16000)
    c10 = dataclasses.replace(c, duration=10.0)
    assert (c10.latent_seq_len, c10.clip_seq_len, c10.sync_seq_len) == (431, 80, 240)
    with pytest.raises(ValueError, match="heads"):
        dataclasses.replace(c, num_heads=5)
    with pytest.raises(ValueError, match="mode"):
        dataclasses.replace(c, mode="22k")


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="small_16k.*large_44k_v2.*tiny"):
        build("huge_48k")


def test_build_with_seed_randomises_everything():
    net = build("tiny", seed=3)
    for name, p in net.named_parameters():
        assert torch.all(p != 0), name
        assert torch.isfinite(p).all(), name
    assert torch.all(net.latent_std > 0)
    again = build("tiny", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                  again.state_dict().values()))


def inputs(config: FlowConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = config
    return dict(
        x=torch.randn(batch, c.latent_seq_len, c.latent_dim, generator=g),
        t=torch.rand(batch, generator=g),
        clip_f=torch.randn(batch, c.clip_seq_len, c.clip_dim, generator=g),
        sync_f=torch.randn(batch, c.sync_seq_len, c.sync_dim, generator=g),
        text_f=torch.randn(batch, c.text_seq_len, c.text_dim, generator=g),
        x_mix=torch.randn(batch, c.latent_seq_len, c.latent_dim, generator=g))


@pytest.fixture(scope="module")
def sep_net():
    return build("tiny", separation=True, seed=0).eval()


@torch.no_grad()
@pytest.mark.parametrize("duration", [8.0, 5.0, 10.0])
def test_forward_shapes_at_durations(duration):
    net = build("tiny", duration=duration, seed=0).eval()
    c = net.config
    assert net.latent_rot.shape == (c.latent_seq_len, c.head_dim // 2, 2)
    assert net.clip_rot.shape == (c.clip_seq_len, c.head_dim // 2, 2)
    v = net(**inputs(c, batch=1))
    assert v.shape == (1, c.latent_seq_len, c.latent_dim)
    assert torch.isfinite(v).all() and v.abs().mean() > 1e-3


@torch.no_grad()
def test_set_duration_equals_building_at_that_duration(sep_net):
    net = build("tiny", seed=0).eval()
    net.set_duration(5.0)
    ref = build("tiny", duration=5.0, seed=0).eval()
    assert net.config == ref.config
    assert torch.equal(net.latent_rot, ref.latent_rot) and torch.equal(net.clip_rot, ref.clip_rot)
    args = inputs(ref.config, batch=1)
    assert torch.equal(net(**args), ref(**args))
    assert "latent_rot" not in net.state_dict() and "clip_rot" not in net.state_dict()


@torch.no_grad()
def test_prepare_plus_velocity_equals_forward(sep_net):
    a = inputs(sep_net.config)
    cond = sep_net.prepare_conditions(a["clip_f"], a["sync_f"], a["text_f"])
    assert isinstance(cond, Conditions)
    c = sep_net.config
    assert cond.sync.shape == (2, c.latent_seq_len, c.hidden_dim)
    assert cond.clip.shape == (2, c.clip_seq_len, c.hidden_dim)
    assert cond.text.shape == (2, 77, c.hidden_dim) and cond.global_c.shape == (2, c.hidden_dim)
    v = sep_net.velocity(a["x"], a["t"], cond, a["x_mix"])
    assert torch.equal(v, sep_net(**a))
    # the batch rows are independent and conditions stack on the batch axis
    stacked = Conditions(*[torch.cat([f[1:], f[:1]]) for f in cond])
    v2 = sep_net.velocity(a["x"].flip(0), a["t"].flip(0), stacked, a["x_mix"].flip(0))
    assert rel_l2(v2.flip(0), v) < 1e-6


def test_x_mix_is_required_iff_separation(sep_net):
    a = inputs(sep_net.config, batch=1)
    mix = a.pop("x_mix")
    with pytest.raises(ValueError, match="needs the mixture latent x_mix"):
        sep_net(**a)
    gen = build("tiny", separation=False, seed=0)
    with pytest.raises(ValueError, match="generation network"):
        gen(**a, x_mix=mix)
    with pytest.raises(ValueError, match=r"x_mix: expected shape \(B, 345, 40\)"):
        sep_net(**a, x_mix=mix[:, :100])
    with pytest.raises(ValueError, match=r"clip_f: expected shape \(B, 64, 64\)"):
        sep_net(a["x"], a["t"], a["clip_f"][:, :10], a["sync_f"], a["text_f"], mix)


@torch.no_grad()
def test_mixture_channels_follow_the_latent(sep_net):
    # [noisy latent, mixture] order: zeroing the mixture half of the first conv removes x_mix
    net = build("tiny", seed=1).eval()
    a = inputs(net.config, batch=1)
    w = net.audio_input_proj[0].weight
    w[:, 40:] = 0
    v1 = net(**a)
    a["x_mix"] = torch.randn_like(a["x_mix"])
    assert torch.equal(net(**a), v1)
    w[:, 40:] = 1e-2
    assert rel_l2(net(**a), v1) > 1e-3


def test_empty_conditions(sep_net):
    clip, sync, text = sep_net.empty_conditions(3)
    c = sep_net.config
    assert clip.shape == (3, c.clip_seq_len, c.clip_dim)
    assert sync.shape == (3, c.sync_seq_len, c.sync_dim)
    assert text.shape == (3, 77, c.text_dim)
    assert torch.equal(clip[2, 5], sep_net.empty_clip_feat[0])
    assert torch.equal(sync[1, 7], sep_net.empty_sync_feat[0])
    assert torch.equal(text[0], sep_net.empty_string_feat)


def test_normalize_roundtrip(sep_net):
    z = torch.randn(2, 345, 40)
    x = sep_net.normalize(z)
    expected = (z - sep_net.latent_mean[0, 0]) / sep_net.latent_std[0, 0]
    assert torch.allclose(x, expected)
    assert torch.allclose(sep_net.unnormalize(x), z, atol=1e-5)
    assert z.isfinite().all()  # not modified in place


def test_constant_tables_stay_fp32_when_casting():
    net = build("tiny", seed=0).half()
    assert net.audio_input_proj[0].weight.dtype == torch.float16
    assert net.latent_rot.dtype == net.clip_rot.dtype == net.t_embed.freqs.dtype == torch.float32
    ref = build("tiny")
    assert torch.equal(net.latent_rot, ref.latent_rot)
    assert torch.equal(net.t_embed.freqs, ref.t_embed.freqs)
    with torch.device("meta"):
        meta = build("tiny")
    real = meta.to_empty(device="cpu")
    assert torch.equal(real.latent_rot, ref.latent_rot) and torch.equal(real.clip_rot, ref.clip_rot)
    with torch.device("meta"):
        assigned = build("tiny")
    assigned.load_state_dict(ref.state_dict(), assign=True)
    assigned.set_duration(8.0)
    for name, buf in ref.named_buffers():
        assert torch.equal(assigned.get_buffer(name), buf), name


def test_rope_matches_complex_rotation_in_float64():
    # independent reference: channel pairs as complex numbers times exp(i * pos * freq)
    n, dh, scale = 11, 8, 345 / 64
    x = torch.randn(2, 3, n, dh)
    freqs = scale * 10000.0 ** (-np.arange(0, dh, 2) / dh)
    angles = np.arange(n)[:, None] * freqs[None]
    xc = x.double().numpy()[..., 0::2] + 1j * x.double().numpy()[..., 1::2]
    rc = xc * np.exp(1j * angles)
    ref = np.stack([rc.real, rc.imag], axis=-1).reshape(x.shape)
    out = apply_rope(x, rope_table(n, dh, scaling=scale))
    assert rel_l2(out, ref) < 1e-6


def test_timestep_frequencies_v1_v2():
    v1 = timestep_frequencies(256, 10000)
    assert torch.allclose(v1.double(), 10000.0 ** (-torch.arange(0, 256, 2).double() / 256))
    v2 = timestep_frequencies(64, 1)
    assert torch.allclose(v2.double(), 10000 * 10000.0 ** (-torch.arange(0, 64, 2).double() / 64))
    net1 = build(dataclasses.replace(FLOW_PRESETS["tiny"], v2=False))
    assert net1.t_embed.mlp[0].in_features == 256 and isinstance(net1.audio_input_proj[1],
                                                                  torch.nn.SELU)
    net2 = build("tiny")
    assert net2.t_embed.mlp[0].in_features == 64 and isinstance(net2.audio_input_proj[1],
                                                                torch.nn.SiLU)
    assert isinstance(net2.clip_input_proj[1], torch.nn.SiLU)
    assert not isinstance(net1.clip_input_proj[1], torch.nn.SiLU)


def test_qkv_channels_are_interleaved_per_head():
    # released weights lay out the qkv projection as (head, head_dim, {q, k, v})
    attn = SelfAttention(8, 2)
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.copy_(torch.arange(24.0))
        attn.q_norm.weight.fill_(1)
    x = torch.zeros(1, 1, 8)
    q, k, v = attn.project(x, None)
    assert torch.equal(v[0, :, 0], torch.arange(24.0).view(2, 4, 3)[..., 2])
    q_raw = torch.arange(24.0).view(2, 4, 3)[..., 0]
    expected_q = q_raw / torch.sqrt((q_raw ** 2).mean(-1, keepdim=True))
    assert torch.allclose(q[0, :, 0], expected_q)


@torch.no_grad()
def test_sync_upsampling_is_nearest_exact(sep_net):
    # latent token i takes sync token floor((i + 0.5) * (Ts / N)) evaluated in fp32 as PyTorch does:
    # at 8 s / 44k, (57 + 0.5) * 192 / 345 is exactly 32 in real numbers but 31 in fp32
    c = sep_net.config
    a = inputs(c, batch=1)
    cond = sep_net.prepare_conditions(a["clip_f"], a["sync_f"], a["text_f"])
    sync = a["sync_f"].view(1, -1, 8, c.sync_dim) + sep_net.sync_pos_emb
    projected = sep_net.sync_input_proj(sync.flatten(1, 2))
    scale = np.float32(c.sync_seq_len) / np.float32(c.latent_seq_len)
    idx = np.floor((np.arange(c.latent_seq_len, dtype=np.float32) + np.float32(0.5)) * scale)
    idx = np.minimum(idx.astype(np.int64), c.sync_seq_len - 1)
    assert idx[57] == 31 and idx[-1] == c.sync_seq_len - 1
    assert torch.equal(cond.sync[0], projected[0, torch.from_numpy(idx)])
