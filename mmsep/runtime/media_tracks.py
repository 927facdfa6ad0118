"""A media file's streams through PyAV: the audio track (of an MP4, MP3, M4A, ...) decoded frame
by frame, each frame's channels averaged, AAC's end padding cut, and where it begins; where a
video stream begins and how long it lasts, from headers or packets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import InputError, one_line


def read_audio_track(path: Path) -> tuple[np.ndarray, int] | None:
    """(samples (L, channels) float32, rate) of the first audio stream via PyAV, or None when
    the file has no audio stream."""
    rate = audio_track_rate(path)
    if rate is None:
        return None
    chunks = list(audio_track_frames(path))
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return samples[:, None], rate


def _open_media(path: Path):
    import av

    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable media file ({one_line(exc)})") from None


def _first_audio_stream(container):
    return next((s for s in container.streams if s.type == "audio"), None)


ATTACHED_PIC = 0x0400  # FFmpeg's AV_DISPOSITION_ATTACHED_PIC: a cover image, not a video


def first_video_stream(container):
    """The first stream of moving pictures, None when there is none: the cover image that MP3,
    M4A and some MP4 files carry is a video stream of one picture, and is passed over."""
    return next((s for s in container.streams if s.type == "video"
                 and not int(getattr(s, "disposition", 0)) & ATTACHED_PIC), None)


def check_video_decodable(path, stream) -> None:
    """InputError when FFmpeg has no decoder for ``stream`` (PyAV then gives no codec context)."""
    if stream.codec_context is None:
        raise InputError(f"{path}: unsupported video codec (FFmpeg cannot decode it)")


def audio_track_start(path: Path) -> float:
    """Seconds in ``path``'s own time line of the first decoded sample of its first audio
    stream (the stream's start time where no frame has one; 0 where neither is known)."""
    import av

    with _open_media(path) as container:
        stream = _first_audio_stream(container)
        if stream is None:
            return 0.0
        try:
            frame = next(iter(container.decode(stream)), None)
        except (av.FFmpegError, ValueError):
            frame = None  # reading the track itself reports it
        if frame is not None and frame.time is not None:
            return float(frame.time)
        if stream.start_time is not None and stream.time_base is not None:
            return float(stream.start_time * stream.time_base)
    return 0.0


def audio_track_rate(path: Path) -> int | None:
    """Sample rate of the first audio stream, None when there is no audio stream."""
    with _open_media(path) as container:
        stream = _first_audio_stream(container)
        if stream is None:
            return None
        if stream.codec_context is None:  # FFmpeg has no decoder for it
            raise InputError(f"{path}: unsupported audio codec (FFmpeg cannot decode it)")
        rate = stream.codec_context.sample_rate
    if not rate:
        raise InputError(f"{path}: audio track has no sample rate")
    return int(rate)


def audio_track_frames(path: Path) -> Iterator[np.ndarray]:
    """The first audio stream decoded frame by frame, each frame's channels averaged (float32)."""
    import av

    with _open_media(path) as container:
        stream = _first_audio_stream(container)
        if stream is None:
            return
        stream.thread_type = "AUTO"
        # planar float at the stream's rate; resampling to the model's rate is soxr's job,
        # downmixing ours
        converter = _PlanarFloat(stream.codec_context.sample_rate or None)
        try:
            last = None  # one frame behind: the codec's end padding is cut from the last one
            for frame in container.decode(stream):
                if last is not None:
                    yield from _downmixed(converter.resample(last))
                last = frame
            tail = [] if last is None else _downmixed(converter.resample(last))
            tail += _downmixed(converter.resample(None))
            yield from _cut_from_end(tail, _end_padding(last))
        except (av.FFmpegError, ValueError) as exc:
            raise InputError(f"{path}: corrupt audio track ({one_line(exc)})") from None


class _PlanarFloat:
    """Decoded frames as planar float at ``rate`` (None: at their own). Frames at another rate
    (a capture cut and joined, a broadcast stream) are resampled to it: PyAV's resampler keeps
    the rate of the first frame it saw and passes others through, which would play them at the
    wrong speed, so each run of frames at one rate gets a resampler of its own.
    ``resample(None)`` flushes."""

    def __init__(self, rate: int | None):
        self.rate, self.input_rate, self._resampler = rate, None, None

    def resample(self, frame) -> list:
        import av

        out = []
        if frame is None or frame.sample_rate != self.input_rate:
            if self._resampler is not None:
                out += self._resampler.resample(None)
            self._resampler = None
        if frame is not None:
            if self._resampler is None:
                self.input_rate = frame.sample_rate
                self._resampler = av.AudioResampler(format="fltp", rate=self.rate)
            out += self._resampler.resample(frame)
        return out


def _downmixed(frames) -> list[np.ndarray]:
    return [frame.to_ndarray().mean(axis=0, dtype=np.float32) for frame in frames]


def _end_padding(frame) -> int:
    """Decoded samples of the last frame past its packet's duration (AAC's end padding, which
    the decoder does not drop; the track is that much shorter), else 0."""
    if frame is None or not frame.duration or frame.time_base is None or \
            frame.time_base * frame.sample_rate > 1:  # too coarse to count samples (Matroska)
        return 0
    kept = round(float(frame.duration * frame.time_base) * frame.sample_rate)
    return frame.samples - kept if 0 < kept < frame.samples else 0


def _cut_from_end(chunks: list[np.ndarray], count: int) -> list[np.ndarray]:
    while count > 0 and chunks:
        cut = min(count, len(chunks[-1]))
        chunks[-1] = chunks[-1][:len(chunks[-1]) - cut]
        count -= cut
        if not len(chunks[-1]):
            chunks.pop()
    return chunks


def stream_start(container, stream) -> float:
    """Seconds of the stream's first timestamp (the container's where the stream has none)."""
    if stream.start_time is not None and stream.time_base is not None:
        return float(stream.start_time * stream.time_base)
    return container.start_time / 1_000_000 if container.start_time is not None else 0.0


def stream_duration(container, stream, start: float) -> float:
    """Seconds the stream lasts: its header's, the container's, else found from its packets."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    # no header duration (e.g. raw streams): the last packet's end, found without decoding, or
    # where packets have no timestamps (a raw H.264 stream), their count at the stream's rate
    end, packets = None, 0
    for packet in container.demux(stream):
        packets += packet.size > 0
        if packet.pts is not None and packet.time_base is not None:
            stop = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            end = stop if end is None else max(end, stop)
    if end is not None:
        return end - start
    rate = stream.average_rate or stream.guessed_rate
    return packets / float(rate) if rate else 0.0
