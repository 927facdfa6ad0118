"""Video preprocessing without torch: decode once, select frames, resize, stream window by window.

Frame selection is sample-and-hold on decoded timestamps, as ``mmsep.models.video_reference``
(the PyTorch reference the tests compare against): output ``k`` of a rate-``f`` stream of a
window starting at ``s`` is the first decoded frame whose timestamp reaches ``s + k / f`` (within
1 us), and the last frame when none does. CLIP frames are resized to 384 x 384 (aspect not kept)
with values in [0, 1]; Synchformer frames have their short side resized to 224 and are centre
cropped to 224 x 224, values in [-1, 1]. Resizing is PIL's antialiased bicubic on uint8 (what
torchvision does to uint8 tensors on the CPU; equal to the reference within one grey level).

Memory stays bounded for long videos: every decoded frame is converted to RGB and resized at
most once per stream, and only when some window selects it; decoding runs only as far as the
window being assembled needs, and a window's images are released once it has been handed out.

Where frames are resized depends on the backend. On the CPU, resizing is PIL's (most of the
preprocessing time; PIL releases the GIL while it resamples), run on a small thread pool while
decoding goes on, with a bounded number of frames in flight; the result is the same as resizing
one frame after the other. Backends that resize on their device (``resize.FrameResizer``) get
each window's distinct selected frames as one uint8 upload instead: the decoder's yuv420p planes,
converted on the device exactly as swscale would (``pixels``), or RGB where that conversion
could not be measured. ``next_images`` does the decoding and resizing and ``finish`` makes the
float inputs, so that ``prefetch`` can run the first one window ahead on a producer thread.

A video can also be given as an array: uint8 RGB frames of shape (T, H, W, 3) plus a frame rate
(``VideoSource.from_array``); frame ``i`` then has timestamp ``i / fps``.

Timestamps are on the output's time line: a file's own less ``origin``, where the output begins
in the file (``Separator._time_origin``; streams cut from longer ones often start after 0).
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..closing import Closing
from ..stages import Geometry
from .errors import InputError, one_line
from .media_tracks import check_video_decodable, first_video_stream, stream_duration, stream_start
from .pixels import YuvFrame, YuvFrames, rgb, yuv_frame
from .requests import NUMBER
from .resize import centre_crop, short_side

TIME_TOLERANCE = 1e-6  # seconds; a frame this close below a target still reaches it
HELD_WARNING_SECONDS = 0.5  # a last frame held longer than this for the output is reported
# frames longer than this many times their short side are refused: resizing the short side to
# 224 first (the reference's order) would make frames of unbounded size (3000x2: 224x336000)
MAX_ASPECT = 8


class VideoSource:
    """A video to take frames from: a file (decoded with PyAV) or an in-memory array."""

    def __init__(self, path: str | os.PathLike):
        import av

        self.path = Path(path)
        self.name = str(self.path)
        self._array: np.ndarray | None = None
        self._fps = 0.0
        self.start = 0.0  # the video stream's first timestamp, in seconds
        if not self.path.exists():
            raise InputError(f"{self.path}: file not found")
        if not self.path.is_file():
            raise InputError(f"{self.path}: not a file")
        try:
            with av.open(str(self.path)) as container:
                video = first_video_stream(container)
                self.has_audio = any(s.type == "audio" for s in container.streams)
                if video is None:
                    raise InputError(f"{self.path}: has no video stream")
                check_video_decodable(self.path, video)
                _check_aspect(self.name, video.codec_context.height, video.codec_context.width)
                self.start = stream_start(container, video)
                self.duration = stream_duration(container, video, self.start)
                rate = video.average_rate or video.guessed_rate
                self.frame_seconds = 1 / float(rate) if rate else 0.0
        except InputError:
            raise
        except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"{self.path}: unreadable video ({one_line(exc)})") from None

    @classmethod
    def from_array(cls, frames: np.ndarray, fps: float, *, name: str = "video array"):
        """uint8 RGB frames (T, H, W, 3) at ``fps`` frames per second."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or \
                0 in frames.shape[1:3]:
            raise InputError(f"{name}: frames must be uint8 RGB of shape (T, H, W, 3), H and W "
                             f"positive, got {frames.dtype} {frames.shape}")
        if frames.shape[0] == 0:
            raise InputError(f"{name}: no frames")
        _check_aspect(name, *frames.shape[1:3])
        if isinstance(fps, bool) or not isinstance(fps, NUMBER) or \
                not 0 < float(fps) < np.inf:
            raise InputError(f"{name}: a positive, finite frame rate is needed with a frame "
                             f"array (got {fps!r})")
        self = cls.__new__(cls)
        self.path, self.name, self.has_audio = None, name, False
        self._array, self._fps = frames, float(fps)
        self.start, self.frame_seconds = 0.0, 1 / self._fps
        self.duration = frames.shape[0] / self._fps
        return self

    def frames(self) -> Iterator[tuple[float, object]]:
        """(timestamp in seconds, frame) in decode order; ``pixels.rgb(frame)`` gives uint8
        (H, W, 3)."""
        if self._array is not None:
            for i in range(self._array.shape[0]):
                yield i / self._fps, self._array[i]
            return
        yield from self._decode()

    def _decode(self) -> Iterator[tuple[float, object]]:
        import av

        try:
            with av.open(str(self.path)) as container:
                stream = first_video_stream(container)
                stream.thread_type = "AUTO"  # FFmpeg frame/slice threads
                rate = float(stream.average_rate or stream.guessed_rate or 25)
                for index, frame in enumerate(container.decode(stream)):
                    time = frame.time
                    yield (index / rate if time is None else float(time)), frame
        except (av.FFmpegError, ValueError) as exc:
            raise InputError(f"{self.path}: corrupt video stream ({one_line(exc)})") from None


def _check_aspect(name: str, height: int, width: int) -> None:
    if height and width and max(height, width) > MAX_ASPECT * min(height, width):
        raise InputError(f"{name}: frames of {width}x{height} are more elongated than "
                         f"{MAX_ASPECT}:1; crop or pad the video first")


# -- resizing (uint8 in, uint8 out) ------------------------------------------------------------
def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize (PIL, Keys a = -0.5) of a uint8 RGB image."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def clip_image(image: np.ndarray, size: int) -> np.ndarray:
    return resize(image, size, size)


def sync_image(image: np.ndarray, size: int) -> np.ndarray:
    """Short side to ``size`` (long side rounded down), then a centred ``size`` crop."""
    new_h, new_w = short_side(*image.shape[:2], size)
    resized = resize(image, new_h, new_w)
    top, left = centre_crop(new_h, new_w, size)
    return resized[top:top + size, left:left + size]


# -- window streaming --------------------------------------------------------------------------
class _Stream:
    """Sample-and-hold targets of one frame rate over all windows, resolved as frames arrive."""

    def __init__(self, starts: Sequence[float], fps: float, count: int, windows: int):
        offsets = np.arange(count, dtype=np.float64) / fps
        targets = np.asarray(starts, np.float64)[:, None] + offsets[None, :]
        self.order = np.argsort(targets, axis=None, kind="stable")
        self.sorted = targets.reshape(-1)[self.order]
        self.next = 0
        self.count = count
        self.slots: list[list[Future | None]] = [[None] * count for _ in range(windows)]
        # the last target of each window: the window is complete once it is resolved
        self.last = targets.max(axis=1)

    def take(self, reached: float) -> list[int]:
        """Flat (window * count + k) indices of the targets that a frame reaching ``reached``
        resolves (all remaining ones when ``reached`` is inf)."""
        stop = int(np.searchsorted(self.sorted, reached + TIME_TOLERANCE, side="right"))
        taken = self.order[self.next:stop].tolist()
        self.next = max(self.next, stop)
        return taken

    def fill(self, flat: list[int], image: Future) -> None:
        for index in flat:
            window, k = divmod(index, self.count)
            self.slots[window][k] = image


class ResizedImages(NamedTuple):
    """One window's resized uint8 images: clip (clip_frames, S, S, 3), sync (sync_frames, S',
    S', 3)."""

    clip: np.ndarray
    sync: np.ndarray


class WindowFrames(Closing):
    """Per-window model inputs from a video, produced in window order.

    ``next_window()`` returns (clip, segments): float32 (clip_frames, 3, S, S) in [0, 1] and
    float32 (segments, segment_frames, 3, S', S') in [-1, 1] for the window starting at
    ``starts[w]`` seconds. With a ``resizer`` (``resize.FrameResizer``, for backends that resize
    on their device) frames are not resized here: the window's distinct selected frames go to
    ``resizer.run`` as uint8 and its outputs (device values) are returned instead. ``end``:
    the output's length in seconds (the last window's frames past it are padding).
    """

    def __init__(self, source: VideoSource, starts: Sequence[float], geometry: Geometry, *,
                 resizer=None, end: float = np.inf, origin: float = 0.0):
        self.geometry = g = geometry
        self.starts = list(starts)
        self._end = end
        self._origin = origin
        self._frame_seconds = source.frame_seconds
        self._clip = _Stream(self.starts, g.clip_fps, g.clip_len, len(self.starts))
        self._sync = _Stream(self.starts, g.sync_fps, g.sync_frames, len(self.starts))
        self._frames = source.frames()
        self._name = source.name
        self._resizer = resizer
        self._lane = resizer.open_lane() if resizer is not None else None
        self._reached = -np.inf
        self._last = None  # the most recent decoded frame, held past the end of the video
        self._window = 0
        self._ended = False
        self.decoded = 0
        self._reformatter = None
        if source.path is not None:
            from av.video.reformatter import VideoReformatter

            self._reformatter = VideoReformatter()
        workers = max(1, min(8, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mmsep-resize")
        self._in_flight: deque[Future] = deque()
        self._max_in_flight = 2 * workers  # full-resolution frames held by pending resizes
        self._upload_buffers: dict[str, np.ndarray] = {}  # YuvFrames.stack's, reused

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._frames.close()  # the decoder's file
        if self._resizer is not None:
            self._resizer.close_lane(self._lane)

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, resize_fn, pixels: np.ndarray, size: int) -> Future:
        while len(self._in_flight) >= self._max_in_flight:
            self._in_flight.popleft().result()
        future = self._pool.submit(resize_fn, pixels, size)
        self._in_flight.append(future)
        return future

    def _advance(self) -> bool:
        """Decode one frame and resolve the targets it reaches; False at the end."""
        try:
            stamp, frame = next(self._frames)
        except StopIteration:
            self._ended = True
            if self._last is None:
                raise InputError(f"{self._name}: no decodable video frames") from None
            self._warn_if_held()
            self._resolve(np.inf, self._last)
            return False
        self.decoded += 1
        self._reached = max(self._reached, stamp - self._origin)
        self._last = frame
        self._resolve(self._reached, frame)
        return True

    def _warn_if_held(self) -> None:
        """Say so when the output runs well past the last decoded frame (a video shorter than
        its mixture, or a truncated file): that frame then stands in for the rest."""
        needed = min(max(self._clip.sorted[-1], self._sync.sorted[-1]), self._end)
        shown_until = self._reached + self._frame_seconds  # the last frame's own time on screen
        if needed - shown_until > HELD_WARNING_SECONDS:
            warnings.warn(f"{self._name}: its frames end at {shown_until:.2f} s but the output "
                          f"needs frames up to {needed:.2f} s; the last frame stands in for the "
                          "rest", RuntimeWarning, stacklevel=2)

    def _resolve(self, reached: float, frame) -> None:
        clip, sync = self._clip.take(reached), self._sync.take(reached)
        if not clip and not sync:
            return
        pixels = self._pixels(frame)
        if self._resizer is not None:  # resized later, with the whole window
            held = Future()
            held.set_result(pixels)
            self._clip.fill(clip, held)
            self._sync.fill(sync, held)
            return
        if clip:
            self._clip.fill(clip, self._submit(clip_image, pixels, self.geometry.clip_image_size))
        if sync:
            self._sync.fill(sync, self._submit(sync_image, pixels, self.geometry.sync_image_size))

    def _pixels(self, frame):
        """What the resize takes: for a device resizer the yuv420p planes where its conversion
        holds, else RGB. A frame that swscale cannot convert is bad input."""
        try:
            if self._resizer is not None and self._resizer.takes_yuv:
                return yuv_frame(frame) or rgb(frame, self._reformatter)
            return rgb(frame, self._reformatter)
        except (OSError, ValueError) as exc:  # PyAV's FFmpeg errors derive from these
            raise InputError(f"{self._name}: cannot convert a frame to RGB "
                             f"({one_line(exc)})") from None

    def next_window(self) -> tuple:
        return self.finish(self.next_images())

    def next_images(self):
        """The next window decoded and resized: uint8 images (``ResizedImages``), or the
        resizer's outputs; ``finish`` turns them into the model inputs."""
        w = self._window
        if w >= len(self.starts):
            raise IndexError("all windows have been produced")
        needed = max(self._clip.last[w], self._sync.last[w]) - TIME_TOLERANCE
        while not self._ended and self._reached < needed:
            self._advance()
        # a frame exactly at the last target may also resolve later targets of equal time;
        # everything up to `needed` is resolved once a frame has reached it
        clip_images = [image.result() for image in self._clip.slots[w]]
        sync_images = [image.result() for image in self._sync.slots[w]]
        self._clip.slots[w] = self._sync.slots[w] = None  # release this window's references
        self._window += 1
        if self._resizer is not None:
            return self._resize_on_device(clip_images, sync_images)
        return ResizedImages(np.stack(clip_images), np.stack(sync_images))

    def finish(self, images) -> tuple:
        """(clip, segments) model inputs from what ``next_images`` returned. The float inputs
        are 13x the size of the uint8 images (segments overlap), so they are made last."""
        if not isinstance(images, ResizedImages):
            return images
        return self._inputs(images.clip, images.sync)

    def _segment_index(self) -> np.ndarray:
        g = self.geometry
        return (np.arange(g.sync_segments)[:, None] * g.sync_segment_stride
                + np.arange(g.sync_frames_per_segment)[None, :])

    def _inputs(self, clip_images: np.ndarray, sync_images: np.ndarray):
        """Float model inputs from resized uint8 (N, S, S, 3) images."""
        # C order: a transposed (strided) input would be copied once more by the backend
        clip = clip_images.transpose(0, 3, 1, 2).astype(np.float32, order="C")
        clip *= np.float32(1.0 / 255)
        # gather the overlapping segments while still uint8, then convert once
        segments = sync_images[self._segment_index()].transpose(0, 1, 4, 2, 3)
        segments = segments.astype(np.float32, order="C")
        segments *= np.float32(1.0 / 255)
        segments -= np.float32(0.5)
        segments /= np.float32(0.5)
        return clip, segments

    def _resize_on_device(self, clip_images: list, sync_images: list):
        """Upload each distinct selected frame once (uint8: the decoder's YUV planes where the
        device can convert them as swscale does, else RGB) with the indices that pick them."""
        distinct: dict[int, tuple[int, object]] = {}
        clip_index = [distinct.setdefault(id(p), (len(distinct), p))[0] for p in clip_images]
        sync_index = [distinct.setdefault(id(p), (len(distinct), p))[0] for p in sync_images]
        sync_index = np.asarray(sync_index, np.int64)[self._segment_index()]
        clip_index = np.asarray(clip_index, np.int64)
        frames = [p for _, p in distinct.values()]
        kinds = {(p.size, p.conversion.key) if isinstance(p, YuvFrame) else p.shape
                 for p in frames}
        if len(kinds) == 1 and isinstance(frames[0], YuvFrame) and \
                self._resizer.accepts(*frames[0].size):
            upload = YuvFrames.stack(frames, self._upload_buffers)
            return self._resizer.run(upload, clip_index, sync_index, self._lane)
        sizes = {p.size if isinstance(p, YuvFrame) else p.shape[:2] for p in frames}
        if len(sizes) > 1 or not self._resizer.accepts(*next(iter(sizes))):
            # the resolution changes in this window, or the device resize does not take it
            return self._resize_on_host(clip_images, sync_images, frames)
        frames = [p.rgb() if isinstance(p, YuvFrame) else p for p in frames]
        return self._resizer.run(frames, clip_index, sync_index, self._lane)

    def _resize_on_host(self, clip_images: list, sync_images: list, frames: list):
        """Both streams' images with PIL on the pool, each distinct frame converted to RGB once
        and only while the pool resizes it (a 4K window's 264 frames in RGB at once: 6.6 GB)."""
        g = self.geometry
        in_clip, in_sync = {id(p) for p in clip_images}, {id(p) for p in sync_images}

        def resized(p) -> tuple:
            image = p.rgb() if isinstance(p, YuvFrame) else p
            return (clip_image(image, g.clip_image_size) if id(p) in in_clip else None,
                    sync_image(image, g.sync_image_size) if id(p) in in_sync else None)

        done = dict(zip((id(p) for p in frames), self._pool.map(resized, frames)))
        return ResizedImages(np.stack([done[id(p)][0] for p in clip_images]),
                             np.stack([done[id(p)][1] for p in sync_images]))
