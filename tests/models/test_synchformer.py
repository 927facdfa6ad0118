"""Synchformer visual encoder: key layout, loading, geometry and an independent attention check."""

import math

import pytest
import torch
from torch import nn

from mmsep.models.io import CheckpointError
from mmsep.models.presets import TINY_FEATURES, sequence_lengths
from mmsep.models.randomize import randomize_
from mmsep.models.synchformer import (DividedAttention, SpatialPooling, Synchformer,
                                      build_synchformer, load_synchformer, num_segments,
                                      segment_frames)
from tests.helpers import rel_l2

# Facts read off MMAudio's upstream Synchformer (MotionFormer, divided_224_16x4.yaml, built and
# printed once): the ``vfeat_extractor.`` part of synchformer_state_dict.pth.
UPSTREAM_KEY_COUNT = 238
UPSTREAM_PARAM_COUNT = 122_440_704
UPSTREAM_SHAPES = {
    "cls_token": (1, 1, 768),
    "pos_embed": (1, 197, 768),
    "temp_embed": (1, 8, 768),
    "patch_embed.proj.weight": (768, 3, 16, 16),
    "patch_embed.proj.bias": (768,),
    "patch_embed_3d.proj.weight": (768, 3, 2, 16, 16),
    "patch_embed_3d.proj.bias": (768,),
    "blocks.0.norm1.weight": (768,),
    "blocks.0.attn.qkv.weight": (2304, 768),
    "blocks.0.attn.qkv.bias": (2304,),
    "blocks.0.attn.proj.weight": (768, 768),
    "blocks.5.timeattn.qkv.weight": (2304, 768),
    "blocks.5.timeattn.proj.bias": (768,),
    "blocks.11.norm2.bias": (768,),
    "blocks.11.mlp.fc1.weight": (3072, 768),
    "blocks.11.mlp.fc2.weight": (768, 3072),
    "blocks.11.norm3.weight": (768,),
    "norm.weight": (768,),
    "spatial_attn_agg.cls_token": (1, 1, 768),
    "spatial_attn_agg.self_attn.in_proj_weight": (2304, 768),
    "spatial_attn_agg.self_attn.in_proj_bias": (2304,),
    "spatial_attn_agg.self_attn.out_proj.weight": (768, 768),
    "spatial_attn_agg.linear1.weight": (3072, 768),
    "spatial_attn_agg.linear2.weight": (768, 3072),
    "spatial_attn_agg.norm1.weight": (768,),
    "spatial_attn_agg.norm2.bias": (768,),
}
BLOCK_KEYS = sorted(f"{m}.{p}" for m in ("norm1", "norm2", "norm3", "attn.qkv", "attn.proj",
                                         "timeattn.qkv", "timeattn.proj", "mlp.fc1", "mlp.fc2")
                    for p in ("weight", "bias"))


@pytest.fixture(scope="module")
def tiny() -> Synchformer:
    return randomize_(build_synchformer(tiny=True), seed=3).eval()


def _segments(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 16, 3, 224, 224, generator=gen) * 2 - 1


def test_real_config_matches_upstream_key_layout():
    with torch.device("meta"):
        model = build_synchformer()
    state = model.state_dict()
    assert len(state) == UPSTREAM_KEY_COUNT
    assert sum(v.numel() for v in state.values()) == UPSTREAM_PARAM_COUNT
    for key, shape in UPSTREAM_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    for i in range(12):
        assert sorted(k[len(f"blocks.{i}."):] for k in state
                      if k.startswith(f"blocks.{i}.")) == BLOCK_KEYS
    assert not list(model.buffers())


def test_tiny_config_widths():
    model = build_synchformer(tiny=True)
    assert model.width == TINY_FEATURES.sync
    assert model.state_dict()["pos_embed"].shape == (1, 197, TINY_FEATURES.sync)
    assert model.state_dict()["patch_embed_3d.proj.weight"].shape[2:] == (2, 16, 16)


def test_segment_frames_indices():
    frames = torch.arange(2 * 41, dtype=torch.float32).reshape(2, 41, 1)
    segs = segment_frames(frames)
    assert segs.shape == (2, 4, 16, 1)  # (41 - 16) // 8 + 1
    for b in range(2):
        for i in range(4):
            assert segs[b, i, :, 0].tolist() == [41 * b + 8 * i + j for j in range(16)]
    assert num_segments(200) == 24 == sequence_lengths("44k", 8.0).sync_segments
    assert segment_frames(torch.zeros(1, 200, 2)).shape == (1, 24, 16, 2)
    assert segment_frames(torch.zeros(1, 16, 2)).shape == (1, 1, 16, 2)
    with pytest.raises(ValueError, match="at least 16 frames"):
        segment_frames(torch.zeros(1, 15, 2))


def test_eight_seconds_shapes(tiny):
    """8 s at 25 fps: 200 frames -> 24 segments -> (24, 8, D) -> (1, 192, D)."""
    frames = torch.rand(1, 200, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        features = tiny.encode_video(frames)
    assert features.shape == (1, 192, TINY_FEATURES.sync) == (1, sequence_lengths("16k").sync, 48)
    assert torch.isfinite(features).all()
    with torch.no_grad():  # a segment's features do not depend on the other segments
        last = tiny(frames[:, 184:200])
    assert rel_l2(features[0, -8:], last[0]) < 1e-5


def test_encode_video_order(tiny):
    frames = torch.rand(2, 33, 3, 224, 224) * 2 - 1  # 3 segments each, the last frame unused
    # MMAudio's layout: segment i = frames 8i..8i+15, features flattened segment-major per video
    manual = torch.stack([frames[b, 8 * i:8 * i + 16] for b in range(2) for i in range(3)])
    with torch.no_grad():
        features = tiny.encode_video(frames)
        expected = tiny(manual).reshape(2, 3 * 8, TINY_FEATURES.sync)
    assert features.shape == (2, 24, TINY_FEATURES.sync)
    assert rel_l2(features, expected) < 1e-6


def test_tubelets_match_conv3d(tiny):
    segs = _segments(2, seed=4)
    conv = tiny.patch_embed_3d.proj
    with torch.no_grad():
        expected = torch.nn.functional.conv3d(segs.transpose(1, 2), conv.weight, conv.bias,
                                              stride=(2, 16, 16))  # (S, D, 8, 14, 14)
        assert rel_l2(tiny._tubelets(segs), expected.flatten(2).transpose(1, 2)) < 1e-6


def _naive_divided_attention(module: DividedAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-group attention from explicit token index lists (CLS 0, patch (f, p) at 1 + 196f + p)."""
    b, n, dim = x.shape
    h, d = module.heads, dim // module.heads
    q, k, v = (t.reshape(b, n, h, d).transpose(1, 2).double()
               for t in module.qkv(x).chunk(3, dim=-1))

    def attend(qi, ki):
        w = torch.softmax(q[:, :, qi] @ k[:, :, ki].transpose(-1, -2) / math.sqrt(d), dim=-1)
        return w @ v[:, :, ki]

    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    out[:, :, :1] = attend([0], list(range(n)))
    if module.mode == "time":
        groups = [[1 + 196 * f + p for f in range(8)] for p in range(196)]
    else:
        groups = [[1 + 196 * f + p for p in range(196)] for f in range(8)]
    for members in groups:
        out[:, :, members] = attend(members, [0] + members)
    out = out.transpose(1, 2).reshape(b, n, dim).to(x.dtype)
    return module.proj(out)


@pytest.mark.parametrize("mode", ["time", "space"])
def test_divided_attention_against_naive_groups(mode):
    module = randomize_(DividedAttention(24, 4, mode), seed=5)
    x = torch.randn(1, 1 + 8 * 196, 24)
    with torch.no_grad():
        assert rel_l2(module(x), _naive_divided_attention(module, x)) < 1e-5


def test_spatial_pooling_against_torch_encoder_layer():
    dim, heads = 48, 4
    ours = randomize_(SpatialPooling(dim, heads, 4), seed=7).eval()
    ref = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                     activation=nn.GELU(), layer_norm_eps=1e-6, batch_first=True,
                                     norm_first=True).eval()
    state = {k: v for k, v in ours.state_dict().items() if k != "cls_token"}
    ref.load_state_dict(state, strict=True)
    x = torch.randn(5, 196, dim)
    with torch.no_grad():
        expected = ref(torch.cat([ours.cls_token.expand(5, 1, dim), x], dim=1))[:, 0]
        assert rel_l2(ours(x), expected) < 1e-5


def _save(tmp_path, state, name="synchformer_state_dict.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def _release_like(model: Synchformer) -> dict:
    state = {f"vfeat_extractor.{k}": v.clone() for k, v in model.state_dict().items()}
    state["afeat_extractor.patch_embed.proj.weight"] = torch.randn(8, 1, 16, 16)
    state["afeat_extractor.blocks.0.attn.qkv.weight"] = torch.randn(24, 8)
    state["transformer.pos_emb_cfg.pos_emb"] = torch.randn(1, 4, 8)
    state["vproj.weight"] = torch.randn(8, 48)
    return state


def test_load_release_layout_strictly(tiny, tmp_path):
    path = _save(tmp_path, _release_like(tiny))
    loaded = load_synchformer(path)  # tiny detected from the shapes
    assert not loaded.training
    assert loaded.width == TINY_FEATURES.sync
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    segs = _segments(1)
    with torch.no_grad():
        assert torch.equal(loaded(segs), tiny(segs))
    assert load_synchformer(path, tiny=True).width == TINY_FEATURES.sync
    # a bare visual state dict (no prefix) loads too
    bare = _save(tmp_path, tiny.state_dict(), "bare.pth")
    assert load_synchformer(bare).width == TINY_FEATURES.sync


def test_missing_and_misshapen_keys_are_named(tiny, tmp_path):
    state = _release_like(tiny)
    del state["vfeat_extractor.blocks.1.timeattn.qkv.weight"]
    path = _save(tmp_path, state, "missing.pth")
    with pytest.raises(CheckpointError,
                       match=r"missing\.pth.*missing: blocks\.1\.timeattn\.qkv\.weight"):
        load_synchformer(path)

    state = _release_like(tiny)
    state["vfeat_extractor.temp_embed"] = torch.zeros(1, 4, 48)
    path = _save(tmp_path, state, "misshapen.pth")
    with pytest.raises(CheckpointError,
                       match=r"misshapen\.pth.*misshapen: temp_embed \(1, 4, 48\)"):
        load_synchformer(path)

    state = _release_like(tiny)
    state["vfeat_extractor.blocks.2.norm1.weight"] = torch.ones(48)  # a block the preset lacks
    path = _save(tmp_path, state, "extra.pth")
    with pytest.raises(CheckpointError, match=r"extra\.pth.*unexpected: blocks\.2\.norm1\.weight"):
        load_synchformer(path)

    # a real-size request against tiny tensors
    path = _save(tmp_path, _release_like(tiny), "tiny.pth")
    with pytest.raises(CheckpointError, match=r"tiny\.pth.*misshapen: .*pos_embed"):
        load_synchformer(path, tiny=False)


def test_files_without_a_visual_encoder(tmp_path):
    path = _save(tmp_path, {"afeat_extractor.x": torch.zeros(3), "vproj.weight": torch.zeros(2, 2)},
                 "audio_only.pth")
    with pytest.raises(CheckpointError, match=r"audio_only\.pth: no Synchformer visual encoder"):
        load_synchformer(path)
    path = _save(tmp_path, {"vfeat_extractor.pos_embed": torch.zeros(1, 197, 32)}, "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth: unsupported Synchformer width 32"):
        load_synchformer(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_synchformer(tmp_path / "nope.pth")


def test_bad_input_shape_is_rejected(tiny):
    with pytest.raises(ValueError, match=r"\(S, 16, 3, 224, 224\).*\(2, 8, 3, 224, 224\)"):
        tiny(torch.zeros(2, 8, 3, 224, 224))
