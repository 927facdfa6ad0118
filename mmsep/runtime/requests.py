"""One request's checks, output length, generation noise, timings and result, and one batch's
inputs, for the request pipeline (``many.py``)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from . import audio as audio_io
from .errors import InputError
from ..stages import GENERATION_NOISE_SCALE

TIMING_KEYS = ("decode", "features", "mix_encode", "conditioning", "sampling", "vae_decode",
               "vocode")


class Timings(dict):
    """Seconds per key (by default the stage groups, ``TIMING_KEYS``), accumulated with
    ``measure``."""

    def __init__(self, keys: Iterable[str] = TIMING_KEYS):
        super().__init__(dict.fromkeys(keys, 0.0))

    @contextmanager
    def measure(self, key: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to ``key``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self[key] += time.perf_counter() - started

    def add(self, other: dict[str, float]) -> None:
        for key, seconds in other.items():
            self[key] += seconds


@dataclass
class BatchInputs:
    """What one denoiser batch takes: per item (in batch order) its window's features (clip,
    sync and, for separation models, the mixture latent), its text's features and its initial
    noise; the sampling settings and the unconditional branch are shared by the batch."""

    windows: list[dict[str, np.ndarray]]
    text_features: list[np.ndarray]
    x0: np.ndarray  # (items, N, C)
    unconditional: dict[str, np.ndarray]
    steps: int
    cfg: float


@dataclass
class SeparationResult:
    """What a request gave: ``audio`` (one row per text, ``length`` samples at ``sample_rate``;
    ``duration`` in seconds), the ``mode`` it ran in, how many ``windows`` the input was cut
    into, the (window, text) ``items`` and the ``batches`` they ran in, ``timings`` in seconds,
    the final ``latents`` when asked for (``keep_latents``) and ``video_start``, where in the
    video file the output begins."""

    audio: np.ndarray | None  # float32 (n_texts, length); None when a sink took it
    length: int  # output samples per text
    sample_rate: int
    mode: str  # "separation" or "generation"
    windows: int
    items: int
    batches: int
    # seconds per stage group (TIMING_KEYS, each stage's own time) and, for the request as a
    # whole, "wall"; "decode_wait" and "decode_hidden" split the video's decode time into the part
    # the model waited for and the part that ran beside model work
    timings: dict[str, float] = field(default_factory=dict)
    latents: np.ndarray | None = None  # (items, N, C) final latents, window-major, if kept
    # seconds in the video's own time line where the output begins (its audio track's first
    # sample when that is the mixture, else the video stream's start; 0 without a video file)
    video_start: float = 0.0

    @property
    def duration(self) -> float:
        return self.length / self.sample_rate


NUMBER = (int, float, np.integer, np.floating)  # what a numeric option may be given as


def is_integer(value) -> bool:
    """An int or numpy integer, not a bool (to Python True is 1; never a count here)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_options(steps, cfg, seed) -> None:
    if not is_integer(steps) or not 1 <= steps <= 1000:
        raise InputError(f"steps must be an integer between 1 and 1000, got {steps!r}")
    if isinstance(cfg, bool) or not isinstance(cfg, NUMBER) or \
            not math.isfinite(cfg) or not 0.0 <= cfg <= 100.0:
        raise InputError(f"cfg must be a number between 0 and 100, got {cfg!r}")
    if not is_integer(seed) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")


def one_text(text, what: str = "text") -> str:
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"{what} is empty")
    return text


def request_texts(text) -> list[str | None]:
    """The request's text queries: [None] (no text) or one checked string per query."""
    if text is None:
        return [None]
    if isinstance(text, str):
        return [one_text(text)]
    if not isinstance(text, (list, tuple)):
        raise InputError(f"text must be a string or a list of strings, got "
                         f"{type(text).__name__}")
    texts = list(text)
    if not texts:
        raise InputError("the list of texts is empty")
    return [one_text(t) for t in texts]


GENERATED_SECONDS = (audio_io.MIN_SECONDS, audio_io.MAX_GENERATED_SECONDS)  # a generated output


def check_duration(duration) -> float:
    """A generated output's length in seconds, or InputError."""
    if isinstance(duration, bool) or not isinstance(duration, NUMBER) or \
            not _generated_length(duration):
        low, high = GENERATED_SECONDS
        raise InputError(f"duration must be a number of seconds from {low} to {high:g}, "
                         f"got {duration!r}")
    return float(duration)


def _generated_length(seconds: float) -> bool:
    low, high = GENERATED_SECONDS
    return math.isfinite(seconds) and low <= seconds <= high


def request_length(info, mixture, source, duration) -> int:
    """Output samples at the model's rate: the mixture's length; else ``duration`` seconds of
    generated audio; else the video's length; else one window."""
    sr = info.sample_rate
    if mixture is not None and duration is not None:
        raise InputError("duration sets the length of generated audio; with a mixture the "
                         "output has the mixture's length")
    if mixture is not None:
        return mixture.length
    if duration is not None:
        return round(check_duration(duration) * sr)
    if source is not None:
        if not _generated_length(source.duration):
            low, high = GENERATED_SECONDS
            raise InputError(f"{source.name}: video is {source.duration:.3f} s long; generated "
                             f"audio takes {low} to {high:g} s; choose its length (duration, "
                             "--duration)")
        return round(source.duration * sr)
    return info.window_samples


def noise_mixtures(rng, count: int, samples: int):
    """Generation mode's mixture windows: (w, white noise) drawn from ``rng`` as they are read."""
    for w in range(count):
        yield w, GENERATION_NOISE_SCALE * rng.standard_normal(samples, dtype=np.float32)
