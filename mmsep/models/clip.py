"""DFN5B CLIP ViT-H-14-384 (open_clip) as MMAudio uses it: image embeddings and text hidden states.

MMAudio runs Apple's DFN5B CLIP (open_clip architecture ``ViT-H-14-378-quickgelu``) on 384x384
frames; the 14-pixel patch convolution yields the same 27x27 grid as at 378, the last 6 pixel rows
and columns are never seen. Its text condition is not CLIP's pooled text embedding but the
per-token hidden states after the final layer norm, each L2-normalised (77 x 1024).

``ClipEncoder`` keeps only the open_clip sub-modules these two paths use, under their open_clip
names, and writes both paths out explicitly so they export as plain graphs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import presets
from .io import CheckpointError, check_state_dict, read_state_dict

REAL_ARCH = "ViT-H-14-378-quickgelu"
# OpenAI CLIP pixel statistics; DFN5B keeps them (MMAudio normalises frames with these).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Small enough to run in tests, with the tiny preset's feature widths.
TINY_PATCH = 32
TINY_CONFIG = dict(
    embed_dim=presets.TINY_FEATURES.clip,
    quick_gelu=True,
    vision_cfg=dict(image_size=presets.CLIP_IMAGE_SIZE, patch_size=TINY_PATCH, width=64,
                    head_width=32, layers=2),
    text_cfg=dict(context_length=presets.TEXT_LEN, vocab_size=49408,
                  width=presets.TINY_FEATURES.text, heads=4, layers=2),
)
WHAT = "DFN5B CLIP (open_clip ViT-H-14-378-quickgelu) weights"


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # an optional dependency of mmsep[export]
        raise ImportError("CLIP needs open_clip: pip install open_clip_torch") from exc
    return open_clip


class ClipEncoder(nn.Module):
    """The image and text paths of an open_clip ``CLIP`` model, as MMAudio conditions on them.

    ``encode_image``: frames (B, 3, 384, 384) in [0, 1] -> L2-normalised embeddings (B, E).
    ``encode_text``: token ids (B, 77) int64 -> per-token normalised hidden states (B, 77, W).
    Parameter names match open_clip's state dict (minus ``text_projection`` and ``logit_scale``,
    which neither path uses).
    """

    def __init__(self, clip: nn.Module, image_size: int = presets.CLIP_IMAGE_SIZE):
        super().__init__()
        self.visual = clip.visual
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.image_size = image_size
        self.context_length = int(clip.positional_embedding.shape[0])
        self.embed_dim = int(clip.visual.output_dim)
        self.text_width = int(clip.ln_final.weight.shape[0])
        device = clip.positional_embedding.device
        # Constants, not in the upstream state dict: rebuilt here so that a model assembled on
        # the meta device and filled from a file has real buffers.
        mask = torch.full((self.context_length, self.context_length), float("-inf"), device=device)
        self.register_buffer("attn_mask", mask.triu(1), persistent=False)
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN, device=device).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD, device=device).view(1, 3, 1, 1),
                             persistent=False)

    def encode_image(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] at the model's image size -> (B, embed_dim), unit norm."""
        if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[-2:] != (
                self.image_size, self.image_size):
            raise ValueError(f"CLIP frames must be (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(frames.shape)}")
        x = (frames - self.image_mean.to(frames.dtype)) / self.image_std.to(frames.dtype)
        return F.normalize(self.visual(x), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 77) token ids -> (B, 77, text_width) final-layer-norm states, each of unit norm."""
        if tokens.dim() != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"CLIP tokens must be (B, {self.context_length}), "
                             f"got {tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask.to(x.dtype))
        return F.normalize(self.ln_final(x), dim=-1)


def _build_open_clip(tiny: bool) -> nn.Module:
    """The open_clip CLIP model, random-initialised, on the current default device."""
    open_clip = _open_clip()
    if tiny:
        return open_clip.CLIP(**TINY_CONFIG)
    # What open_clip.create_model(REAL_ARCH, pretrained=None) builds for this config (a plain
    # CLIP, fp32), minus its device move and its "initialised randomly" warning; the tests check
    # that the two agree key for key. Nothing is downloaded.
    config = open_clip.get_model_config(REAL_ARCH)
    if config is None:
        raise ImportError(f"this open_clip has no built-in {REAL_ARCH} config; "
                          "install open_clip_torch>=2.24")
    return open_clip.CLIP(**config)


def build_clip(tiny: bool = False) -> ClipEncoder:
    """A random-initialised ClipEncoder: the real ViT-H-14 (~1e9 parameters, ~4 GB in fp32;
    build it under ``with torch.device("meta"):`` to inspect it cheaply) or the tiny test model."""
    return ClipEncoder(_build_open_clip(tiny)).eval()


def _is_tiny(state: dict[str, torch.Tensor]) -> bool:
    conv = state.get("visual.conv1.weight")
    return conv is not None and tuple(conv.shape[-2:]) == (TINY_PATCH, TINY_PATCH) \
        and conv.shape[0] == TINY_CONFIG["vision_cfg"]["width"]


def load_clip(path: str | os.PathLike, tiny: bool | None = None) -> ClipEncoder:
    """Load a local open_clip weights file (``open_clip_pytorch_model.bin`` or
    ``open_clip_model.safetensors`` of apple/DFN5B-CLIP-ViT-H-14-384, or a tiny test model) into
    a ClipEncoder in eval mode, float32 on the CPU. Every tensor of the file must match the
    architecture (strict); ``tiny=None`` picks the architecture from the tensor shapes."""
    return clip_from_state_dict(read_state_dict(path, what=WHAT), path, tiny=tiny)


def clip_from_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike,
                         tiny: bool | None = None) -> ClipEncoder:
    """``load_clip`` for tensors already read; ``path`` names their source in errors."""
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        raise CheckpointError(
            f"{os.fspath(path)}: this is a Hugging Face transformers CLIPModel file; "
            "use the open_clip weights "
            "(open_clip_pytorch_model.bin or open_clip_model.safetensors)")
    if tiny is None:
        tiny = _is_tiny(state)
    # Assemble on the meta device and adopt the file's tensors: no 4 GB random initialisation.
    with torch.device("meta"):
        clip = _build_open_clip(tiny)
    check_state_dict(clip, state, path, what=WHAT + (" (tiny test model)" if tiny else ""))
    clip.load_state_dict(state, strict=True, assign=True)
    return ClipEncoder(clip).float().eval()


def release_state_dict(encoder: ClipEncoder, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The encoder's tensors in open_clip's file layout, as ``load_clip`` reads them.

    open_clip files also hold ``text_projection`` and ``logit_scale``, which neither path here
    uses; they are filled with seeded random values of the right shapes.
    """
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    with torch.device("meta"):
        reference = _build_open_clip(tiny=encoder.embed_dim == TINY_CONFIG["embed_dim"])
    gen = torch.Generator().manual_seed(seed)
    for key, value in reference.state_dict().items():
        if key not in state:
            state[key] = torch.randn(value.shape, generator=gen) * 0.02
    return state
