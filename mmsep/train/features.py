"""The frozen encoders and the feature cache that training reads.

Every clip's query features (CLIP image features of its video at 8 fps, Synchformer features at 25
fps, CLIP text features of its label) and its source waveform (mono, at the model rate, scaled
to ``SOURCE_PEAK`` in the training split, the first ``INTERFERER_SPAN_WINDOWS`` windows at most:
the first window is its target, the rest is where the clip's interferer windows may start from)
are computed once through mmsep's own encoders and written to one file per clip. A file's name is
a hash of the clip (its files' absolute paths, sizes and modification times, its text), the
encoders' weights, the window length and the source peak, so a changed clip or
encoder is recomputed instead of reused, an interrupted run resumes where it stopped, and several
runs can share one cache directory. Files are written atomically.

The VAE latents of the mixtures are not cached: mixtures are drawn anew at every step (as the
authors' training does), so the target and mixture posteriors are encoded on the fly by the frozen
mel front end and VAE (``encode_posterior``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmsep.models import video_reference
from mmsep.models.presets import SequenceLengths

from .data import INTERFERER_SPAN_WINDOWS, Clip, DataError
from .torch_files import save_atomically

CACHE_FORMAT = 4  # 2: clips keyed by their files' identity; 3: audio beyond the first window;
# 4: training sources scaled to SOURCE_PEAK


@dataclass
class Encoders:
    """The frozen feature networks of one deployment, in eval mode."""

    mel: nn.Module
    vae: nn.Module
    clip: nn.Module
    synchformer: nn.Module
    fingerprint: str  # identifies the weights (part of every cache key)

    def place_query_encoders(self, device: str | torch.device) -> None:
        """Move CLIP and Synchformer (used only to compute the feature cache) to ``device``."""
        self.clip.to(device)
        self.synchformer.to(device)

    @torch.no_grad()
    def posterior(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior of (B, L) waveforms, each (B, N, C) channels last."""
        mean, std = self.vae.encode_posterior(self.mel(waveform))
        return mean.transpose(1, 2), std.transpose(1, 2)


def load_encoders(weights_dir: str | os.PathLike, mode: str,
                  fingerprint: str | None = None) -> Encoders:
    """The VAE, CLIP and Synchformer of the release layout under ``weights_dir``;
    ``fingerprint``: their ``encoder_fingerprint`` when the caller already has it."""
    from mmsep.models import MelSpectrogram, load_clip, load_synchformer, load_vae

    vae_path, clip_path, sync_path = _encoder_files(weights_dir, mode)
    return Encoders(mel=MelSpectrogram(mode).eval(), vae=load_vae(vae_path, mode=mode).eval(),
                    clip=load_clip(clip_path).eval(),
                    synchformer=load_synchformer(sync_path).eval(),
                    fingerprint=fingerprint or encoder_fingerprint(weights_dir, mode))


def encoder_fingerprint(weights_dir: str | os.PathLike, mode: str) -> str:
    """Identifies the encoders' weights under ``weights_dir`` (a digest of their files)."""
    from mmsep.model_files import sha256_file

    digest = hashlib.sha256()
    for path in _encoder_files(weights_dir, mode):
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _encoder_files(weights_dir: str | os.PathLike, mode: str) -> tuple[Path, Path, Path]:
    """The VAE, CLIP and Synchformer files of the release layout; CheckpointError for a missing
    one."""
    from mmsep.models.components import CLIP_DIR, SYNCHFORMER_FILE, VAE_FILES, _clip_file
    from mmsep.models.io import CheckpointError

    root = Path(weights_dir)
    vae_path, sync_path = root / VAE_FILES[mode], root / SYNCHFORMER_FILE
    for path, what in ((vae_path, "VAE checkpoint"), (sync_path, "Synchformer checkpoint")):
        if not path.is_file():
            raise CheckpointError(f"{path}: {what} not found")
    return vae_path, _clip_file(root / CLIP_DIR), sync_path


def cache_key(clip: Clip, encoders: Encoders, lengths: SequenceLengths,
              source_peak: float | None) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "clip": clip.key(), "weights": encoders.fingerprint,
                       "duration": lengths.duration, "mode": lengths.mode.name,
                       "peak": source_peak}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _decoded_frames(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from mmsep.runtime.errors import InputError
    from mmsep.runtime.pixels import rgb
    from mmsep.runtime.video import VideoSource

    try:
        pairs = [(t, rgb(frame)) for t, frame in VideoSource(path).frames()]
    except InputError as exc:
        raise DataError(str(exc)) from None
    if not pairs:
        raise DataError(f"{path}: no video frames")
    return np.stack([f for _, f in pairs]), np.asarray([t for t, _ in pairs])


@torch.no_grad()
def clip_features(clip: Clip, encoders: Encoders, lengths: SequenceLengths, *,
                  source_peak: float | None) -> dict[str, torch.Tensor | None]:
    """One clip's cache entry: ``audio`` (the whole file scaled to ``source_peak`` unless None,
    then at least one window, L, and at most ``INTERFERER_SPAN_WINDOWS`` windows; a shorter clip
    padded with silence to L) and
    ``clip_f``/``sync_f``/``text_f`` (None when the clip has no video / no text)."""
    from mmsep.runtime import tokenize
    from mmsep.runtime.audio import read_audio
    from mmsep.runtime.errors import InputError

    try:
        audio = read_audio(clip.source, lengths.mode.sample_rate, peak=source_peak)
        audio = audio[:INTERFERER_SPAN_WINDOWS * lengths.audio_samples]
    except InputError as exc:
        raise DataError(str(exc)) from None
    if audio.size == 0:
        raise DataError(f"{clip.source}: no audio samples (an empty or truncated file)")
    audio = np.pad(audio, (0, max(0, lengths.audio_samples - audio.size)))
    entry: dict[str, torch.Tensor | None] = {"audio": torch.from_numpy(audio.copy()),
                                             "clip_f": None, "sync_f": None, "text_f": None}
    device = next(encoders.clip.parameters()).device
    if clip.video is not None:
        frames, times = _decoded_frames(clip.video)
        images = video_reference.clip_frames(frames, times, lengths.duration)
        entry["clip_f"] = encoders.clip.encode_image(images.to(device)).cpu()
        sync = video_reference.sync_frames(frames, times, lengths.duration)
        entry["sync_f"] = encoders.synchformer.encode_video(sync[None].to(device))[0].cpu()
    if clip.text is not None:
        tokens = torch.from_numpy(tokenize([clip.text])).to(device)
        entry["text_f"] = encoders.clip.encode_text(tokens)[0].cpu()
    return entry


def build_cache(clips: list[Clip], encoders: Encoders, lengths: SequenceLengths,
                cache_dir: str | os.PathLike, *, source_peak: float | None,
                progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Compute the entries that are not in ``cache_dir`` yet; returns every clip's file.
    ``source_peak``: ``SOURCE_PEAK`` for training clips, None for validation ones."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"{cache_key(c, encoders, lengths, source_peak)}.pt" for c in clips]
    for done, (clip, path) in enumerate(zip(clips, paths), start=1):
        if not path.exists():
            save_atomically(clip_features(clip, encoders, lengths, source_peak=source_peak),
                            path)
        if progress is not None:
            progress(done, len(clips))
    return paths


@dataclass
class ClipTable:
    """Every clip's cached features stacked on the first axis (missing ones as the empty
    features, flagged by ``video_exist`` / ``text_exist``)."""

    audio: torch.Tensor  # (K, S): every clip's cached audio, zero-padded to the longest
    audio_len: torch.Tensor  # (K,) int64: samples of each clip's cached audio, at least L
    clip_f: torch.Tensor  # (K, Tc, Dc)
    sync_f: torch.Tensor  # (K, Ts, Ds)
    text_f: torch.Tensor  # (K, 77, Dt)
    video_exist: torch.Tensor  # (K,) bool
    text_exist: torch.Tensor  # (K,) bool
    classes: torch.Tensor  # (K,) int64

    def __len__(self) -> int:
        return self.audio.shape[0]

    def windows(self, clips: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
        """(B, length): ``length`` samples of each clip in ``clips`` from its start."""
        offsets = starts[:, None] + torch.arange(length)[None, :]
        return self.audio[clips[:, None], offsets]


def _cache_entry(path: Path) -> dict:
    """One clip's cached features; DataError naming the file where it is damaged (a copy or a
    sync of a shared cache cut short)."""
    try:
        entry = torch.load(path, weights_only=True)
        if not isinstance(entry, dict) or not {"clip_f", "sync_f", "text_f"} <= entry.keys():
            raise ValueError("not a feature cache entry")
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, ...
        raise DataError(f"{path}: damaged feature cache entry ({' '.join(str(exc).split())[:120]}"
                        "); delete it and run again to compute it anew") from None
    return entry


def load_table(paths: list[Path], classes: torch.Tensor,
               empty: tuple[torch.Tensor, ...]) -> ClipTable:
    """Stack the cache files; ``empty`` is the network's (clip, sync, text) empty features, one
    item each, standing in for what a clip lacks."""
    entries = [_cache_entry(p) for p in paths]
    stacked = {}
    for name, fill in zip(("clip_f", "sync_f", "text_f"), empty):
        stacked[name] = torch.stack([e[name] if e[name] is not None else fill for e in entries])
    lengths = [e["audio"].shape[0] for e in entries]
    audio = torch.zeros(len(entries), max(lengths))
    for row, entry in zip(audio, entries):
        row[:entry["audio"].shape[0]] = entry["audio"]
    return ClipTable(audio=audio, audio_len=torch.tensor(lengths, dtype=torch.int64), **stacked,
                     video_exist=torch.tensor([e["clip_f"] is not None for e in entries]),
                     text_exist=torch.tensor([e["text_f"] is not None for e in entries]),
                     classes=classes)
