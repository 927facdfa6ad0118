"""Flow checkpoints: variant detection, strict loading, loader errors, conversion."""

import dataclasses
import functools

import pytest
import torch
from safetensors.torch import save_file

from mmsep.models.checkpoint import convert_to_separation, detect_flow_config, load_flow
from mmsep.models.flow import FLOW_PRESETS, build
from mmsep.models.io import CheckpointError
from tests.helpers import rel_l2


@functools.cache
def meta_state(preset, separation: bool) -> dict:
    with torch.device("meta"):
        return build(preset, separation=separation).state_dict()


def inputs(config, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = config
    return dict(x=torch.randn(batch, c.latent_seq_len, c.latent_dim, generator=g),
                t=torch.rand(batch, generator=g),
                clip_f=torch.randn(batch, c.clip_seq_len, c.clip_dim, generator=g),
                sync_f=torch.randn(batch, c.sync_seq_len, c.sync_dim, generator=g),
                text_f=torch.randn(batch, c.text_seq_len, c.text_dim, generator=g))


def random_mix(config, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, config.latent_seq_len, config.latent_dim, generator=g)


@pytest.fixture(scope="module")
def nets():
    return {sep: build("tiny", separation=sep, seed=int(sep)).eval() for sep in (False, True)}


@pytest.fixture(scope="module")
def saved(nets, tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    paths = {}
    for sep, net in nets.items():
        paths[sep] = root / f"tiny_{'sep' if sep else 'gen'}.pth"
        torch.save(net.state_dict(), paths[sep])
    return paths


@pytest.mark.parametrize("separation", [False, True])
@pytest.mark.parametrize("preset", sorted(FLOW_PRESETS))
def test_detects_every_variant(preset, separation):
    config = detect_flow_config(meta_state(preset, separation), "x.pth")
    assert config == dataclasses.replace(FLOW_PRESETS[preset], separation=separation)


# Facts of the authors' networks (sony/mmaudiosep mmaudiosep/model/networks.py, MMAudioSep):
# variant -> (latent, hidden, v2). The releases are bare state dicts of that module, loaded by
# ``net.load_weights(torch.load(path))``; MMAudio's generation releases are the same minus the
# doubled input channels.
RELEASED = {"small_16k": (20, 448, False), "small_44k": (40, 448, False),
            "medium_44k": (40, 896, False), "large_44k": (40, 896, False),
            "large_44k_v2": (40, 896, True)}


@pytest.mark.parametrize("separation", [False, True])
@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_release_layout_is_the_authors(preset, separation):
    """The key names and shapes the authors' module saves, written out from their code."""
    latent, hidden, v2 = RELEASED[preset]
    state = meta_state(preset, separation)
    in_channels = 2 * latent if separation else latent
    ffn = 256 * -(-int(2 * 4 * hidden / 3) // 256)  # (Conv)MLP(D, 4D): 2/3, multiple of 256
    expected = {
        "audio_input_proj.0.weight": (hidden, in_channels, 7),  # ChannelLastConv1d(2C -> D, 7)
        "audio_input_proj.2.w1.weight": (ffn, hidden, 7),  # after SELU (v1) / SiLU (v2)
        "sync_input_proj.0.weight": (hidden, 768, 7),
        "sync_input_proj.2.w1.weight": (ffn, hidden, 3),
        "clip_input_proj.0.weight": (hidden, 1024), "text_input_proj.0.weight": (hidden, 1024),
        f"clip_input_proj.{2 if v2 else 1}.w1.weight": (ffn, hidden, 3),
        f"text_input_proj.{2 if v2 else 1}.w1.weight": (ffn, hidden),
        "t_embed.mlp.0.weight": (hidden, hidden if v2 else 256),
        "final_layer.conv.weight": (latent, hidden, 7),
        "latent_mean": (1, 1, latent), "latent_std": (1, 1, latent),
        "empty_string_feat": (77, 1024), "empty_clip_feat": (1, 1024),
        "empty_sync_feat": (1, 768), "sync_pos_emb": (1, 1, 8, 768),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    # activations have no parameters: nothing at index 1 of the audio/sync projections
    assert not [k for k in state if k.startswith(("audio_input_proj.1.", "sync_input_proj.1."))]
    config = detect_flow_config(state, f"mmaudiosep_{preset}.pth")
    assert (config.name, config.separation, config.v2) == (preset, separation, v2)


@pytest.mark.slow
@torch.no_grad()
def test_authors_small_16k_file_loads_without_options(tmp_path):
    """A random bare state dict in the release form (weights/mmaudiosep_small_16k.pth)."""
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in
             meta_state("small_16k", True).items()}
    torch.save(state, tmp_path / "mmaudiosep_small_16k.pth")
    net = load_flow(tmp_path / "mmaudiosep_small_16k.pth")
    assert (net.config.name, net.config.separation, net.config.v2) == ("small_16k", True, False)
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_v1_and_v2_are_told_apart():
    v1 = detect_flow_config(meta_state("large_44k", True))
    v2 = detect_flow_config(meta_state("large_44k_v2", True))
    assert (v1.name, v1.v2, v2.name, v2.v2) == ("large_44k", False, "large_44k_v2", True)


def test_unknown_architecture_is_named():
    odd = dataclasses.replace(FLOW_PRESETS["tiny"], depth=5, fused_depth=2)
    with torch.device("meta"):
        state = build(odd).state_dict()
    with pytest.raises(CheckpointError, match=r"odd\.pth: hidden size 64 / depth 5 .*matches no "
                                              r"MMAudio variant"):
        detect_flow_config(state, "odd.pth")


def test_bad_first_conv_and_frequency_size_are_named():
    state = dict(meta_state("tiny", True))
    state["audio_input_proj.0.weight"] = torch.empty(64, 50, 7, device="meta")
    with pytest.raises(CheckpointError, match="f.pth: audio_input_proj.0.weight reads 50 channels"):
        detect_flow_config(state, "f.pth")
    state = dict(meta_state("tiny", True))
    state["t_embed.mlp.0.weight"] = torch.empty(64, 256, device="meta")
    with pytest.raises(CheckpointError, match="t_embed.mlp.0.weight has 256 input frequencies"):
        detect_flow_config(state, "f.pth")


@torch.no_grad()
@pytest.mark.parametrize("separation", [False, True])
def test_strict_roundtrip(nets, saved, separation):
    net = nets[separation]
    loaded = load_flow(saved[separation])
    assert loaded.config == net.config and not loaded.training
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded.latent_rot, net.latent_rot)
    assert torch.equal(loaded.t_embed.freqs, net.t_embed.freqs)
    a = inputs(net.config)
    mix = random_mix(net.config, 5) if separation else None
    assert torch.equal(loaded(**a, x_mix=mix), net(**a, x_mix=mix))


def test_load_with_duration(saved):
    net = load_flow(saved[True], duration=5.0)
    assert net.config.duration == 5.0
    assert net.latent_rot.shape[0] == net.config.latent_seq_len == 216


@torch.no_grad()
def test_wrappers_prefixes_and_derived_keys(nets, tmp_path):
    net = nets[True]
    sd = net.state_dict()
    a = inputs(net.config)
    mix = random_mix(net.config, 1)
    ref = net(**a, x_mix=mix)
    variants = {
        "weights.pth": {"weights": sd, "epoch": 3},
        "ddp.pth": {"model": {"module." + k: v for k, v in sd.items()}, "step": 10},
        "compiled.pth": {"_orig_mod." + k: v for k, v in sd.items()},
        # older upstream checkpoints saved the constant tables too
        "derived.pth": {**sd, "t_embed.freqs": net.t_embed.freqs, "latent_rot": torch.zeros(3)},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        loaded = load_flow(tmp_path / name)
        assert torch.equal(loaded(**a, x_mix=mix), ref), name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_flow(tmp_path / "w.safetensors")(**a, x_mix=mix), ref)
    training_checkpoints(sd, a, mix, ref, tmp_path)


def training_checkpoints(sd, a, mix, ref, tmp_path):
    """Training scripts' files, where an "ema" entry may hold another library's layout."""
    other = {k: 2 * v for k, v in sd.items()}  # the network's values, wrongly taken
    torch_ema = {"model": sd, "ema": {"decay": 0.999, "num_updates": 5,
                                      "shadow_params": list(other.values())}}
    ema_pytorch = {**{"ema_model." + k: v for k, v in sd.items()},
                   **{"online_model." + k: v for k, v in other.items()},
                   "initted": torch.tensor(True), "step": torch.tensor(3)}
    for name, obj in (("torch_ema.pth", torch_ema), ("ema_pytorch.pth", ema_pytorch),
                      ("nested.pth", {"ema": ema_pytorch, "step": 3})):
        torch.save(obj, tmp_path / name)
        assert torch.equal(load_flow(tmp_path / name)(**a, x_mix=mix), ref), name
    # MMAudio's own <exp>_ckpt_last.pth: the network under "weights", its post-hoc EMA's
    # state under "ema"
    post_hoc = {f"ema_models.0.ema_model.{k}": v for k, v in other.items()}
    torch.save({"it": 10, "weights": sd, "optimizer": {"state": {}}, "ema": post_hoc},
               tmp_path / "ckpt_last.pth")
    with pytest.warns(UserWarning, match=r"using its \['weights'\] \(its \['ema'\] is not"):
        loaded = load_flow(tmp_path / "ckpt_last.pth")
    assert torch.equal(loaded(**a, x_mix=mix), ref)


@pytest.mark.parametrize("content", ["hello", "these are not weights\n"])
def test_text_file_is_not_a_checkpoint(tmp_path, content):
    text = tmp_path / "notes.pth"
    text.write_text(content)
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a readable"):
        load_flow(text)


def test_missing_and_truncated(saved, tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth: .*not found"):
        load_flow(tmp_path / "nope.pth")
    data = saved[True].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable"):
        load_flow(cut)


@pytest.mark.parametrize("edit, pattern", [
    ("delete", r"1 missing: joint_blocks\.0\.text_block\.ffn\.w2\.weight"),
    ("add", r"1 unexpected: joint_blocks\.0\.extra\.weight"),
    ("misshape", r"1 misshapen: fused_blocks\.0\.attn\.qkv\.bias \(10,\) != \(192,\)"),
])
def test_wrong_variant_tensors(nets, tmp_path, edit, pattern):
    sd = dict(nets[True].state_dict())
    if edit == "delete":
        del sd["joint_blocks.0.text_block.ffn.w2.weight"]
    elif edit == "add":
        sd["joint_blocks.0.extra.weight"] = torch.zeros(3)
    else:
        sd["fused_blocks.0.attn.qkv.bias"] = torch.zeros(10)
    path = tmp_path / f"{edit}.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=rf"{edit}\.pth: does not match the tiny separation "
                                              rf"network: {pattern}"):
        load_flow(path)


class _Note:  # an object torch.load's safe mode refuses
    pass


def test_a_checkpoint_holding_python_objects_is_named_as_such(nets, tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": nets[True].state_dict(), "note": _Note()}, path)
    with pytest.raises(CheckpointError, match=r"pickled\.pth: holds Python objects besides "
                                              r"tensors, which mmsep does not unpickle"):
        load_flow(path)


def test_a_diverged_checkpoint_is_refused(nets, tmp_path):
    sd = dict(nets[True].state_dict())
    sd["fused_blocks.0.attn.qkv.bias"] = sd["fused_blocks.0.attn.qkv.bias"].clone()
    sd["fused_blocks.0.attn.qkv.bias"][3] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"nan\.pth: the tiny separation network holds NaN "
                                              r"or infinite values in fused_blocks\.0\.attn\.qkv"
                                              r"\.bias \(a training run that diverged\?\)"):
        load_flow(path)


def test_unrelated_state_dict(tmp_path):
    path = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"linear\.pth: not an MMAudio flow checkpoint: no "
                                              r"tensor 'final_layer\.conv\.weight' \(found 2 "
                                              r"tensors: weight, bias\)"):
        load_flow(path)


@torch.no_grad()
def test_conversion_keeps_generation_for_any_mixture(nets):
    gen = nets[False]
    sep = convert_to_separation(gen)
    assert sep.config == dataclasses.replace(gen.config, separation=True) and not sep.training
    a = inputs(gen.config)
    ref = gen(**a)
    for seed in (1, 2):
        out = sep(**a, x_mix=random_mix(gen.config, seed))
        # float rounding only: the 80-channel convolution sums in a different order
        assert rel_l2(out, ref) < 1e-5
    w = sep.audio_input_proj[0].weight
    assert torch.equal(w[:, :40], gen.audio_input_proj[0].weight) and not w[:, 40:].any()
    with pytest.raises(ValueError, match="already a separation network"):
        convert_to_separation(sep)


def test_conversion_of_a_state_dict(nets):
    sd = nets[False].state_dict()
    converted = convert_to_separation(sd)
    assert converted["audio_input_proj.0.weight"].shape == (64, 80, 7)
    assert detect_flow_config(converted).separation
    assert all(torch.equal(converted[k], v) for k, v in sd.items()
               if k != "audio_input_proj.0.weight")
    with pytest.raises(ValueError, match="already a tiny separation network"):
        convert_to_separation(converted)
