"""Audio in and out: decode, downmix, resample, check the mixture, write atomically.

Reading tries soundfile first (WAV, FLAC, OGG, ... through libsndfile) and PyAV for anything else
(the audio track of an MP4, MP3, M4A, ...). Channels are averaged to mono and the result is
resampled to the model rate with soxr at its very-high-quality setting.

Mixture checks (``check_mixture``): NaN/Inf samples are rejected; samples outside [-1, 1] are
clipped with a warning; a mixture shorter than MIN_SECONDS or whose peak is below SILENCE_PEAK
(-100 dBFS) is rejected.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .errors import InputError

MIN_SECONDS = 0.1
SILENCE_PEAK = 1e-5  # -100 dBFS: below the LSB of 16-bit audio
FORMATS = {"wav": "WAV", "flac": "FLAC"}
SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")


def read_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Mono float32 samples of the audio file (or a media file's first audio track) at
    ``sample_rate``. Values outside [-1, 1] are clipped with a warning; NaN/Inf are rejected."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    decoded = _read_soundfile(path)
    if decoded is None:
        decoded = read_audio_track(path)
        if decoded is None:
            raise InputError(f"{path}: has no audio track")
    samples, rate = decoded
    return prepare(samples, rate, sample_rate, name=str(path))


def prepare(samples: np.ndarray, rate: int, sample_rate: int, *, name: str) -> np.ndarray:
    """Downmixed (``samples`` (L,) or (L, channels)), checked, clipped and resampled audio."""
    samples = np.asarray(samples)
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float64)
    elif samples.ndim != 1:
        raise InputError(f"{name}: audio must be (samples,) or (samples, channels), "
                         f"got shape {samples.shape}")
    if not np.issubdtype(samples.dtype, np.floating):
        raise InputError(f"{name}: audio samples must be floating point in [-1, 1], "
                         f"got {samples.dtype}")
    samples = samples.astype(np.float32, copy=False)
    if not np.all(np.isfinite(samples)):
        bad = int(np.count_nonzero(~np.isfinite(samples)))
        raise InputError(f"{name}: {bad} NaN or infinite audio samples")
    over = int(np.count_nonzero(np.abs(samples) > 1.0))
    if over:
        warnings.warn(f"{name}: {over} samples outside [-1, 1] were clipped", stacklevel=3)
    samples = np.clip(samples, -1.0, 1.0)
    if rate != sample_rate and samples.size:
        import soxr

        samples = soxr.resample(samples, rate, sample_rate, quality="VHQ")
        # a resampler may overshoot full-scale content by a little; that is not clipping input
        samples = np.clip(samples, -1.0, 1.0)
    return np.ascontiguousarray(samples, dtype=np.float32)


def check_mixture(samples: np.ndarray, sample_rate: int, *, name: str) -> None:
    """Reject a mixture that is too short or silent (message states the limit)."""
    seconds = samples.size / sample_rate
    if seconds < MIN_SECONDS:
        raise InputError(f"{name}: mixture is {seconds:.3f} s long; the minimum is "
                         f"{MIN_SECONDS} s")
    if float(np.max(np.abs(samples))) < SILENCE_PEAK:
        raise InputError(f"{name}: mixture is silent (peak below -100 dBFS); there is nothing "
                         "to separate")


def _read_soundfile(path: Path) -> tuple[np.ndarray, int] | None:
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None  # not a format libsndfile knows: try FFmpeg
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: corrupt {info.format} audio ({_one_line(exc)})") from None
    return data, int(rate)


def read_audio_track(path: Path) -> tuple[np.ndarray, int] | None:
    """(samples (L, channels) float32, rate) of the first audio stream via PyAV, or None when
    the file has no audio stream."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable media file ({_one_line(exc)})") from None
    with container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            return None
        stream.thread_type = "AUTO"
        rate = stream.rate or stream.codec_context.sample_rate
        # planar float at the source rate and layout; resampling is soxr's job, downmixing ours
        converter = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                for out in converter.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float32))
            for out in converter.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float32))
        except (av.FFmpegError, ValueError) as exc:
            raise InputError(f"{path}: corrupt audio track ({_one_line(exc)})") from None
    if not rate:
        raise InputError(f"{path}: audio track has no sample rate")
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return samples[:, None], int(rate)


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int, *,
                format: str = "wav", subtype: str = "PCM_16", atomic: bool = True) -> Path:
    """Write mono ``audio`` (L,); PCM subtypes are clipped to [-1, 1] first.

    ``atomic``: write a temporary file beside ``path`` and rename it into place when complete
    (False when the caller manages the temporary file itself)."""
    import soundfile as sf

    path = Path(path)
    fmt = FORMATS.get(format.lower())
    if fmt is None:
        raise InputError(f"unknown output format {format!r}; choose wav or flac")
    if subtype not in SUBTYPES:
        raise InputError(f"unknown sample format {subtype!r}; choose one of {', '.join(SUBTYPES)}")
    if fmt == "FLAC" and subtype == "FLOAT":
        raise InputError("FLAC cannot store FLOAT samples; use --subtype PCM_16 or PCM_24")
    if subtype != "FLOAT":
        audio = np.clip(audio, -1.0, 1.0)
    if not atomic:
        sf.write(str(path), np.asarray(audio, np.float32), sample_rate, format=fmt,
                 subtype=subtype)
        return path
    with atomic_output(path) as tmp:
        sf.write(str(tmp), np.asarray(audio, np.float32), sample_rate, format=fmt,
                 subtype=subtype)
    return path


def _one_line(exc: BaseException) -> str:
    # FFmpeg errors carry the errno and path in str(); their strerror is the readable part
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split())[:300]
