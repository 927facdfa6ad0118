"""A CPU stand-in for ``tensorrt``, ``pycuda.driver`` and cuda-python's runtime API.

It lets the TensorRT backend's own logic (buffer reuse, pointer arithmetic, the double-buffered
step loop, CUDA graph capture and replay, engine checks) run where there is no GPU, and it refuses
what the real libraries refuse:

- "device memory" is host memory at real addresses, 256-byte aligned as cudaMalloc's is; every
  copy and every engine read or write must lie inside one allocation;
- every pycuda, TensorRT and graph call needs a current CUDA context on the calling thread, and
  context stacks are per thread, as in CUDA; ``leftover_contexts()`` counts what was not popped
  (pycuda aborts the process at exit when a stack is not empty);
- ``set_tensor_address`` returns False for an address that is not 256-byte aligned
  (``NvInferRuntime.h``: "The pointer must have at least 256-byte alignment"), for one outside
  every device allocation (where real TensorRT would fault later) and for a name the engine does
  not have; ``set_input_shape`` returns False for an unknown input and for a shape outside the
  engine's optimisation profile (its min and max, from the stage spec); ``execute_async_v3``
  returns False when an input has no shape or an I/O tensor no address, and when a CUDA error is
  pending (TensorRT checks ``cudaGetLastError`` after its launches);
- engine tensors have TensorRT's data types (FLOAT, HALF, INT8, INT32, INT64, BOOL, UINT8) and
  ``trt.nptype`` maps them to numpy's, as the real one does;
- work on a stream is asynchronous: copies and engine launches are queued and run in order when
  the stream is synchronised, and the copies queued so far also when an engine is enqueued. A
  copy from page-locked memory reads its source when it runs, so rewriting a staging buffer
  before then is caught (AssertionError); from pageable memory it reads it at once, as CUDA
  stages such copies synchronously;
- an enqueue captured before one plain enqueue at the current shapes, or a ``set_input_shape``
  while the thread is capturing, invalidates the capture: ``cudaStreamEndCapture`` then returns
  ``cudaErrorStreamCaptureInvalidated`` and that error stays pending until ``cudaGetLastError``;
- async copies from or to pageable host memory are counted (``counts["pageable_copies"]``): they
  are synchronous in effect on a real GPU; ``pagelocked_empty`` gives page-locked memory;
- ``cudaGraphInstantiate`` has cuda-python 12.x/13.x's ``(graph, flags) -> (err, exec)`` or, with
  ``cudart_api="11"``, 11.x's ``(graph, log_buffer, size) -> (err, exec, error_node)``.

An "engine" file is an ONNX graph whose metadata ``fake.profile`` gives the optimisation profile
(min and max shape per input), run with ONNX Runtime on the bound addresses at execution time. Work
enqueued on a capturing stream is recorded with the addresses bound then and replayed by
``cudaGraphLaunch``. It is not TensorRT: numerics are those of the fp32 ONNX graphs.
"""

from __future__ import annotations

import enum
import json
import shutil
import sys
import threading
import types

import numpy as np
import onnx

from mmsep.model_files import sha256_file
from mmsep.runtime.backends import factory
from mmsep.runtime.model_dir import ModelDir
from mmsep.runtime.resize_engine import ENGINE_NAMES

ALIGNMENT = 256  # cudaMalloc's alignment, and what setTensorAddress requires


class cudaError_t(enum.IntEnum):  # noqa: N801 - cuda-python's names
    cudaSuccess = 0
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1


class DriverError(Exception):  # pycuda.driver.Error
    pass


class LogicError(DriverError):
    pass


class FakeGpu:
    def __init__(self, *, gpu: str = "NVIDIA H100 80GB HBM3", capability=(9, 0),
                 version: str = "10.13.0", with_cudart: bool = True,
                 capture_fails: bool = False, cudart_api: str = "12", devices: int = 1):
        self.gpu, self.capability, self.version, self.devices = gpu, capability, version, devices
        self.with_cudart, self.capture_fails = with_cudart, capture_fails
        self.cudart_api = cudart_api
        self.sticky_error: str | None = None  # set to make every synchronize fail (e.g. 716)
        self.pending_error = None  # cudart's "last error"
        self._memory, self._pinned = [], []  # np.ndarray allocations: device, page-locked
        self._capturing: dict[int, dict] = {}
        self._queued: dict[int, list] = {}  # stream handle -> work not run yet, in order
        self._stacks: dict[int, list] = {}
        self.counts = {"enqueues": 0, "captures": 0, "graph_launches": 0, "engines": 0,
                       "pageable_copies": 0}

    # -- contexts ----------------------------------------------------------------------------------
    def stack(self) -> list:
        return self._stacks.setdefault(threading.get_ident(), [])

    def leftover_contexts(self) -> int:
        return sum(len(stack) for stack in self._stacks.values())

    def need_context(self, what: str) -> None:
        if not self.stack():
            raise LogicError(f"{what} failed: invalid device context - no currently "
                                         "active context?")

    # -- memory ------------------------------------------------------------------------------------
    def _aligned_block(self, nbytes: int, into: list) -> np.ndarray:
        raw = np.zeros(int(nbytes) + ALIGNMENT, np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
        block = raw[start:start + int(nbytes)]
        into.append(block)
        return block

    def alloc(self, nbytes: int) -> np.ndarray:
        self.need_context("cuMemAlloc")
        return self._aligned_block(nbytes, self._memory)

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        for block in self._memory:
            start = block.ctypes.data
            if start <= ptr and ptr + nbytes <= start + block.size:
                return block[ptr - start:ptr - start + nbytes]
        raise AssertionError(f"device access [{ptr:#x}, +{nbytes}) is outside every allocation")

    def is_pinned(self, array: np.ndarray) -> bool:
        start, end = array.ctypes.data, array.ctypes.data + array.nbytes
        return any(b.ctypes.data <= start and end <= b.ctypes.data + b.size for b in self._pinned)

    def capture_of_this_thread(self):
        return next((c for c in self._capturing.values()
                     if c["thread"] == threading.get_ident()), None)

    def is_device_address(self, ptr: int) -> bool:
        return any(b.ctypes.data <= ptr < b.ctypes.data + b.size for b in self._memory)

    def submit(self, stream_handle: int, op) -> None:
        if stream_handle in self._capturing:
            self._capturing[stream_handle]["ops"].append(op)
        else:
            self._queued.setdefault(stream_handle, []).append(op)

    def run_queued(self, stream_handle: int) -> None:
        """Run the stream's queued work, in order (what the GPU does before a synchronize)."""
        queue = self._queued.pop(stream_handle, [])
        for op in queue:
            op()

    # -- modules -----------------------------------------------------------------------------------
    def install(self, monkeypatch) -> None:
        driver = self._pycuda_driver()
        pycuda = types.ModuleType("pycuda")
        pycuda.driver = driver
        monkeypatch.setitem(sys.modules, "pycuda", pycuda)
        monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
        monkeypatch.setitem(sys.modules, "tensorrt", self._tensorrt())
        monkeypatch.setattr(factory, "cuda_device_problem",
                            lambda: None if self.devices else "the NVIDIA driver sees no GPU")
        if self.with_cudart:
            runtime = self._cudart()
            cuda = types.ModuleType("cuda")
            bindings = types.ModuleType("cuda.bindings")
            bindings.runtime = runtime
            cuda.bindings = bindings
            for name, module in (("cuda", cuda), ("cuda.bindings", bindings),
                                 ("cuda.bindings.runtime", runtime)):
                monkeypatch.setitem(sys.modules, name, module)
        else:
            for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime"):
                monkeypatch.setitem(sys.modules, name, None)  # import fails

    def _pycuda_driver(self):
        driver = types.ModuleType("pycuda.driver")
        bound = {"gpu": self}
        driver.Error, driver.LogicError = DriverError, LogicError
        driver.init = lambda: None
        driver.Device = type("Device", (Device,), bound)
        driver.Stream = type("Stream", (Stream,), bound)
        driver.Context = type("Context", (Context,), bound)
        driver.mem_alloc = type("DeviceAllocation", (DeviceAllocation,), bound)
        driver.pagelocked_empty = self.pagelocked_empty
        driver.memcpy_htod_async = self.memcpy_htod_async
        driver.memcpy_dtoh_async = self.memcpy_dtoh_async
        driver.memcpy_dtod_async = self.memcpy_dtod_async
        return driver

    def pagelocked_empty(self, shape, dtype, order="C", mem_flags=0):
        self.need_context("cuMemHostAlloc")
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        block = self._aligned_block(max(count * dtype.itemsize, 1), self._pinned)
        return block[:count * dtype.itemsize].view(dtype).reshape(shape, order=order)

    def memcpy_htod_async(self, dest, src, stream=None):
        self.need_context("cuMemcpyHtoDAsync")
        target, source = int(dest), np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        if not self.is_pinned(src):  # CUDA stages it before returning: the caller may reuse src
            self.counts["pageable_copies"] += 1
            source = source.copy()
        enqueued = source.copy()

        def op():
            if not np.array_equal(source, enqueued):
                raise AssertionError(f"the page-locked source of a copy to {target:#x} was "
                                     "rewritten before the copy ran (synchronise the stream "
                                     "before reusing a staging buffer)")
            self.view(target, source.size)[:] = source
        self.submit(stream.handle, op)

    def memcpy_dtoh_async(self, dest, src, stream=None):
        self.need_context("cuMemcpyDtoHAsync")
        self.counts["pageable_copies"] += not self.is_pinned(dest)

        def op():
            dest.view(np.uint8).reshape(-1)[:] = self.view(int(src), dest.nbytes)
        self.submit(stream.handle, op)

    def memcpy_dtod_async(self, dest, src, size, stream=None):
        self.need_context("cuMemcpyDtoDAsync")
        target, source, size = int(dest), int(src), int(size)

        def op():
            self.view(target, size)[:] = self.view(source, size)
        self.submit(stream.handle, op)

    def _tensorrt(self):
        from tests.runtime.backends.fake_tensorrt import tensorrt_module

        return tensorrt_module(self)

    def _cudart(self):
        gpu = self
        rt = types.ModuleType("cuda.bindings.runtime")

        def fail(err):
            gpu.pending_error = err
            return err

        def begin(handle, mode):
            gpu.need_context("cudaStreamBeginCapture")
            if gpu.capture_fails:
                return (fail(cudaError_t.cudaErrorStreamCaptureUnsupported),)
            assert handle not in gpu._capturing
            gpu._capturing[handle] = {"ops": [], "invalid": None,
                                      "thread": threading.get_ident()}
            return (cudaError_t.cudaSuccess,)

        def end(handle):
            capture = gpu._capturing.pop(handle)
            if capture["invalid"]:
                return fail(cudaError_t.cudaErrorStreamCaptureInvalidated), None
            gpu.counts["captures"] += 1
            return cudaError_t.cudaSuccess, capture["ops"]

        def get_last_error():
            err, gpu.pending_error = gpu.pending_error, None
            return (err or cudaError_t.cudaSuccess,)

        def instantiate_12(graph, flags):
            gpu.need_context("cudaGraphInstantiate")
            return cudaError_t.cudaSuccess, list(graph)

        def instantiate_11(graph, log_buffer, buffer_size):
            gpu.need_context("cudaGraphInstantiate")
            return cudaError_t.cudaSuccess, list(graph), None

        def launch(executable, handle):
            gpu.need_context("cudaGraphLaunch")
            gpu.counts["graph_launches"] += 1
            for op in executable:
                gpu.submit(handle, op)
            return (cudaError_t.cudaSuccess,)

        rt.cudaError_t = cudaError_t
        rt.cudaStreamCaptureMode = cudaStreamCaptureMode
        rt.cudaStreamBeginCapture = begin
        rt.cudaStreamEndCapture = end
        rt.cudaGetLastError = get_last_error
        rt.cudaGraphInstantiate = instantiate_11 if self.cudart_api == "11" else instantiate_12
        rt.cudaGraphLaunch = launch
        rt.cudaGraphExecDestroy = lambda executable: (cudaError_t.cudaSuccess,)
        rt.cudaGraphDestroy = lambda graph: (cudaError_t.cudaSuccess,)
        return rt


def profile_metadata(spec, max_batch: int | None = None) -> str:
    """The ``fake.profile`` metadata of a stage's fake engine: min and max shape per input (the
    spec's profile, or one up to ``max_batch``)."""
    high = spec.max_batch if max_batch is None else max_batch
    return json.dumps({t.name: [list(t.concrete(spec.min_batch)), list(t.concrete(high))]
                       for t in spec.inputs})


# -- pycuda.driver's classes; install() binds ``gpu`` to the FakeGpu in a subclass of each --------

class DeviceAllocation:
    gpu: FakeGpu

    def __init__(self, nbytes):
        self._block = self.gpu.alloc(nbytes)

    def __int__(self):
        return self._block.ctypes.data


class Stream:
    gpu: FakeGpu
    _next = 1

    def __init__(self):
        self.gpu.need_context("cuStreamCreate")
        self.handle = Stream._next
        Stream._next += 1

    def synchronize(self):
        self.gpu.need_context("cuStreamSynchronize")
        assert self.handle not in self.gpu._capturing, "synchronize during a capture"
        self.gpu.run_queued(self.handle)
        if self.gpu.sticky_error:
            raise DriverError(f"cuStreamSynchronize failed: {self.gpu.sticky_error}")


class Context:
    gpu: FakeGpu

    def push(self):
        self.gpu.stack().append(self)

    @classmethod
    def pop(cls):  # pycuda's pop is static: it pops whatever is current on this thread
        if not cls.gpu.stack():
            raise LogicError("context::pop failed: cannot pop non-current context")
        cls.gpu.stack().pop()


class Device:
    gpu: FakeGpu

    def __init__(self, index):
        self.index = index

    @classmethod
    def count(cls):
        return cls.gpu.devices

    def name(self):
        return self.gpu.gpu

    def compute_capability(self):
        return self.gpu.capability

    def retain_primary_context(self):
        return type("Context", (Context,), {"gpu": self.gpu})()


# the machine FakeGpu() describes, as device_info() reports it and a manifest records it
HERE = {"version": "10.13.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def with_engines(model_dir, out, *, profile_max_batch=None, edit=None,
                 frame_resize=(False, True), **section):
    """A copy of ``model_dir`` whose manifest lists one "engine" per stage (for the fake: the
    stage's fp32 ONNX graph, with its optimisation profile as metadata) and the frame-resize
    engines of ``frame_resize`` (False: RGB, True: yuv420p). ``profile_max_batch`` maps a stage
    to a narrower profile than its spec's; ``edit(stage, graph)`` changes a graph."""
    shutil.copytree(model_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    specs = ModelDir(out).specs
    engines = {}
    for stage, record in manifest["stages"].items():
        engine = out / f"{stage}.fp16.engine"
        graph = onnx.load(out / record["onnx"])
        if edit is not None:
            edit(stage, graph)
        high = (profile_max_batch or {}).get(stage)
        graph.metadata_props.add(key="fake.profile", value=profile_metadata(specs[stage], high))
        onnx.save(graph, engine)
        engines[stage] = {"file": engine.name, "sha256": sha256_file(engine),
                          "bytes": engine.stat().st_size}
    manifest["tensorrt"] = {"status": "built", **HERE, "precision": "fp16", "engines": engines,
                            **section}
    for yuv in frame_resize:
        name = ENGINE_NAMES[yuv]
        manifest["tensorrt"][name] = _frame_resize_engine(out / f"{name}.engine", yuv)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _frame_resize_engine(path, yuv: bool) -> dict:
    """A frame-resize "engine" (its ONNX graph with its profile's min and max) and its manifest
    record."""
    from mmsep.runtime.resize_engine import engine_graph, engine_profile

    graph = onnx.load_from_string(engine_graph(yuv))
    bounds = {name: [list(low), list(high)]
              for name, (low, _, high) in engine_profile(yuv).items()}
    graph.metadata_props.add(key="fake.profile", value=json.dumps(bounds))
    onnx.save(graph, path)
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
