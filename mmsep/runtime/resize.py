"""Video frame resizing as matrix products, for backends that resize on their own device.

PIL's antialiased bicubic resize (Keys a = -0.5, support widened by the downscale factor) is
separable: a horizontal pass then a vertical pass, each a weighted sum of input pixels with
weights that depend only on the input and output sizes. Each pass is therefore one matrix
product per frame batch, ``X @ C`` (columns) then ``R @ X`` (rows), with coefficient matrices
built on the host once per input resolution. PIL rounds to uint8 after each pass (integer
coefficients with 22 fractional bits, round half up, clamp to [0, 255]); the matrices here hold
those same integer coefficients divided by 2**22 and the passes round the same way, in float64:
every product of a grey level and a coefficient, and every partial sum, is then a multiple of
2**-22 below 2**9, exact in a double whatever the summation order, so the result equals PIL's
bit for bit. (In float32 the sums are not exact and a value near a half can tip, by up to two
grey levels after an upscale's second pass; the device graph, ``resize_graph``, gets the same
exactness in float32 by splitting each coefficient into small integer parts.) A centre crop is
folded into the matrices by keeping only the rows and columns that the crop keeps.

``ResizePlan`` holds the matrices and the value mapping of one model input (CLIP: 384 x 384,
aspect not kept, [0, 1]; Synchformer: short side 224, centre crop, [-1, 1]); ``resize_frames``
evaluates a plan with numpy; ``FrameResizer`` runs both plans of a window as one small ONNX
graph per input resolution (``resize_graph``) on an ONNX Runtime device (uint8 frames in, the
stages' float inputs out, left on the device).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .pixels import RGB_INPUT, YUV_PLANES, YuvFrames

BICUBIC_A = -0.5
# input pixels that one graph call resizes (the frames each stream picks, counted per pick):
# its float intermediates take 12-16 bytes per such pixel (measured on ONNX Runtime's CPU
# provider without its arena: 2.8 GB for the 64 + 48 picks of a 1080p window), so that a call
# holds at most 32 1080p frames (about 0.5-1 GB)
PIXELS_PER_CALL = 32 * 1920 * 1080
MAX_SESSIONS = 3  # input resolutions whose resize sessions are kept (least recently used go)
BICUBIC_SUPPORT = 2.0
PRECISION_BITS = 22  # PIL's fixed-point coefficients for 8-bit images


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = BICUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 weights of PIL's antialiased bicubic, as PIL quantises them
    for uint8 images (each row sums to ~1)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filter_scale
    weights = np.zeros((out_size, in_size), np.float64)
    for out in range(out_size):
        centre = (out + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        stop = min(int(centre + support + 0.5), in_size)
        taps = _bicubic((np.arange(first, stop) - centre + 0.5) / filter_scale)
        total = taps.sum()
        if total != 0.0:
            taps = taps / total
        # PIL rounds each coefficient half away from zero to 22 fractional bits
        fixed = np.trunc(taps * (1 << PRECISION_BITS) + np.where(taps < 0, -0.5, 0.5))
        weights[out, first:stop] = fixed / (1 << PRECISION_BITS)
    return weights


@dataclass(frozen=True)
class ResizePlan:
    """Resize (and crop) uint8 (H, W) frames to one model input, values ``q * scale + offset``
    (float32) for the resized grey level q. ``rows``: (out_h, H); ``cols``: (W, out_w);
    float64."""

    rows: np.ndarray
    cols: np.ndarray
    scale: float
    offset: float

    @property
    def out_size(self) -> tuple[int, int]:
        return self.rows.shape[0], self.cols.shape[1]


def _plan(height: int, width: int, new_h: int, new_w: int, top: int, left: int, out_h: int,
          out_w: int, scale: float, offset: float) -> ResizePlan:
    rows = bicubic_weights(height, new_h)[top:top + out_h]
    cols = bicubic_weights(width, new_w)[left:left + out_w].T
    rows, cols = (np.ascontiguousarray(m) for m in (rows, cols))
    for matrix in (rows, cols):
        matrix.setflags(write=False)  # shared by every user of the cached plan
    return ResizePlan(rows, cols, scale, offset)


@functools.lru_cache(maxsize=16)
def clip_plan(height: int, width: int, size: int) -> ResizePlan:
    """CLIP input: ``size`` x ``size`` (aspect not kept), values in [0, 1]."""
    return _plan(height, width, size, size, 0, 0, size, size, 1 / 255, 0.0)


def short_side(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the short side ``size`` and the long side rounded down (torchvision)."""
    return (int(size * height / width), size) if width <= height else \
        (size, int(size * width / height))


def centre_crop(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of a centred ``size`` crop, rounded half to even (torchvision)."""
    return round((height - size) / 2.0), round((width - size) / 2.0)


@functools.lru_cache(maxsize=16)
def sync_plan(height: int, width: int, size: int) -> ResizePlan:
    """Synchformer input: short side to ``size``, centred ``size`` crop, values in [-1, 1]."""
    new_h, new_w = short_side(height, width, size)
    top, left = centre_crop(new_h, new_w, size)
    return _plan(height, width, new_h, new_w, top, left, size, size, 2 / 255, -1.0)


def _round_grey(values: np.ndarray) -> np.ndarray:
    """PIL's rounding of a pass: half up, clamped to [0, 255] (in place)."""
    values += 0.5
    np.floor(values, out=values)
    return np.clip(values, 0, 255, out=values)


def resize_frames(frames: np.ndarray, plan: ResizePlan) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, out_h, out_w), evaluated with numpy."""
    planes = frames.transpose(0, 3, 1, 2).astype(np.float64)
    wide = _round_grey(planes @ plan.cols)
    out = _round_grey(plan.rows @ wide).astype(np.float32)
    out *= np.float32(plan.scale)
    out += np.float32(plan.offset)
    return out


class FrameResizer:
    """Both model inputs of a window from its uint8 frames, on an ONNX Runtime device.

    ``run(frames, clip_index, sync_index)``: ``frames`` the distinct frames the window selects,
    uint8 RGB (U, H, W, 3) (or a list of U frames) or their yuv420p planes
    (``pixels.YuvFrames``, converted on the device exactly as swscale converts them on the
    host); ``clip_index`` (clip_frames,) and ``sync_index`` (segments, segment_frames) pick rows
    of ``frames``. Returns (clip, segments) as OrtValues on the device: float32 (clip_frames, 3,
    S, S) and (segments, segment_frames, 3, S', S'). Only the uint8 frames and the indices are
    uploaded; each stream resizes only the frames it uses (at most 64 + 200 per 8 s window). One
    session per input resolution (and YUV conversion), the last ``MAX_SESSIONS`` kept (a service
    sees many; each session keeps its own device memory). A window whose picks hold more
    pixels than ``pixels_per_call`` is resized in several calls that write into the outputs in
    place, so that the device memory it needs does not grow with its frames' size.
    """

    takes_yuv = True  # yuv420p planes are converted on the device

    def __init__(self, ort, device: str, device_id: int, clip_size: int, sync_size: int, *,
                 lock: threading.Lock | None = None, pixels_per_call: int = PIXELS_PER_CALL):
        self._ort = ort
        self.pixels_per_call = pixels_per_call
        self._lock = lock or threading.Lock()  # the backend's: no upload during its graph capture
        self.device, self.device_id = device, device_id
        self.clip_size, self.sync_size = clip_size, sync_size
        from .backends.ort import session_providers

        self._providers = session_providers(device, device_id)
        # (height, width, YUV conversion key or None) -> session, most recently used last
        self._sessions: OrderedDict[tuple, object] = OrderedDict()
        self._gather = None  # the segment-gathering session, made on first need

    @staticmethod
    def accepts(height: int, width: int) -> bool:
        """Every resolution: a session is made for each."""
        return True

    def _session(self, frames):
        yuv = isinstance(frames, YuvFrames)
        height, width = frames.shape[1:3]
        key = (height, width, frames.conversion.key if yuv else None)
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
        else:
            from .resize_graph import resize_graph

            graph = resize_graph(clip_plan(height, width, self.clip_size),
                                 sync_plan(height, width, self.sync_size),
                                 frames.conversion if yuv else None)
            session = self._ort.InferenceSession(graph, self._session_options(),
                                                 providers=self._providers)
            self._sessions[key] = session
            if len(self._sessions) > MAX_SESSIONS:  # each holds its own device memory arena
                self._sessions.popitem(last=False)
        return session

    def close(self) -> None:
        """Release the sessions (and their device memory); a later run makes them again."""
        with self._lock:
            self._sessions.clear()
            self._gather = None

    def _session_options(self):
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        return options

    @staticmethod
    def graph_inputs(frames, clip_index: np.ndarray,
                     sync_index: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's inputs: the frames (RGB, or the three YUV planes), and the indices.
        Segments overlap, so each Synchformer frame is resized once (``sync_frames``) and the
        segments gathered from those (``segment_index``)."""
        sync_frames, segment_index = np.unique(sync_index, return_inverse=True)
        if isinstance(frames, YuvFrames):
            pixels = {name: np.ascontiguousarray(getattr(frames, name), np.uint8)
                      for name in YUV_PLANES}
        else:
            pixels = {RGB_INPUT: np.ascontiguousarray(frames, np.uint8)}
        return {**pixels,
                "clip_index": np.ascontiguousarray(clip_index, np.int64),
                "sync_frames": sync_frames.astype(np.int64),
                "segment_index": segment_index.reshape(np.shape(sync_index)).astype(np.int64)}

    @staticmethod
    def open_lane() -> int:
        """Lanes keep the outputs of different videos apart where a resizer reuses its output
        memory (TensorRT's); here every run's outputs are new values: one lane serves all."""
        return 0

    @staticmethod
    def close_lane(lane: int) -> None:
        pass

    def run(self, frames, clip_index: np.ndarray, sync_index: np.ndarray, lane: int = 0):
        if not isinstance(frames, YuvFrames):
            frames = np.asarray(frames, np.uint8)  # a list of frames is stacked here
        count, height, width = frames.shape[:3]
        parts = _parts(clip_index, np.unique(sync_index), count,
                       max(1, self.pixels_per_call // (height * width)))
        with self._lock:
            if len(parts) == 1 or np.any(np.diff(clip_index) < 0):
                return tuple(self._outputs(frames, clip_index, sync_index))
            return self._run_in_parts(frames, clip_index, sync_index, parts)

    def _outputs(self, frames, clip_index, sync_index, places: dict | None = None) -> list:
        """One graph call; ``places`` optionally maps an output to the (OrtValue, first row)
        that it is written into on the device."""
        session = self._session(frames)
        binding = session.io_binding()
        for name, value in self.graph_inputs(frames, clip_index, sync_index).items():
            binding.bind_cpu_input(name, value)
        for name in ("clip", "segments"):
            target, row = (places or {}).get(name, (None, 0))
            if target is None:
                binding.bind_output(name, self.device, self.device_id)
                continue
            shape = target.shape()
            rows = len(clip_index) if name == "clip" else sync_index.size
            row_bytes = 4 * int(np.prod(shape[1:]))
            binding.bind_output(name, self.device, self.device_id, np.float32,
                                [rows, *shape[1:]] if name == "clip" else [1, rows, *shape[1:]],
                                target.data_ptr() + row * row_bytes)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _run_in_parts(self, frames, clip_index, sync_index, parts: list[tuple[int, int]]):
        """The window in one call per frame range of ``parts``, each writing its rows of the two
        outputs in place, then the segments gathered on the device. ``clip_index`` is sorted
        (time order), so each call's clip rows are consecutive; so are its distinct
        Synchformer frames."""
        sync_frames, segment_index = np.unique(sync_index, return_inverse=True)
        clip = self._device_array((len(clip_index), 3, self.clip_size, self.clip_size))
        sync_all = self._device_array((len(sync_frames), 3, self.sync_size, self.sync_size))
        for first, stop in parts:
            clip_rows = np.searchsorted(clip_index, [first, stop])
            sync_rows = np.searchsorted(sync_frames, [first, stop])
            local_clip = np.asarray(clip_index[slice(*clip_rows)]) - first
            local_sync = (sync_frames[slice(*sync_rows)] - first).reshape(1, -1)
            # a stream with no frame here resizes frame 0 into a discarded output (its graph's
            # reshapes cannot take zero frames)
            self._outputs(_frame_range(frames, first, stop),
                          local_clip if local_clip.size else np.zeros(1, np.int64),
                          local_sync if local_sync.size else np.zeros((1, 1), np.int64),
                          {"clip": (clip if local_clip.size else None, clip_rows[0]),
                           "segments": (sync_all if local_sync.size else None, sync_rows[0])})
        if self._gather is None:
            from .resize_graph import gather_graph

            self._gather = self._ort.InferenceSession(gather_graph(), self._session_options(),
                                                      providers=self._providers)
        binding = self._gather.io_binding()
        binding.bind_ortvalue_input("sync_all", sync_all)
        binding.bind_cpu_input("segment_index",
                               segment_index.reshape(np.shape(sync_index)).astype(np.int64))
        binding.bind_output("segments", self.device, self.device_id)
        self._gather.run_with_iobinding(binding)
        return clip, binding.get_outputs()[0]

    def _device_array(self, shape: tuple[int, ...]):
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32,
                                                               self.device, self.device_id)


def _parts(clip_index: np.ndarray, sync_frames: np.ndarray, count: int,
           picks_per_call: int) -> list[tuple[int, int]]:
    """Consecutive frame ranges (first, stop) covering ``count`` frames, each picked at most
    ``picks_per_call`` times by the two streams together (clip rows, distinct Synchformer
    frames), except a single frame picked more often, which is a range of its own."""
    picks = (np.bincount(np.asarray(clip_index), minlength=count)
             + np.bincount(sync_frames, minlength=count))
    parts, first, total = [], 0, 0
    for frame, frame_picks in enumerate(picks.tolist()):
        if total + frame_picks > picks_per_call and frame > first:
            parts.append((first, frame))
            first, total = frame, 0
        total += frame_picks
    return parts + [(first, count)]


def _frame_range(frames, first: int, stop: int):
    """Frames ``first:stop`` of an RGB array or of ``YuvFrames``."""
    if isinstance(frames, YuvFrames):
        return frames._replace(luma=frames.luma[first:stop], cb=frames.cb[first:stop],
                               cr=frames.cr[first:stop])
    return frames[first:stop]
