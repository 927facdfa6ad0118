"""Sequence geometry and the dimensions shared by every component of a preset.

Everything here is plain Python so that the exporter, the manifest and the runtime can agree on
sequence lengths without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_SECONDS = 8.0  # the training length of MMAudio / MMAudioSep
# the flow networks of the public releases (their shapes: mmsep.models.flow.FLOW_PRESETS)
RELEASED_VARIANTS = ("small_16k", "small_44k", "medium_44k", "large_44k", "large_44k_v2")
CLIP_FPS = 8
SYNC_FPS = 25
SYNC_SEGMENT_FRAMES = 16
SYNC_SEGMENT_STRIDE = 8
SYNC_TOKENS_PER_SEGMENT = 8
TEXT_LEN = 77
CLIP_IMAGE_SIZE = 384
SYNC_IMAGE_SIZE = 224


@dataclass(frozen=True)
class AudioMode:
    """Audio front-end geometry of a sample-rate family ("16k" or "44k")."""

    name: str
    sample_rate: int
    n_fft: int
    hop: int
    n_mels: int
    f_max: float
    latent_dim: int
    latent_downsample: int = 2  # mel frames per latent

    @property
    def samples_per_latent(self) -> int:
        return self.hop * self.latent_downsample


AUDIO_MODES = {
    "16k": AudioMode("16k", 16000, n_fft=1024, hop=256, n_mels=80, f_max=8000.0, latent_dim=20),
    "44k": AudioMode("44k", 44100, n_fft=2048, hop=512, n_mels=128, f_max=22050.0, latent_dim=40),
}


@dataclass(frozen=True)
class SequenceLengths:
    """Per-window sequence lengths for a duration (DESIGN.md, "Shapes")."""

    duration: float
    mode: AudioMode

    @property
    def latent(self) -> int:
        return math.ceil(self.duration * self.mode.sample_rate / self.mode.samples_per_latent)

    @property
    def audio_samples(self) -> int:
        return self.latent * self.mode.samples_per_latent

    @property
    def mel_frames(self) -> int:
        return self.latent * self.mode.latent_downsample

    @property
    def clip(self) -> int:
        return int(self.duration * CLIP_FPS)

    @property
    def sync_frames(self) -> int:
        return int(self.duration * SYNC_FPS)

    @property
    def sync_segments(self) -> int:
        return (self.sync_frames - SYNC_SEGMENT_FRAMES) // SYNC_SEGMENT_STRIDE + 1

    @property
    def sync(self) -> int:
        return self.sync_segments * SYNC_TOKENS_PER_SEGMENT

    @property
    def text(self) -> int:
        return TEXT_LEN


def sequence_lengths(mode: str | AudioMode, duration: float = WINDOW_SECONDS) -> SequenceLengths:
    if isinstance(mode, str):
        if mode not in AUDIO_MODES:
            raise ValueError(f"unknown audio mode {mode!r}; expected one of {sorted(AUDIO_MODES)}")
        mode = AUDIO_MODES[mode]
    if duration < 2.0:
        # fewer frames than one 16-frame Synchformer segment plus a stride
        raise ValueError(f"window duration must be at least 2 s, got {duration}")
    return SequenceLengths(float(duration), mode)


@dataclass(frozen=True)
class FeatureDims:
    """Widths of the condition features a flow network consumes."""

    clip: int
    sync: int
    text: int


REAL_FEATURES = FeatureDims(clip=1024, sync=768, text=1024)
TINY_FEATURES = FeatureDims(clip=64, sync=48, text=64)
