"""Put separated audio next to the original video: the video stream is copied packet for packet
(no re-encoding), each audio stem becomes an AAC track. Written atomically.

The stems can be arrays or audio files; files are read in half-second blocks as the encoder needs
them, so muxing a long output does not load it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .atomic import atomic_output
from .errors import InputError, OutputError, one_line
from .media_tracks import check_video_decodable, first_video_stream

# containers --mux writes, by suffix (each verified with an H.264 stream + AAC in the tests)
MUX_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
_CHUNK_SECONDS = 0.5  # audio is encoded in chunks interleaved with the video packets


def mux(video: str | os.PathLike, tracks: np.ndarray | Sequence[str | os.PathLike],
        sample_rate: int, out: str | os.PathLike, *, titles: Sequence[str | None] = (),
        bitrate: int = 192_000, atomic: bool = True, name: str | os.PathLike | None = None,
        start: float = 0.0) -> Path:
    """Copy ``video``'s first video stream into ``out`` and add ``tracks`` as AAC: float32
    samples (n, L), or the paths of n mono audio files at ``sample_rate``, beginning at
    ``start`` seconds of the video's time line (``SeparationResult.video_start``).

    The original audio tracks are not carried over. ``titles`` name the new tracks. ``atomic``:
    write beside ``out`` and rename when complete (False when the caller manages that; then
    ``name`` is the path that errors name, ``out`` being a temporary file).
    """
    out = Path(out)
    if out.suffix.lower() not in MUX_FORMATS:
        raise InputError(f"{name or out}: cannot mux to {out.suffix or 'a name without a suffix'}"
                         f"; supported: {', '.join(MUX_FORMATS)}")
    audio = _AudioOptions(sample_rate, titles, bitrate, start)
    if not atomic:
        _mux(video, tracks, audio, out, Path(name or out))
        return out
    with atomic_output(out) as tmp:
        _mux(video, tracks, audio, tmp, out)
    return out


@dataclass(frozen=True)
class _AudioOptions:
    sample_rate: int
    titles: Sequence[str | None]
    bitrate: int
    start: float  # seconds of the video's time line where the tracks begin


def check_muxable(video: str | os.PathLike, out: str | os.PathLike) -> None:
    """InputError when ``out``'s container cannot take ``video``'s video stream (found by writing
    the container's header to memory with that stream and an AAC track, as ``mux`` will), so
    that it is refused before any work instead of after it."""
    import io

    import av

    fmt = MUX_FORMATS.get(Path(out).suffix.lower())
    try:
        source = av.open(str(video))
    except (av.FFmpegError, OSError):
        return  # the video's own check reports it
    with source:
        vin = first_video_stream(source)
        if fmt is None or vin is None:
            return
        check_video_decodable(video, vin)
        try:
            with av.open(io.BytesIO(), "w", format=fmt) as sink:
                sink.add_stream_from_template(vin)
                sink.add_stream("aac", rate=48000).layout = "mono"
                sink.start_encoding()
        except (av.FFmpegError, ValueError, OSError) as exc:
            raise InputError(f"--mux {out}: {Path(out).suffix} cannot hold the video's "
                             f"{vin.codec_context.name} stream ({one_line(exc)}); use .mkv")\
                from None
        if not _has_timestamps(source.demux(vin)):
            raise InputError(f"--mux {out}: {video} has no timestamps to copy (a raw "
                             f"{vin.codec_context.name} stream?); put it in a container first")


def _has_timestamps(packets, looked_at: int = 16) -> bool:
    """Whether any of the first packets with data carries a timestamp."""
    for n, packet in enumerate(p for p in packets if p.size):
        if packet.pts is not None or packet.dts is not None:
            return True
        if n + 1 >= looked_at:
            break
    return False


def _mux(video, tracks, audio: _AudioOptions, path: Path, target: Path) -> None:
    import av

    if isinstance(tracks, np.ndarray):
        tracks = list(np.atleast_2d(np.asarray(tracks, np.float32)))
    try:
        source = av.open(str(video))
    except (av.FFmpegError, OSError) as exc:
        raise InputError(f"{video}: unreadable video ({exc})") from None
    with source:
        vin = first_video_stream(source)
        if vin is None:
            raise InputError(f"{video}: has no video stream to mux")
        try:
            sink = av.open(str(path), "w", format=MUX_FORMATS[path.suffix.lower()])
        except (av.FFmpegError, ValueError) as exc:
            raise OutputError(f"{target}: cannot write ({one_line(exc)})") from None
        try:
            _copy_and_encode(source, vin, sink, tracks, audio)
        except (av.FFmpegError, OSError) as exc:  # disk full, size limit, I/O error
            raise OutputError(f"{target}: cannot write ({one_line(exc)})") from None


def _copy_and_encode(source, vin, sink, tracks, audio: _AudioOptions) -> None:
    with sink, contextlib.ExitStack() as readers:
        vout = sink.add_stream_from_template(vin)
        encoders = []
        for k, track in enumerate(tracks):
            samples = readers.enter_context(_samples(track, audio.sample_rate))
            stream = sink.add_stream("aac", rate=audio.sample_rate)
            stream.layout = "mono"
            stream.bit_rate = audio.bitrate
            title = audio.titles[k] if k < len(audio.titles) else None
            if title:
                stream.metadata["title"] = title
            encoders.append(_AacTrack(stream, samples, audio.sample_rate, audio.start))
        for packet in _timed_packets(source.demux(vin)):
            until = (float(packet.dts * packet.time_base)
                     if packet.dts is not None and packet.time_base is not None else None)
            for enc in encoders:
                for apacket in enc.encode_until(until):
                    sink.mux(apacket)
            packet.stream = vout
            sink.mux(packet)
        for enc in encoders:
            for apacket in enc.encode_until(None):
                sink.mux(apacket)


def _timed_packets(packets) -> Iterator:
    """The video packets with a decode timestamp each, without the demuxer's end-of-stream
    marker (no data). Matroska leaves the first packets' unset where frames are reordered
    (B-frames); they are counted back from the first one set, one packet duration apart, as a
    decoder would have read them (dropping them lost the first group of pictures)."""
    unset = []
    for packet in packets:
        if packet.size == 0:
            continue
        if packet.dts is None:
            unset.append(packet)
            continue
        dts = packet.dts
        for earlier in reversed(unset):
            dts -= earlier.duration or 1
            earlier.dts = dts
        yield from unset
        unset = []
        yield packet
    yield from unset  # no packet had one: left to the muxer


@contextlib.contextmanager
def _samples(track, sample_rate: int) -> Iterator[_Samples]:
    if isinstance(track, np.ndarray):
        yield _Samples(track.size, lambda start, stop: np.asarray(track[start:stop], np.float32))
        return
    import soundfile as sf

    try:
        f = sf.SoundFile(str(track))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise InputError(f"{track}: unreadable audio ({exc})") from None
    with f:
        if f.samplerate != sample_rate or f.channels != 1:
            raise InputError(f"{track}: expected mono audio at {sample_rate} Hz, got "
                             f"{f.channels} channel(s) at {f.samplerate} Hz")

        def read(start, stop):
            if f.tell() != start:
                f.seek(start)
            return f.read(stop - start, dtype="float32")

        yield _Samples(f.frames, read)


@dataclass(frozen=True)
class _Samples:
    """A mono track of ``size`` samples; ``read(start, stop)`` returns samples [start, stop)."""

    size: int
    read: Callable[[int, int], np.ndarray]


class _AacTrack:
    def __init__(self, stream, samples: _Samples, sample_rate: int, start: float):
        self.stream, self.samples, self.rate = stream, samples, sample_rate
        self.position = 0
        self.first = round(start * sample_rate)  # the first sample's pts
        self.flushed = False

    def encode_until(self, seconds: float | None):
        """Packets for the samples up to ``seconds`` (all and the encoder flush for None)."""
        import av

        end = self.samples.size if seconds is None else \
            min(self.samples.size, int((seconds + _CHUNK_SECONDS) * self.rate) - self.first)
        step = int(_CHUNK_SECONDS * self.rate)
        while self.position < end:
            chunk = np.clip(self.samples.read(self.position, min(end, self.position + step)),
                            -1.0, 1.0)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk[None]), format="fltp",
                                               layout="mono")
            frame.sample_rate = self.rate
            frame.pts = self.first + self.position
            frame.time_base = Fraction(1, self.rate)
            self.position += chunk.size
            yield from self.stream.encode(frame)
        if seconds is None and not self.flushed:
            self.flushed = True
            yield from self.stream.encode(None)
