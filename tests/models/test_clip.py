"""ClipEncoder against open_clip's own paths on the same random weights, and its loader."""

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from mmsep.models import presets  # noqa: E402
from mmsep.models.clip import (  # noqa: E402
    IMAGE_MEAN, IMAGE_STD, REAL_ARCH, ClipEncoder, _build_open_clip, build_clip,
    clip_from_state_dict, load_clip)
from mmsep.models.io import CheckpointError  # noqa: E402
from mmsep.models.randomize import randomize_  # noqa: E402
from mmsep.runtime import tokenize  # noqa: E402
from tests.helpers import rel_l2  # noqa: E402

UNUSED = {"text_projection", "logit_scale"}  # in the file, used by neither path


@pytest.fixture(scope="module")
def tiny():
    """A tiny open_clip CLIP with every parameter random, and the encoder around it."""
    clip = randomize_(_build_open_clip(tiny=True), seed=0).eval()
    return clip, ClipEncoder(clip).eval()


def _frames(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, presets.CLIP_IMAGE_SIZE, presets.CLIP_IMAGE_SIZE, generator=gen)


def _tokens():
    ids = tokenize(["a dog barking", "rain on a tin roof, then thunder", ""])
    rand = torch.randint(1, 49406, (1, 77), generator=torch.Generator().manual_seed(1))
    return torch.cat([torch.from_numpy(ids), rand])


def _reference_text(clip, tokens):
    """MMAudio's text condition, computed with open_clip's modules."""
    x = clip.token_embedding(tokens) + clip.positional_embedding
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    return F.normalize(clip.ln_final(x), dim=-1)


@torch.no_grad()
def test_image_matches_open_clip(tiny):
    clip, enc = tiny
    frames = _frames()
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    ref = clip.encode_image((frames - mean) / std, normalize=True)
    out = enc.encode_image(frames)
    assert out.shape == (2, presets.TINY_FEATURES.clip)
    assert rel_l2(out, ref) < 1e-6
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    # the two frames differ, so do their embeddings (the weights are not degenerate)
    assert rel_l2(out[0], out[1]) > 0.1


@torch.no_grad()
def test_text_matches_open_clip(tiny):
    clip, enc = tiny
    tokens = _tokens()
    out = enc.encode_text(tokens)
    assert out.shape == (4, 77, presets.TINY_FEATURES.text)
    assert rel_l2(out, _reference_text(clip, tokens)) < 1e-6
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4, 77))
    # open_clip's pooled embedding is the projected state at the end token (the largest id); the
    # projection is linear, so our normalised state projects onto its direction.
    at_end = out[torch.arange(4), tokens.argmax(dim=-1)]
    pooled = F.normalize(at_end @ clip.text_projection, dim=-1)
    assert rel_l2(pooled, clip.encode_text(tokens, normalize=True)) < 1e-5


@torch.no_grad()
def test_text_is_causal(tiny):
    _, enc = tiny
    tokens = _tokens()[:1]
    changed = tokens.clone()
    changed[0, 10:] = 123
    a, b = enc.encode_text(tokens), enc.encode_text(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert rel_l2(a[:, 10:], b[:, 10:]) > 0.1


def test_shape_errors(tiny):
    _, enc = tiny
    with pytest.raises(ValueError, match=r"\(B, 3, 384, 384\)"):
        enc.encode_image(torch.rand(1, 3, 378, 378))
    with pytest.raises(ValueError, match=r"\(B, 77\)"):
        enc.encode_text(torch.zeros(1, 76, dtype=torch.long))


def test_tiny_build_has_tiny_widths():
    enc = build_clip(tiny=True)
    assert not enc.training
    assert (enc.embed_dim, enc.text_width) == (presets.TINY_FEATURES.clip,
                                               presets.TINY_FEATURES.text)
    assert enc.attn_mask.shape == (77, 77)
    assert "attn_mask" not in enc.state_dict() and "image_mean" not in enc.state_dict()


@torch.no_grad()
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_load_round_trip(tiny, tmp_path, suffix):
    clip, enc = tiny
    path = tmp_path / f"open_clip_model{suffix}"
    state = clip.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:  # a half-precision file in a training wrapper: unwrapped and cast to fp32
        torch.save({"state_dict": {k: v.half() for k, v in state.items()}}, path)
    loaded = load_clip(path)  # tiny detected from the shapes
    assert not loaded.training
    assert all(t.device.type == "cpu" and t.dtype == torch.float32
               for t in [*loaded.parameters(), *loaded.buffers()])
    assert set(loaded.state_dict()) == set(state) - UNUSED
    tol = 1e-6 if suffix == ".safetensors" else 1e-2
    frames, tokens = _frames(), _tokens()
    assert rel_l2(loaded.encode_image(frames), enc.encode_image(frames)) < tol
    assert rel_l2(loaded.encode_text(tokens), enc.encode_text(tokens)) < tol


def test_load_errors(tiny, tmp_path):
    clip, _ = tiny
    state = clip.state_dict()
    with pytest.raises(CheckpointError, match="nothing.bin: .* not found"):
        load_clip(tmp_path / "nothing.bin")

    broken = tmp_path / "broken.pt"
    torch.save({k: v for k, v in state.items() if k != "ln_final.bias"}, broken)
    with pytest.raises(CheckpointError, match=r"broken.pt: .*1 missing: ln_final.bias"):
        load_clip(broken)

    hf = tmp_path / "pytorch_model.bin"
    torch.save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 14, 14),
                "text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, hf)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: .*transformers CLIPModel"):
        load_clip(hf)

    whole = tmp_path / "tiny.pt"
    torch.save(state, whole)
    with pytest.raises(CheckpointError, match=r"tiny.pt: does not match .*misshapen"):
        load_clip(whole, tiny=False)


def _real_meta_reference():
    with torch.device("meta"):
        return open_clip.create_model(REAL_ARCH, pretrained=None, device="meta")


def test_real_architecture_layout_on_meta():
    ref = {k: tuple(v.shape) for k, v in _real_meta_reference().state_dict().items()}
    with torch.device("meta"):
        ours_clip = _build_open_clip(tiny=False)
        enc = build_clip()
    assert {k: tuple(v.shape) for k, v in ours_clip.state_dict().items()} == ref
    assert {k: tuple(v.shape) for k, v in enc.state_dict().items()} == {
        k: s for k, s in ref.items() if k not in UNUSED}
    assert len(ref) == 686 and sum(torch.Size(s).numel() for s in ref.values()) == 986_714_881
    grid = presets.CLIP_IMAGE_SIZE // 14  # 384 px: the same 27x27 patches as at 378
    assert ref["visual.positional_embedding"] == (grid * grid + 1, 1280)
    assert (enc.embed_dim, enc.text_width) == (presets.REAL_FEATURES.clip,
                                               presets.REAL_FEATURES.text)


def test_real_state_dict_loads_strictly_on_meta():
    state = _real_meta_reference().state_dict()
    enc = clip_from_state_dict(state, "open_clip_model.safetensors")
    assert enc.embed_dim == 1024 and enc.visual.conv1.weight.shape == (1280, 3, 14, 14)
    assert enc.attn_mask.shape == (77, 77) and not enc.training
    del state["visual.proj"]
    with pytest.raises(CheckpointError, match=r"safetensors: .*missing: visual\.proj"):
        clip_from_state_dict(state, "open_clip_model.safetensors")


@pytest.mark.slow
@torch.no_grad()
def test_real_size_matches_open_clip():
    # ~4 GB and tens of seconds on a CPU: the real ViT-H-14 with open_clip's random init
    clip = open_clip.create_model(REAL_ARCH, pretrained=None).eval()
    enc = ClipEncoder(clip).eval()
    frames, tokens = _frames(batch=1), _tokens()[:2]
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    image = enc.encode_image(frames)
    assert image.shape == (1, 1024)
    assert rel_l2(image, clip.encode_image((frames - mean) / std, normalize=True)) < 1e-5
    text = enc.encode_text(tokens)
    assert text.shape == (2, 77, 1024)
    assert rel_l2(text, _reference_text(clip, tokens)) < 1e-5
    at_end = text[torch.arange(2), tokens.argmax(dim=-1)]
    pooled = F.normalize(at_end @ clip.text_projection, dim=-1)
    assert rel_l2(pooled, clip.encode_text(tokens, normalize=True)) < 1e-4
