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
