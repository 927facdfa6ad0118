"""Video frames resized on the TensorRT backend's GPU, by the model's frame-resize engines.

The engines (``resize_engine.engine_graph``, built by ``mmsep-export`` beside the stage engines:
one takes RGB frames, one the decoder's yuv420p planes with their conversion's tables) take any
resolution within their profile; the bands of each resolution, and the tables of each
conversion, are made on the host once and kept on the device. A window's frames are uploaded as
uint8, at most ``MAX_FRAMES`` per engine call, each call's frames gathered straight into a
page-locked staging buffer of its own and copied into a device slot of its own (so nothing is
rewritten before the stream has read it).
The Synchformer frames are resized once each; the overlapping segments are then assembled by
device-to-device copies.

``run`` is called from the video producer threads while the backend works on the previous window
on its own stream: the resizer has its own stream, execution contexts and memory, pushes the
shared CUDA context for the call, runs one call at a time (several requests' producers share it
in ``process_many``) and synchronises its stream before it returns. Each video being read has a
lane of its own (``open_lane``), and a lane's outputs are ``DeviceArray`` views of its own ring
of ``RING`` output buffer sets: a window's inputs stay valid while the next ``RING - 1`` windows
of the same video are resized, which covers the one window that ``PrefetchedWindows`` makes
ahead, however many other videos are resized meanwhile. Lanes are reused (the lowest free one),
so the output memory grows with the videos read at once, not with the videos read in all.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np

from ..errors import BackendError
from ..pixels import RGB_INPUT, YUV_PLANES, YuvFrames
from ..resize_engine import ENGINE_NAMES, MAX_FRAMES, OUTPUT_NAME, engine_inputs, fits, \
    input_names, table_inputs
from .cuda_memory import CudaMemory, DeviceArray, in_context

RING = 3  # output buffer sets in turn


class TrtFrameResizer:
    """Both model inputs of a window from its uint8 frames, on the backend's GPU: the same
    contract as ``resize.FrameResizer.run`` (outputs float32 (clip_frames, 3, S, S) and
    (segments, segment_frames, 3, S', S'), here ``DeviceArray``s). ``engines``: the RGB engine
    under False and, where built, the yuv420p engine under True."""

    def __init__(self, trt, cuda, context, engines: dict, clip_size: int, sync_size: int):
        self._context = context  # the backend's; current only while a method runs
        self.sizes = {"clip": clip_size, "sync": sync_size}
        self.takes_yuv = True in engines  # else YUV frames are converted on the host
        self._engines = engines  # they outlive their execution contexts
        self._exec = {}
        for yuv, engine in engines.items():
            _check_engine(trt, engine, yuv)
            self._exec[yuv] = engine.create_execution_context()
            if self._exec[yuv] is None:
                raise BackendError(ENGINE_NAMES[yuv], "TensorRT could not create an execution "
                                                      "context (out of GPU memory?)")
        self.memory = CudaMemory(cuda)
        self._fixed: dict[tuple, dict[str, DeviceArray]] = {}  # bands, conversion tables
        self._lock = threading.Lock()
        self._lanes: dict[int, int] = {}  # open lane -> runs so far

    def open_lane(self) -> int:
        """A lane for one video's windows (see the module docstring); ``close_lane`` it."""
        with self._lock:
            lane = next(i for i in itertools.count() if i not in self._lanes)
            self._lanes[lane] = 0
            return lane

    def close_lane(self, lane: int) -> None:
        with self._lock:
            self._lanes.pop(lane, None)

    def accepts(self, height: int, width: int) -> bool:
        """Whether the engine's profile takes frames of this size (else: resize on the host)."""
        return all(fits(stream, height, width, self.sizes[stream]) for stream in self.sizes)

    @in_context
    def run(self, frames, clip_index: np.ndarray, sync_index: np.ndarray, lane: int = 0):
        """(clip, segments) from a window's distinct frames and the rows of them that each
        model input picks (see ``resize.FrameResizer``), in ``lane``'s ring. ``frames``:
        ``pixels.YuvFrames`` (where ``takes_yuv``), or uint8 RGB, an array (U, H, W, 3) or a
        list of U frames (a list is not stacked on the host)."""
        with self._lock:
            runs = self._lanes.get(lane, 0)
            self._lanes[lane] = runs + 1
            return self._run(frames, clip_index, sync_index, (lane, runs % RING))

    def _run(self, frames, clip_index: np.ndarray, sync_index: np.ndarray, slot: tuple):
        pixels = _pixel_inputs(frames)
        tables = None
        if isinstance(frames, YuvFrames):
            if not self.takes_yuv:
                raise BackendError(ENGINE_NAMES[True], "this model has no yuv420p frame-resize "
                                                       "engine")
            tables = self._upload(("tables", frames.conversion.key),
                                  lambda: table_inputs(frames.conversion))
        sync_frames, segment_index = np.unique(sync_index, return_inverse=True)
        clip = self._resize("clip", pixels, tables, np.asarray(clip_index).reshape(-1), slot)
        sync = self._resize("sync", pixels, tables, sync_frames, slot)
        segments = self._segments(sync, segment_index.reshape(np.shape(sync_index)), slot)
        self.memory.stream.synchronize()
        return clip, segments

    def _upload(self, key: tuple, make) -> dict[str, DeviceArray]:
        """The arrays ``make()`` returns, made and uploaded once per ``key`` and kept."""
        uploaded = self._fixed.get(key)
        if uploaded is None:
            uploaded = {}
            for name, value in make().items():
                ptr = self.memory.alloc(value.nbytes)
                self.memory.put(ptr, value, key=(*key, name))
                uploaded[name] = DeviceArray(ptr, value.shape, value.dtype)
            self._fixed[key] = uploaded
        return uploaded

    def _resize(self, stream: str, pixels: dict, tables: dict | None, rows: np.ndarray,
                slot: tuple) -> DeviceArray:
        """The frames ``rows`` resized for one model input (every engine call uploads its frames'
        planes), into the ring slot's output buffer."""
        first_plane = next(iter(pixels.values()))[0]
        height, width = first_plane.shape[:2]
        size = self.sizes[stream]
        item = 3 * size * size * np.dtype(np.float32).itemsize
        out = self.memory.buffer(("out", stream, slot), len(rows) * item)
        bands = self._upload((stream, height, width),
                             lambda: engine_inputs(stream, height, width, size))
        fixed = {**bands, **(tables or {})}
        for first in range(0, len(rows), MAX_FRAMES):
            chunk = rows[first:first + MAX_FRAMES]
            inputs = dict(fixed)
            for name, planes in pixels.items():
                key = (name, stream, first // MAX_FRAMES)
                ptr = self.memory.buffer(key, len(chunk) * planes[0].nbytes)
                self.memory.put_rows(ptr, [planes[row] for row in chunk], key)
                inputs[name] = DeviceArray(ptr, (len(chunk), *planes[0].shape),
                                           np.dtype(np.uint8))
            self._enqueue(tables is not None, inputs, out + first * item,
                          (len(chunk), 3, size, size))
        return DeviceArray(out, (len(rows), 3, size, size), np.dtype(np.float32))

    def _enqueue(self, yuv: bool, inputs: dict[str, DeviceArray], out: int,
                 shape: tuple) -> None:
        """One call of the engine (the yuv420p one where ``yuv``) on the resizer's stream."""
        context, engine = self._exec[yuv], ENGINE_NAMES[yuv]

        def need(ok, what: str) -> None:
            if not ok:
                raise BackendError(engine, f"TensorRT could not {what}")

        for name, value in inputs.items():
            need(context.set_input_shape(name, value.shape),
                 f"set the shape of input {name!r} to {value.shape}")
            need(context.set_tensor_address(name, value.ptr), f"bind input {name!r}")
        got = tuple(int(d) for d in context.get_tensor_shape(OUTPUT_NAME))
        if got != shape:
            raise BackendError(engine, f"output would have shape {got}, expected {shape}")
        need(context.set_tensor_address(OUTPUT_NAME, out), "bind the output")
        need(context.execute_async_v3(self.memory.stream.handle), "enqueue the engine")

    def _segments(self, sync: DeviceArray, index: np.ndarray, slot: tuple) -> DeviceArray:
        """(segments, segment_frames, ...) from the resized Synchformer frames, one copy per run
        of consecutive frames."""
        item = sync.nbytes // max(sync.shape[0], 1)
        out = self.memory.buffer(("segments", slot), index.size * item)
        flat = index.reshape(-1)
        start = 0
        for stop in range(1, flat.size + 1):
            if stop == flat.size or flat[stop] != flat[stop - 1] + 1:
                self.memory.copy(out + start * item, sync.ptr + int(flat[start]) * item,
                                 (stop - start) * item)
                start = stop
        return DeviceArray(out, (*index.shape, *sync.shape[1:]), sync.dtype)

    def release(self) -> None:
        """Free the device memory (the backend's context must be current)."""
        self._fixed.clear()
        self._exec.clear()
        self._engines.clear()
        self.memory.release()


def _check_engine(trt, engine, yuv: bool) -> None:
    """The engine's tensors against the resize graph's: names, uint8 pixels, float32 output."""
    name = ENGINE_NAMES[yuv]
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    wanted = {*input_names(yuv), OUTPUT_NAME}
    if names != wanted:
        raise BackendError(name, f"engine tensors {sorted(names)} differ from the resize "
                                 f"graph's {sorted(wanted)}")
    for tensor in (*(YUV_PLANES if yuv else (RGB_INPUT,)), OUTPUT_NAME):
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor)))
        want = np.dtype(np.float32 if tensor == OUTPUT_NAME else np.uint8)
        if dtype != want:
            raise BackendError(name, f"engine tensor {tensor!r} is {dtype}, the resize graph's "
                                     f"is {want}")


def _pixel_inputs(frames) -> dict:
    """The engine's pixel inputs, each a sequence of per-frame arrays."""
    if isinstance(frames, YuvFrames):
        return {plane: getattr(frames, plane) for plane in YUV_PLANES}
    if any(f.dtype != np.uint8 or f.shape != frames[0].shape for f in frames):
        raise BackendError(ENGINE_NAMES[False], "frames must be uint8 and of one size")
    return {RGB_INPUT: frames}
