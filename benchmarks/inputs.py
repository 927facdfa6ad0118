"""Deterministic synthetic inputs shared by both pipelines: a moving-pattern video with an audio
track, a mixture (tones + noise) and text queries. Files are cached by their parameters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

QUERIES = ("a sine tone", "white noise", "a dog barking", "a violin playing", "rain on a roof",
           "a man speaking", "a car engine", "birds singing", "a drum beat", "a door slamming",
           "a piano melody", "wind blowing", "a crowd cheering", "a cat meowing", "a guitar strum",
           "water running")


@dataclass(frozen=True)
class Inputs:
    video: Path | None
    mix: Path
    duration: float


def make_inputs(cache: Path, duration: float, sample_rate: int, video_size: tuple[int, int] | None,
                seed: int = 0) -> Inputs:
    """Video (``video_size`` = (width, height), None for no video) and mixture wav of
    ``duration`` seconds, written once under ``cache`` and reused."""
    import soundfile

    from mmsep.runtime.atomic import atomic_output
    from mmsep.runtime.example import make_video, tones

    cache.mkdir(parents=True, exist_ok=True)
    mix = cache / f"mix-{duration:g}s-{sample_rate}-seed{seed}.wav"
    if not mix.exists():
        with atomic_output(mix) as tmp:
            soundfile.write(tmp, tones(duration, sample_rate, freqs=(330.0, 550.0), seed=seed),
                            sample_rate, format="WAV", subtype="FLOAT")
    video = None
    if video_size is not None:
        width, height = video_size
        video = cache / f"clip-{duration:g}s-{width}x{height}.mp4"
        if not video.exists():
            with atomic_output(video) as tmp:
                make_video(tmp, duration, fps=25, size=(height, width))
    return Inputs(video, mix, duration)


def queries(batch: int, repetition: int) -> list[str]:
    """``batch`` distinct text queries; each repetition words them differently so that no text
    feature is served from a cache filled by an earlier run."""
    if batch > len(QUERIES):
        raise ValueError(f"at most {len(QUERIES)} queries per request, got {batch}")
    return [f"{q}, take {repetition}" for q in QUERIES[:batch]]
