"""Pixels of decoded video frames: RGB through swscale, or the decoder's own YUV planes.

The host path converts every selected frame to RGB with swscale (``rgb``). A backend that resizes
on its device can take the yuv420p planes instead (``yuv_frame``): half the bytes to copy and
upload, and no conversion on the host, which at 720p costs about as much as decoding. The device
must then convert exactly as swscale would, or the model inputs would depend on the backend.

swscale's unscaled yuv420p -> rgb24 conversion is measured rather than assumed (it depends on
FFmpeg's build, the CPU's SIMD path, and the frame's colour space and range). On x86 it is
additive: each output channel is ``clamp(luma[Y] + blue[U] + red[V], 0, 255)`` with integer
tables and the chroma sample of the pixel's 2 x 2 block. ``measure_conversion`` recovers the
three tables from two calibration frames that cover every (Y, U) and (Y, V) pair, then checks
the model bit for bit against swscale on frames of the stream's own size (random pixels, and
every (U, V) pair). Where the model does not hold (another SIMD path, another build), the
conversion is None and the frames take the RGB path: the device path is an optimisation, never a
change of pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

CALIBRATION_ROWS = 64  # chroma rows of a calibration frame: 4 luma values per 2 x 2 block
YUV_PLANES = ("luma", "cb", "cr")  # the plane fields of YuvFrame / YuvFrames, in plane order
RGB_INPUT = "frames"  # the resize graphs' input of RGB frames; YUV_PLANES name the others


def chroma_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of a yuv420p frame's chroma planes: one sample per 2 x 2 block, the last
    row and column of odd sizes included."""
    return (height + 1) // 2, (width + 1) // 2


def rgb(frame, reformatter=None) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of a decoded PyAV frame (turned upright, ``quarter_turns``) or
    an array frame.

    Pass one ``av.video.reformatter.VideoReformatter`` for a stream of frames: it keeps its
    swscale context, where ``frame.to_ndarray(format="rgb24")`` builds a new one per frame (same
    pixels, about 30 times slower at small sizes).
    """
    if isinstance(frame, np.ndarray):
        return frame
    turns = quarter_turns(frame)
    if reformatter is None:
        pixels = frame.to_ndarray(format="rgb24")
    elif frame.format.name == "yuv420p":
        # same pixels as the default (bilinear) flag for this unscaled conversion, 2-3x faster
        from av.video.reformatter import Interpolation

        pixels = reformatter.reformat(frame, format="rgb24",
                                      interpolation=Interpolation.POINT).to_ndarray()
    else:
        pixels = reformatter.reformat(frame, format="rgb24").to_ndarray()
    return np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels


def quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that show a decoded frame upright, as a player does: a
    phone's portrait video is often stored landscape with a display rotation (the container's
    display matrix, ``frame.rotation``); 0 for other angles and for PyAV without it."""
    angle = getattr(frame, "rotation", 0) or 0
    return (int(angle) // 90) % 4 if int(angle) % 90 == 0 else 0


@dataclass(frozen=True, eq=False)
class YuvConversion:
    """swscale's yuv420p -> rgb24 for one (colour space, colour range), as measured.

    ``luma``, ``blue`` and ``red``: (256, 3) int32 tables indexed by Y, U (Cb) and V (Cr); RGB
    channel c of a pixel is ``clamp(luma[Y, c] + blue[U, c] + red[V, c], 0, 255)``.
    """

    key: tuple[int, int]  # (colorspace, color_range) of the frames it converts
    luma: np.ndarray = field(repr=False)
    blue: np.ndarray = field(repr=False)
    red: np.ndarray = field(repr=False)

    def to_rgb(self, luma: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
        """uint8 (..., H, W, 3) from planes (..., H, W) and (..., ceil(H/2), ceil(W/2))."""
        height, width = luma.shape[-2:]
        chroma = self.blue[cb] + self.red[cr]
        chroma = np.repeat(np.repeat(chroma, 2, axis=-2), 2, axis=-3)[..., :height, :width, :]
        return np.clip(self.luma[luma] + chroma, 0, 255).astype(np.uint8)


class YuvFrame(NamedTuple):
    """One decoded yuv420p frame's planes (views of the decoder's frame, which they keep alive)
    and its conversion."""

    luma: np.ndarray  # (H, W) uint8
    cb: np.ndarray  # (ceil(H/2), ceil(W/2)) uint8
    cr: np.ndarray
    conversion: YuvConversion

    @property
    def size(self) -> tuple[int, int]:
        return self.luma.shape

    def rgb(self) -> np.ndarray:
        return self.conversion.to_rgb(self.luma, self.cb, self.cr)


class YuvFrames(NamedTuple):
    """A batch of same-size ``YuvFrame`` planes, stacked for one upload."""

    luma: np.ndarray  # (N, H, W) uint8
    cb: np.ndarray  # (N, ceil(H/2), ceil(W/2)) uint8
    cr: np.ndarray
    conversion: YuvConversion

    @classmethod
    def stack(cls, frames: list[YuvFrame], reuse: dict | None = None) -> YuvFrames:
        """The frames' planes stacked. With ``reuse`` (a dict the caller keeps), they are
        written into arrays kept there from call to call, valid until the next call: a window's
        upload is a few hundred MB at 720p, and fresh pages cost more than the copy."""
        planes = []
        for index, name in enumerate(YUV_PLANES):
            shape = (len(frames), *frames[0][index].shape)
            buffer = None if reuse is None else reuse.get(name)
            if buffer is None or buffer.shape[1:] != shape[1:] or len(buffer) < len(frames):
                buffer = np.empty(shape, np.uint8)
                if reuse is not None:
                    reuse[name] = buffer
            planes.append(np.stack([f[index] for f in frames], out=buffer[:len(frames)]))
        return cls(*planes, frames[0].conversion)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.luma.shape

    def rgb(self) -> np.ndarray:
        return self.conversion.to_rgb(self.luma, self.cb, self.cr)


def yuv_frame(frame) -> YuvFrame | None:
    """The planes of a decoded PyAV frame when it is yuv420p and swscale's conversion of it is
    measured exactly (``conversion_for``); None otherwise (use ``rgb``)."""
    if isinstance(frame, np.ndarray) or frame.format.name != "yuv420p" or quarter_turns(frame):
        return None  # a rotated frame is turned upright on the host (``rgb``)
    conversion = conversion_for(int(frame.colorspace), int(frame.color_range), frame.height,
                                frame.width)
    if conversion is None:
        return None
    return YuvFrame(*(_plane_view(plane) for plane in frame.planes), conversion)


def _plane_view(plane) -> np.ndarray:
    """(height, width) view of a plane's rows (each ``line_size`` bytes, padding included)."""
    rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, :plane.width]


@functools.lru_cache(maxsize=16)
def conversion_for(colorspace: int, color_range: int, height: int,
                   width: int) -> YuvConversion | None:
    """The measured conversion of (colour space, range), checked at this frame size; None where
    swscale does not follow the additive model there, or refuses these tags (then so does the
    RGB path, which reports it)."""
    try:
        conversion = measure_conversion(colorspace, color_range)
        if conversion is None:
            return None
        rng = np.random.default_rng(height * 100_003 + width)
        planes = _random_planes(rng, height, width)
        return conversion if _matches_swscale(conversion, planes, colorspace, color_range) \
            else None
    except (OSError, ValueError):  # PyAV's FFmpeg errors derive from these
        return None


@functools.lru_cache(maxsize=8)
def measure_conversion(colorspace: int, color_range: int) -> YuvConversion | None:
    """swscale's tables for (colour space, range), or None where the additive model fails."""
    observed = {chroma: _calibrate(chroma, colorspace, color_range) for chroma in ("cb", "cr")}
    tables = [_solve_channel(observed["cb"][..., c], observed["cr"][..., c]) for c in range(3)]
    if any(t is None for t in tables):
        return None
    luma, blue, red = (np.stack([t[i] for t in tables], axis=1).astype(np.int32)
                       for i in range(3))
    conversion = YuvConversion((colorspace, color_range), luma, blue, red)
    every_pair = _chroma_pairs_planes(np.random.default_rng(0))
    if not _matches_swscale(conversion, every_pair, colorspace, color_range):
        return None
    return conversion


def _swscale(planes, colorspace: int, color_range: int) -> np.ndarray:
    """What the host path (``rgb``) makes of these planes, tagged with this space and range."""
    import av
    from av.video.reformatter import VideoReformatter

    height, width = planes[0].shape
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane, values in zip(frame.planes, planes):
        _plane_view(plane)[:] = values
    frame.colorspace, frame.color_range = colorspace, color_range
    return rgb(frame, VideoReformatter())


def _calibrate(chroma: str, colorspace: int, color_range: int) -> np.ndarray:
    """(256 Y, 256 chroma, 3) swscale output with one chroma plane sweeping 0..255 along the
    columns and the other held at 128; each 2 x 2 block holds four consecutive Y values."""
    rows = CALIBRATION_ROWS
    block_row, column = np.arange(rows)[:, None], np.arange(256)[None, :]
    luma = np.empty((2 * rows, 512), np.uint8)
    offsets = ((0, 0), (0, 1), (1, 0), (1, 1))
    for k, (dy, dx) in enumerate(offsets):
        luma[2 * block_row + dy, 2 * column + dx] = 4 * block_row + k
    sweep = np.tile(np.arange(256, dtype=np.uint8), (rows, 1))
    held = np.full_like(sweep, 128)
    planes = (luma, sweep, held) if chroma == "cb" else (luma, held, sweep)
    out = _swscale(planes, colorspace, color_range).astype(np.int64)
    table = np.empty((256, 256, 3), np.int64)
    for k, (dy, dx) in enumerate(offsets):
        table[4 * np.arange(rows) + k] = out[2 * block_row + dy, 2 * column + dx]
    return table


def _solve_channel(by_cb: np.ndarray, by_cr: np.ndarray):
    """(luma, blue, red) int64 tables of one channel from its (Y, U) and (Y, V) sweeps (the
    other chroma at 128), with blue[128] = red[128] = 0; None if the sweeps are not additive.

    Only unclamped outputs (1..254) say anything: an entry is solved from any unclamped output
    whose other term is known, repeated until nothing new is learnt."""
    luma, blue, red = np.full(256, np.nan), np.full(256, np.nan), np.full(256, np.nan)
    blue[128] = red[128] = 0.0
    sweeps = [(np.where((s > 0) & (s < 255), s, np.nan), chroma)
              for s, chroma in ((by_cb, blue), (by_cr, red))]
    unknown = 3 * 256
    while True:
        for sweep, chroma in sweeps:
            for target, terms, axis in ((chroma, sweep - luma[:, None], 0),
                                        (luma, sweep - chroma[None, :], 1)):
                learnt = _agreed(terms, axis)
                if learnt is None or not _merge(target, learnt):
                    return None
        left = int(np.isnan(luma).sum() + np.isnan(blue).sum() + np.isnan(red).sum())
        if left in (0, unknown):
            break
        unknown = left
    if left:
        return None
    return luma.astype(np.int64), blue.astype(np.int64), red.astype(np.int64)


def _agreed(values: np.ndarray, axis: int) -> np.ndarray | None:
    """The value all known (non-NaN) entries along ``axis`` share, NaN where none is known;
    None if some disagree."""
    known = ~np.isnan(values)
    high = np.max(values, axis=axis, initial=-np.inf, where=known)
    low = np.min(values, axis=axis, initial=np.inf, where=known)
    found = np.isfinite(high)
    if np.any(high[found] != low[found]):
        return None
    return np.where(found, high, np.nan)


def _merge(table: np.ndarray, learnt: np.ndarray) -> bool:
    """Fill ``table``'s unknown entries from ``learnt``; False if a known entry disagrees."""
    both = ~np.isnan(table) & ~np.isnan(learnt)
    if np.any(table[both] != learnt[both]):
        return False
    np.copyto(table, learnt, where=np.isnan(table))
    return True


def _random_planes(rng, height: int, width: int):
    chroma = chroma_size(height, width)
    return (rng.integers(0, 256, (height, width), dtype=np.uint8),
            rng.integers(0, 256, chroma, dtype=np.uint8),
            rng.integers(0, 256, chroma, dtype=np.uint8))


def _chroma_pairs_planes(rng):
    """A 512 x 512 frame whose chroma samples take every (U, V) pair once, over random Y."""
    cb, cr = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    return rng.integers(0, 256, (512, 512), dtype=np.uint8), cb, cr


def _matches_swscale(conversion: YuvConversion, planes, colorspace: int,
                     color_range: int) -> bool:
    return np.array_equal(conversion.to_rgb(*planes), _swscale(planes, colorspace, color_range))
