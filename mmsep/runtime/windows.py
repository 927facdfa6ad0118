"""Fixed-length windows over a long input and their equal-power crossfade join.

Window ``w`` covers samples ``[w * hop, w * hop + window)`` with ``hop = window - overlap``; there
are ``1 + ceil((length - window) / hop)`` windows (one for inputs no longer than a window), the
last one zero-padded past the input. Video frames for window ``w`` are taken from
``w * hop / sample_rate`` seconds on, so audio and video windows share their start times.

Joining: in each overlap, the earlier window fades out with ``cos`` and the later one fades in
with ``sin`` of a quarter-period ramp (equal power: ``cos^2 + sin^2 = 1``); everything else is
taken from the one window that covers it. The output is trimmed to the input length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowPlan:
    length: int  # input samples; the output has exactly this many
    window: int  # samples per window
    overlap: int  # samples shared by consecutive windows
    sample_rate: int

    def __post_init__(self):
        if self.length < 1 or self.window < 1:
            raise ValueError(f"length and window must be positive, got {self.length}, "
                             f"{self.window}")
        if not 0 <= self.overlap <= self.window // 2:
            raise ValueError(f"overlap must be in [0, window / 2] = [0, {self.window // 2}] "
                             f"samples, got {self.overlap}")

    @property
    def hop(self) -> int:
        return self.window - self.overlap

    @property
    def count(self) -> int:
        if self.length <= self.window:
            return 1
        return 1 + math.ceil((self.length - self.window) / self.hop)

    @property
    def starts(self) -> list[int]:
        return [w * self.hop for w in range(self.count)]

    @property
    def start_seconds(self) -> list[float]:
        return [s / self.sample_rate for s in self.starts]

    def cut(self, audio: np.ndarray, w: int) -> np.ndarray:
        """Window ``w`` of ``audio`` (..., length), zero-padded to ``window`` samples."""
        start = w * self.hop
        part = audio[..., start:start + self.window]
        if part.shape[-1] == self.window:
            return part
        pad = [(0, 0)] * (part.ndim - 1) + [(0, self.window - part.shape[-1])]
        return np.pad(part, pad)


def fades(overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """(fade_in, fade_out): sin and cos of a quarter period sampled at the sample centres."""
    theta = (np.arange(overlap, dtype=np.float64) + 0.5) * (np.pi / 2 / max(overlap, 1))
    return np.sin(theta).astype(np.float32), np.cos(theta).astype(np.float32)


class CrossfadeJoiner:
    """Joins one stream's windows, pushed in order; ``push`` returns the samples it finalises.

    Only the faded tail of the previous window is kept between pushes, so a long output can be
    written or collected as it is produced.
    """

    def __init__(self, plan: WindowPlan):
        self.plan = plan
        self._fade_in, self._fade_out = fades(plan.overlap)
        self._tail: np.ndarray | None = None
        self._next = 0

    @property
    def done(self) -> bool:
        return self._next == self.plan.count

    def push(self, audio: np.ndarray) -> np.ndarray:
        plan, w = self.plan, self._next
        if w >= plan.count:
            raise ValueError("all windows have been joined")
        if audio.shape != (plan.window,):
            raise ValueError(f"window audio must have shape ({plan.window},), got {audio.shape}")
        audio = np.array(audio, dtype=np.float32)
        o = plan.overlap
        if w > 0 and o:
            audio[:o] = audio[:o] * self._fade_in + self._tail
        if w < plan.count - 1:
            body = audio[:plan.window - o]
            self._tail = audio[plan.window - o:] * self._fade_out if o else None
        else:
            body = audio
            self._tail = None
        self._next += 1
        start = w * plan.hop
        return body[:max(0, min(body.size, plan.length - start))]


def join(plan: WindowPlan, windows: np.ndarray) -> np.ndarray:
    """All windows (count, window) of one stream -> (length,)."""
    joiner = CrossfadeJoiner(plan)
    return np.concatenate([joiner.push(w) for w in windows])
