"""Reading back synthetic media in the runtime tests (the media come from mmsep.runtime.example)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def decode_rgb(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All frames of the first video stream as uint8 (T, H, W, 3) with their timestamps (s)."""
    frames, times = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.time))
    return np.stack(frames), np.asarray(times)


def window_video_features(comps, path: Path, starts: list[float]):
    """PyTorch CLIP and Synchformer features (per window) of the video at ``path``, for windows
    starting at ``starts`` seconds: the reference the runtime's video path is checked against."""
    import torch

    from mmsep.models import video_reference as vr

    config = comps.flow.config
    frames, times = decode_rgb(path)
    clip_f, sync_f = [], []
    for start in starts:
        clip_f.append(comps.clip.encode_image(vr.clip_frames(frames, times, config.duration,
                                                             start=start)))
        sync = vr.sync_frames(frames, times, config.duration, start=start)
        index = torch.arange(config.lengths.sync_segments)[:, None] * 8 + torch.arange(16)[None]
        sync_f.append(comps.synchformer(sync[index]).flatten(0, 1))
    return clip_f, sync_f
