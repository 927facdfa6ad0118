"""Audio in: decode, downmix, resample, check the mixture (writing: ``audio_writer``).

Reading tries soundfile first (WAV, FLAC, OGG, ... through libsndfile) and PyAV for anything else
(the audio track of an MP4, MP3, M4A, ...). Channels are averaged to mono and the result is
resampled to the model rate with soxr at its very-high-quality setting.

Mixture checks: NaN/Inf samples are rejected; samples outside [-1, 1] are clipped with a warning;
a mixture shorter than MIN_SECONDS or whose peak is below SILENCE_PEAK (-100 dBFS) is rejected.

Long files are not held in memory: ``MixtureStream`` scans a file once for what the checks and
the window plan need (length at the model rate, peak, non-finite and out-of-range counts), then
decodes it again block by block and hands out one window at a time, holding at most a window plus
one decoded block.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import closing
from fractions import Fraction
from pathlib import Path

import numpy as np

from .audio_writer import FORMATS, SUBTYPES, AudioWriter, output_format, write_audio  # noqa: F401
from .errors import InputError, one_line
from .media_tracks import audio_track_frames, audio_track_rate, read_audio_track
from .windows import WindowPlan

MIN_SECONDS = 0.1
MAX_GENERATED_SECONDS = 36000.0  # a generated output's longest duration (10 h)
SILENCE_PEAK = 1e-5  # -100 dBFS: below the LSB of 16-bit audio
BLOCK_FRAMES = 1 << 16  # model-rate samples a MixtureStream block makes, at most about
MIN_SOURCE_RATE = 1000  # Hz: a file stating less is damaged (and would be upsampled enormously)
QUALITY = "VHQ"


def read_audio(path: str | os.PathLike, sample_rate: int, *,
               peak: float | None = None) -> np.ndarray:
    """Mono float32 samples of the audio file (or a media file's first audio track) at
    ``sample_rate``. Values outside [-1, 1] are clipped with a warning; NaN/Inf are rejected.
    ``peak``: scale the whole file to this peak first (``prepare``). The whole file is held in
    memory: for long files use ``MixtureStream``."""
    path = _existing_file(path)
    decoded = _read_soundfile(path)
    if decoded is None:
        decoded = read_audio_track(path)
        if decoded is None:
            raise InputError(f"{path}: has no audio track")
    samples, rate = decoded
    return prepare(samples, rate, sample_rate, name=str(path), peak=peak)


def prepare(samples: np.ndarray, rate: int, sample_rate: int, *, name: str,
            peak: float | None = None) -> np.ndarray:
    """Downmixed (``samples`` (L,) or (L, channels)), checked, clipped and resampled audio.
    With ``peak`` the downmix is scaled to that peak before resampling instead of clipped (as
    training sources are; a silent one is refused)."""
    samples = np.asarray(samples)
    if samples.ndim == 2 and samples.shape[1] == 0:
        raise InputError(f"{name}: audio of shape {samples.shape} has no channels")
    if samples.ndim == 2 and 0 < samples.shape[0] < samples.shape[1]:
        raise InputError(f"{name}: audio of shape {samples.shape} has more channels than "
                         "samples; give (samples, channels), e.g. the array's .T")
    if samples.ndim == 2:
        samples = _downmix(samples)
    elif samples.ndim != 1:
        raise InputError(f"{name}: audio must be (samples,) or (samples, channels), "
                         f"got shape {samples.shape}")
    if not np.issubdtype(samples.dtype, np.floating):
        raise InputError(f"{name}: audio samples must be floating point in [-1, 1], "
                         f"got {samples.dtype}")
    samples = samples.astype(np.float32, copy=False)
    if not np.all(np.isfinite(samples)):
        _reject_nonfinite(int(np.count_nonzero(~np.isfinite(samples))), name)
    if peak is not None:
        samples = _scaled_to_peak(samples, peak, name)
    else:
        _warn_clipped(int(np.count_nonzero(np.abs(samples) > 1.0)), name, stacklevel=4)
        samples = np.clip(samples, -1.0, 1.0)
    _check_source_rate(rate, name)
    if rate != sample_rate and samples.size:
        import soxr

        samples = soxr.resample(samples, rate, sample_rate, quality=QUALITY)
        # a resampler may overshoot full-scale content by a little; that is not clipping input
        samples = np.clip(samples, -1.0, 1.0)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _check_source_rate(rate: int, name: str) -> None:
    if rate < MIN_SOURCE_RATE:
        raise InputError(f"{name}: a sample rate of {rate} Hz (below {MIN_SOURCE_RATE} Hz: a "
                         "damaged file?)")


def check_mixture(samples: np.ndarray, sample_rate: int, *, name: str) -> None:
    """Reject a mixture that is too short or silent (message states the limit)."""
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    _check_length_and_peak(samples.size, peak, sample_rate, name)


def resampled_length(frames: int, rate: int, sample_rate: int) -> int:
    """Samples soxr makes of ``frames`` at ``rate`` resampled to ``sample_rate``:
    ``floor(frames * sample_rate / rate + 1/2)``, exactly (one-shot and streamed alike)."""
    if rate == sample_rate:
        return frames
    return math.floor(Fraction(frames * sample_rate, rate) + Fraction(1, 2))


class ArrayMixture:
    """A mixture already in memory (model-rate samples), behind the ``MixtureStream`` interface."""

    def __init__(self, samples: np.ndarray, sample_rate: int, *, name: str = "mixture array"):
        self.samples = prepare(samples, sample_rate, sample_rate, name=name)
        self.sample_rate, self.name = sample_rate, name
        self.length = self.samples.size

    def check(self) -> None:
        check_mixture(self.samples, self.sample_rate, name=self.name)

    def windows(self, plan: WindowPlan) -> Iterator[tuple[int, np.ndarray]]:
        """(w, samples (window,)) for every window of ``plan``, in order."""
        _check_plan(plan, self)
        return ((w, plan.cut(self.samples, w)) for w in range(plan.count))


class MixtureStream:
    """A mixture file read in two passes, never whole.

    Construction decodes the file once (soundfile, else PyAV's first audio track) to count its
    frames and non-finite samples, samples outside [-1, 1] and the peak: NaN/Inf are rejected
    and clipping is warned about here, ``check()`` rejects a too-short or silent mixture, so all
    of that happens before any work. ``windows(plan)`` decodes it again in blocks, downmixes,
    clips, resamples with a streaming soxr resampler and yields the windows in order, equal to
    ``plan.cut(read_audio(path, sample_rate), w)``. ``max_held`` is the largest number of
    model-rate samples it has buffered (a window plus one resampled block).

    ``media``: read the file with PyAV only (a video's audio track). The silence check uses the
    peak before resampling.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int, *, name: str | None = None,
                 media: bool = False, block: int = BLOCK_FRAMES):
        self.path = _existing_file(path)
        self.name = str(self.path) if name is None else name
        self.sample_rate = sample_rate
        self.max_held = 0
        self._info = None if media else _soundfile_info(self.path)
        if self._info is not None:
            self.source_rate = int(self._info.samplerate)
        else:
            rate = audio_track_rate(self.path)
            if rate is None:
                raise InputError(f"{self.path}: has no audio track")
            self.source_rate = rate
        _check_source_rate(self.source_rate, self.name)
        # source frames per block: an upsampled block stays about ``block`` samples
        self.block = max(1, block * min(self.source_rate, sample_rate) // sample_rate)
        frames = nonfinite = over = 0
        peak = 0.0
        for block_samples in self._blocks():
            frames += block_samples.size
            finite = np.isfinite(block_samples)
            if not finite.all():
                nonfinite += int(block_samples.size - np.count_nonzero(finite))
                block_samples = block_samples[finite]
            if block_samples.size:
                magnitude = np.abs(block_samples)
                over += int(np.count_nonzero(magnitude > 1.0))
                peak = max(peak, float(magnitude.max()))
        if nonfinite:
            _reject_nonfinite(nonfinite, self.name)
        _warn_clipped(over, self.name, stacklevel=3)
        self._warn_if_short(frames)
        self.source_frames = frames
        self.peak = min(peak, 1.0)  # the samples are clipped before use
        self.length = resampled_length(frames, self.source_rate, sample_rate)

    def _warn_if_short(self, frames: int) -> None:
        """Say so when decoding ends well before the length the file's header gives (a
        truncated or damaged compressed file: the decoder stops or skips, and the output is
        that much shorter)."""
        expected = 0 if self._info is None else int(self._info.frames)
        if expected - frames > max(0.01 * expected, 0.1 * self.source_rate):
            rate = self.source_rate
            warnings.warn(f"{self.name}: {frames / rate:.2f} s decoded of the "
                          f"{expected / rate:.2f} s its header gives (truncated or damaged?); "
                          "the output is as long as what was decoded", RuntimeWarning,
                          stacklevel=3)

    def check(self) -> None:
        _check_length_and_peak(self.length, self.peak, self.sample_rate, self.name)

    def windows(self, plan: WindowPlan) -> Iterator[tuple[int, np.ndarray]]:
        """(w, samples (window,)) for every window of ``plan``, decoded as they are needed."""
        _check_plan(plan, self)
        return self._windows(plan)

    def _windows(self, plan: WindowPlan) -> Iterator[tuple[int, np.ndarray]]:
        with closing(self._resampled()) as chunks:  # the file, also when not read to the end
            held = np.zeros(0, np.float32)  # model-rate samples [held_start, held_start + size)
            held_start = 0
            for w in range(plan.count):
                start = w * plan.hop
                end = min(start + plan.window, self.length)
                fresh, have = [], held_start + held.size
                while have < end:
                    chunk = next(chunks, None)
                    if chunk is None:
                        raise InputError(f"{self.name}: the file changed while it was being read")
                    fresh.append(chunk)
                    have += chunk.size
                if fresh:
                    held = np.concatenate([held, *fresh])
                self.max_held = max(self.max_held, held.size)
                window = np.zeros(plan.window, np.float32)
                window[:end - start] = held[start - held_start:end - held_start]
                yield w, window
                drop = min((w + 1) * plan.hop, held_start + held.size) - held_start
                held, held_start = held[drop:], held_start + drop

    def _resampled(self) -> Iterator[np.ndarray]:
        """Clipped model-rate samples in chunks of about one block."""
        if self.source_rate == self.sample_rate:
            for block_samples in self._blocks():
                yield np.clip(block_samples, -1.0, 1.0)
            return
        import soxr

        resampler = soxr.ResampleStream(self.source_rate, self.sample_rate, 1, dtype="float32",
                                        quality=QUALITY)
        for block_samples in self._blocks():
            out = resampler.resample_chunk(np.clip(block_samples, -1.0, 1.0), last=False)
            if out.size:
                yield np.clip(out, -1.0, 1.0)
        out = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        if out.size:
            yield np.clip(out, -1.0, 1.0)

    def _blocks(self) -> Iterator[np.ndarray]:
        """Downmixed float32 samples at the source rate, about ``block`` frames at a time."""
        if self._info is not None:
            yield from _soundfile_blocks(self.path, self._info, self.block)
            return
        pending, size = [], 0
        for frame in audio_track_frames(self.path):
            pending.append(frame)
            size += frame.size
            if size >= self.block:
                yield np.concatenate(pending)
                pending, size = [], 0
        if pending:
            yield np.concatenate(pending)


def _check_plan(plan: WindowPlan, mixture) -> None:
    if plan.length != mixture.length or plan.sample_rate != mixture.sample_rate:
        raise ValueError(f"the plan ({plan.length} samples at {plan.sample_rate} Hz) does not "
                         f"cover the mixture ({mixture.length} at {mixture.sample_rate} Hz)")


def _check_length_and_peak(length: int, peak: float, sample_rate: int, name: str) -> None:
    seconds = length / sample_rate
    if seconds < MIN_SECONDS:
        raise InputError(f"{name}: mixture is {seconds:.3f} s long; the minimum is "
                         f"{MIN_SECONDS} s")
    if peak < SILENCE_PEAK:
        raise InputError(f"{name}: mixture is silent (peak below -100 dBFS); there is nothing "
                         "to separate")


def _reject_nonfinite(count: int, name: str) -> None:
    raise InputError(f"{name}: {count} NaN or infinite audio samples")


def _warn_clipped(count: int, name: str, *, stacklevel: int) -> None:
    if count:
        warnings.warn(f"{name}: {count} samples outside [-1, 1] were clipped",
                      stacklevel=stacklevel)


def _scaled_to_peak(samples: np.ndarray, peak: float, name: str) -> np.ndarray:
    if samples.size == 0:
        return samples  # the caller says what an empty file means to it
    found = float(np.max(np.abs(samples)))
    if found <= SILENCE_PEAK:
        raise InputError(f"{name}: silent (peak {found:.1e}, at most {SILENCE_PEAK:.0e}); "
                         f"there is no sound to scale to peak {peak}")
    return samples * np.float32(peak / found)


def _downmix(samples: np.ndarray) -> np.ndarray:
    """(L, channels) -> (L,) float32, the channel mean taken in float64."""
    return samples.mean(axis=1, dtype=np.float64).astype(np.float32)


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    return path


def _soundfile_info(path: Path):
    """libsndfile's description of ``path``, or None when it is not a format libsndfile knows."""
    import soundfile as sf

    try:
        return sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None  # try FFmpeg


def _read_soundfile(path: Path) -> tuple[np.ndarray, int] | None:
    import soundfile as sf

    info = _soundfile_info(path)
    if info is None:
        return None
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: corrupt {info.format} audio ({one_line(exc)})") from None
    return data, int(rate)


def _soundfile_blocks(path: Path, info, block: int) -> Iterator[np.ndarray]:
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:
            while True:
                data = f.read(block, dtype="float32", always_2d=True)
                if not len(data):
                    return
                yield _downmix(data)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: corrupt {info.format} audio ({one_line(exc)})") from None
