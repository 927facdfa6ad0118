"""PyTorch reference of the video preprocessing: frame selection, resizing, value scaling.

The torch-free runtime is checked against these functions. They reproduce MMAudio's
``load_video`` as it runs there (on CPU):

* Frame selection is sample-and-hold on decoded timestamps: output ``k`` of a stream at rate
  ``f`` is the first decoded frame whose timestamp is >= ``start + k / f`` (a frame repeats when
  the source is slower than ``f``; frames before ``start`` are never chosen). Targets are computed
  as ``k / f`` rather than by MMAudio's running sum of ``1 / f``, and a timestamp within
  ``TIME_TOLERANCE`` (1 us) below a target counts as reaching it, so a frame that lands exactly
  on a target is chosen whatever the rounding of its timestamp. When no frame reaches a target
  (the video ends early), the last frame is held: MMAudio would shorten the clip instead, while
  mmsep keeps the window length fixed.
* Resizing is antialiased bicubic (Keys a = -0.5, support widened by the downscale factor, as
  PIL) on the uint8 frames, with uint8 output, i.e. ``F.interpolate(mode="bicubic",
  align_corners=False, antialias=True)`` applied to a uint8 tensor. That is exactly what
  torchvision's ``v2.Resize(..., BICUBIC)`` does to uint8 tensors on CPU, where MMAudio runs it.
  (On GPU torchvision resizes in float and rounds; that differs by at most 1/255 on natural
  images.) Values are then scaled by 1/255.
* CLIP frames: 8 fps, resized to 384 x 384 (aspect not preserved), values in [0, 1].
* Sync frames: 25 fps, short side resized to 224 (long side ``int(224 * long / short)``), centre
  crop 224 x 224 (offset ``round((size - 224) / 2)``, Python's round-half-to-even as torchvision),
  values ``2 * (q / 255) - 1`` in [-1, 1].

Frame counts are ``int(duration * fps)``: 8 s gives 64 CLIP frames and 200 sync frames.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .presets import CLIP_FPS, CLIP_IMAGE_SIZE, SYNC_FPS, SYNC_IMAGE_SIZE

TIME_TOLERANCE = 1e-6  # seconds


def frame_count(duration: float, rate: float) -> int:
    """Frames of a ``rate`` stream in ``duration`` seconds (as ``presets.sequence_lengths``)."""
    return int(duration * rate)


def select_frames(timestamps, rate: float, count: int, *, start: float = 0.0) -> np.ndarray:
    """Indices (int64, length ``count``) of the decoded frames chosen for a ``rate`` fps stream.

    ``timestamps`` are the presentation times in seconds of the decoded frames, in decode order.
    Output ``k`` is the first frame with timestamp >= start + k / rate (within TIME_TOLERANCE),
    or the last frame when none is.
    """
    ts = np.asarray(timestamps.cpu() if isinstance(timestamps, torch.Tensor) else timestamps,
                    dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(f"timestamps must be a non-empty 1-D sequence, got shape {ts.shape}")
    if not np.all(np.isfinite(ts)):
        raise ValueError("timestamps contain NaN or infinite values")
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    targets = start + np.arange(count, dtype=np.float64) / rate
    # "first frame in decode order reaching t" == first index where the running maximum reaches t
    reached = np.maximum.accumulate(ts)
    idx = np.searchsorted(reached, targets - TIME_TOLERANCE, side="left")
    return np.minimum(idx, ts.size - 1).astype(np.int64)


def _as_uint8_frames(frames, timestamps) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a numpy array or torch tensor, "
                        f"got {type(frames).__name__}")
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 RGB of shape (T, H, W, 3), got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("no frames given")
    n_ts = len(timestamps)
    if n_ts != frames.shape[0]:
        raise ValueError(f"{frames.shape[0]} frames but {n_ts} timestamps")
    return frames


def resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 (N, 3, H, W) images to ``size`` = (h, w), uint8 out."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=list(size), mode="bicubic", align_corners=False,
                         antialias=True)


def _selected(frames, timestamps, duration: float, rate: float, start: float):
    if not duration > 0:
        raise ValueError(f"duration must be positive, got {duration}")
    frames = _as_uint8_frames(frames, timestamps)
    idx = select_frames(timestamps, rate, frame_count(duration, rate), start=start)
    unique, inverse = np.unique(idx, return_inverse=True)
    # (N, H, W, 3) -> (N, 3, H, W) as a channels-last view, the layout MMAudio hands torchvision
    images = frames[torch.from_numpy(unique)].permute(0, 3, 1, 2)
    return images, torch.from_numpy(inverse.reshape(-1))


def clip_frames(frames, timestamps, duration: float, *, start: float = 0.0) -> torch.Tensor:
    """Decoded uint8 frames (T, H, W, 3) -> CLIP input (int(duration * 8), 3, 384, 384)
    in [0, 1]."""
    images, inverse = _selected(frames, timestamps, duration, CLIP_FPS, start)
    images = resize_uint8(images, (CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE))
    return images[inverse].to(torch.float32).mul_(1.0 / 255).contiguous()


def short_side_size(height: int, width: int, short: int = SYNC_IMAGE_SIZE) -> tuple[int, int]:
    """(h, w) after resizing the short side to ``short`` (torchvision's rounding down)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def centre_crop_offsets(height: int, width: int, size: int = SYNC_IMAGE_SIZE) -> tuple[int, int]:
    """(top, left) of a centred ``size`` crop, rounded half to even as torchvision."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def sync_frames(frames, timestamps, duration: float, *, start: float = 0.0) -> torch.Tensor:
    """Decoded uint8 frames (T, H, W, 3) -> Synchformer input (int(duration * 25), 3, 224, 224)
    in [-1, 1]."""
    images, inverse = _selected(frames, timestamps, duration, SYNC_FPS, start)
    h, w = short_side_size(*images.shape[-2:])
    images = resize_uint8(images, (h, w))
    top, left = centre_crop_offsets(h, w)
    images = images[..., top:top + SYNC_IMAGE_SIZE, left:left + SYNC_IMAGE_SIZE]
    unit = images[inverse].to(torch.float32).mul_(1.0 / 255)
    return unit.sub_(0.5).div_(0.5).contiguous()
