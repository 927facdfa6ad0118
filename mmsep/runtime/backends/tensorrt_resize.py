"""Video frames resized on the TensorRT backend's GPU, by the model's frame-resize engine.

The engine (``resize_engine.engine_graph``, built by ``mmsep-export`` beside the stage engines)
takes any resolution within its profile; the bands of each resolution are made on the host once
and kept on the device. A window's frames are uploaded as uint8, at most ``MAX_FRAMES`` per
engine call, each call's frames gathered straight into a page-locked staging buffer of its own
and copied into a device slot of its own (so nothing is rewritten before the stream has read it).
The Synchformer frames are resized once each; the overlapping segments are then assembled by
device-to-device copies.

``run`` is called from the video producer thread while the backend works on the previous window
on its own stream: the resizer has its own stream, execution context and memory, pushes the
shared CUDA context for the call, and synchronises its stream before it returns. Its outputs are
``DeviceArray`` views of a ring of ``RING`` output buffer sets: a window's inputs stay valid
while the next ``RING - 1`` windows are resized, which covers the one window that
``PrefetchedWindows`` makes ahead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import BackendError
from ..resize_engine import INPUT_NAMES, MAX_FRAMES, OUTPUT_NAME, engine_inputs, fits
from .cuda_memory import CudaMemory, DeviceArray, in_context

RING = 3  # output buffer sets in turn
_STREAMS = ("clip", "sync")


class TrtFrameResizer:
    """Both model inputs of a window from its uint8 RGB frames, on the backend's GPU: the same
    contract as ``resize.FrameResizer.run`` (outputs float32 (clip_frames, 3, S, S) and
    (segments, segment_frames, 3, S', S'), here ``DeviceArray``s)."""

    takes_yuv = False  # the engine takes RGB; YUV frames are converted on the host

    def __init__(self, trt, cuda, context, engine, clip_size: int, sync_size: int):
        self._context = context  # the backend's; current only while a method runs
        self.sizes = {"clip": clip_size, "sync": sync_size}
        self._check_engine(trt, engine)
        self._engine = engine  # outlives its execution context
        self._exec = engine.create_execution_context()
        if self._exec is None:
            raise BackendError("frame_resize", "TensorRT could not create an execution context "
                                               "(out of GPU memory?)")
        self.memory = CudaMemory(cuda)
        self._buffers: dict[tuple, tuple[int, int]] = {}
        self._bands: dict[tuple, dict[str, DeviceArray]] = {}
        self._runs = 0

    @staticmethod
    def _check_engine(trt, engine) -> None:
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        wanted = {*INPUT_NAMES, OUTPUT_NAME}
        if names != wanted:
            raise BackendError("frame_resize", f"engine tensors {sorted(names)} differ from the "
                                               f"resize graph's {sorted(wanted)}")
        for name in ("frames", OUTPUT_NAME):
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            want = np.uint8 if name == "frames" else np.float32
            if dtype != want:
                raise BackendError("frame_resize", f"engine tensor {name!r} is {dtype}, the "
                                                   f"resize graph's is {np.dtype(want)}")

    def accepts(self, height: int, width: int) -> bool:
        """Whether the engine's profile takes frames of this size (else: resize on the host)."""
        return all(fits(stream, height, width, self.sizes[stream]) for stream in _STREAMS)

    @in_context
    def run(self, frames: Sequence[np.ndarray], clip_index: np.ndarray, sync_index: np.ndarray):
        """(clip, segments) for uint8 RGB ``frames`` (U frames (H, W, 3), an array or a list: a
        list is not stacked on the host) and the rows each input picks (see
        ``resize.FrameResizer``)."""
        if any(f.dtype != np.uint8 or f.shape != frames[0].shape for f in frames):
            raise BackendError("frame_resize", "frames must be uint8 and of one size")
        slot = self._runs % RING
        self._runs += 1
        sync_frames, segment_index = np.unique(sync_index, return_inverse=True)
        clip = self._resize("clip", frames, np.asarray(clip_index).reshape(-1), slot)
        sync = self._resize("sync", frames, sync_frames, slot)
        segments = self._segments(sync, segment_index.reshape(np.shape(sync_index)), slot)
        self.memory.stream.synchronize()
        return clip, segments

    def _buffer(self, key: tuple, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` for ``key``, kept and grown as needed."""
        ptr, size = self._buffers.get(key, (0, -1))
        if size < nbytes:
            ptr, size = self._buffers[key] = (self.memory.alloc(nbytes), nbytes)
        return ptr

    def _band_inputs(self, stream: str, height: int, width: int) -> dict[str, DeviceArray]:
        """The engine's band inputs of one model input at one resolution, uploaded once."""
        key = (stream, height, width)
        bands = self._bands.get(key)
        if bands is None:
            bands = {}
            for name, value in engine_inputs(stream, height, width, self.sizes[stream]).items():
                ptr = self.memory.alloc(value.nbytes)
                self.memory.put(ptr, value, key=("band", *key, name))
                bands[name] = DeviceArray(ptr, value.shape, value.dtype)
            self._bands[key] = bands
        return bands

    def _resize(self, stream: str, frames: Sequence[np.ndarray], rows: np.ndarray,
                slot: int) -> DeviceArray:
        """``frames[rows]`` resized for one model input, into the ring slot's output buffer."""
        height, width = frames[0].shape[:2]
        size = self.sizes[stream]
        item = 3 * size * size * np.dtype(np.float32).itemsize
        out = self._buffer(("out", stream, slot), len(rows) * item)
        bands = self._band_inputs(stream, height, width)
        for first in range(0, len(rows), MAX_FRAMES):
            chunk = rows[first:first + MAX_FRAMES]
            key = ("frames", stream, first // MAX_FRAMES)
            pixels = self._buffer(key, len(chunk) * frames[0].nbytes)
            self.memory.put_rows(pixels, [frames[row] for row in chunk], key)
            inputs = {"frames": DeviceArray(pixels, (len(chunk), *frames[0].shape),
                                            np.dtype(np.uint8)), **bands}
            self._enqueue(inputs, out + first * item, (len(chunk), 3, size, size))
        return DeviceArray(out, (len(rows), 3, size, size), np.dtype(np.float32))

    def _enqueue(self, inputs: dict[str, DeviceArray], out: int, shape: tuple) -> None:
        context = self._exec
        for name, value in inputs.items():
            self._need(context.set_input_shape(name, value.shape),
                       f"set the shape of input {name!r} to {value.shape}")
            self._need(context.set_tensor_address(name, value.ptr), f"bind input {name!r}")
        got = tuple(int(d) for d in context.get_tensor_shape(OUTPUT_NAME))
        if got != shape:
            raise BackendError("frame_resize", f"output would have shape {got}, expected {shape}")
        self._need(context.set_tensor_address(OUTPUT_NAME, out), "bind the output")
        self._need(context.execute_async_v3(self.memory.stream.handle), "enqueue the engine")

    @staticmethod
    def _need(ok, what: str) -> None:
        if not ok:
            raise BackendError("frame_resize", f"TensorRT could not {what}")

    def _segments(self, sync: DeviceArray, index: np.ndarray, slot: int) -> DeviceArray:
        """(segments, segment_frames, ...) from the resized Synchformer frames, one copy per run
        of consecutive frames."""
        item = sync.nbytes // max(sync.shape[0], 1)
        out = self._buffer(("segments", slot), index.size * item)
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
        self._buffers.clear()
        self._bands.clear()
        self._exec = self._engine = None
        self.memory.release()
