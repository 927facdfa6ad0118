"""A CPU stand-in for ``tensorrt``, ``pycuda.driver`` and cuda-python's runtime API.

It lets the TensorRT backend's own logic (buffer reuse, pointer arithmetic, the double-buffered
step loop, CUDA graph capture and replay, engine checks) run where there is no GPU:

- "device memory" is host memory at real addresses; every copy and every engine read or write is
  checked to lie inside one allocation, so an address computed wrongly fails loudly;
- an "engine" file holds an ONNX graph, which the fake execution context runs with ONNX Runtime,
  reading its inputs from and writing its outputs to the bound addresses at enqueue time;
- work enqueued on a capturing stream is recorded with the addresses bound at that moment and
  replayed by ``cudaGraphLaunch``, as a real CUDA graph replays its kernels.

It is not TensorRT: numerics are those of the fp32 ONNX graphs.
"""

from __future__ import annotations

import enum
import sys
import types

import numpy as np


class FakeGpu:
    def __init__(self, *, gpu: str = "NVIDIA H100 80GB HBM3", capability=(9, 0),
                 version: str = "10.13.0", with_cudart: bool = True,
                 capture_fails: bool = False):
        self.gpu, self.capability, self.version = gpu, capability, version
        self.with_cudart, self.capture_fails = with_cudart, capture_fails
        self._memory: list[np.ndarray] = []
        self._capturing: dict[int, list] = {}
        self.counts = {"enqueues": 0, "captures": 0, "graph_launches": 0, "engines": 0}

    # -- memory ----------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> np.ndarray:
        block = np.zeros(int(nbytes), np.uint8)
        self._memory.append(block)
        return block

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        for block in self._memory:
            start = block.ctypes.data
            if start <= ptr and ptr + nbytes <= start + block.size:
                return block[ptr - start:ptr - start + nbytes]
        raise AssertionError(f"device access [{ptr:#x}, +{nbytes}) is outside every allocation")

    def submit(self, stream_handle: int, op) -> None:
        if stream_handle in self._capturing:
            self._capturing[stream_handle].append(op)
        else:
            op()

    # -- modules ---------------------------------------------------------------------------------
    def install(self, monkeypatch) -> None:
        driver = self._pycuda_driver()
        pycuda = types.ModuleType("pycuda")
        pycuda.driver = driver
        monkeypatch.setitem(sys.modules, "pycuda", pycuda)
        monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
        monkeypatch.setitem(sys.modules, "tensorrt", self._tensorrt())
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
        gpu = self
        driver = types.ModuleType("pycuda.driver")

        class Error(Exception):
            pass

        class Allocation:
            def __init__(self, nbytes):
                self._block = gpu.alloc(nbytes)

            def __int__(self):
                return self._block.ctypes.data

        class Stream:
            _next = 1

            def __init__(self):
                self.handle = Stream._next
                Stream._next += 1

            def synchronize(self):
                assert self.handle not in gpu._capturing, "synchronize during a capture"

        class Context:
            def push(self):
                pass

            def pop(self):
                pass

        class Device:
            def __init__(self, index):
                self.index = index

            @staticmethod
            def count():
                return 1

            def name(self):
                return gpu.gpu

            def compute_capability(self):
                return gpu.capability

            def retain_primary_context(self):
                return Context()

        def memcpy_htod_async(dest, src, stream=None):
            src = np.ascontiguousarray(src)
            data = src.view(np.uint8).reshape(-1).copy()
            target = int(dest)
            gpu.submit(stream.handle, lambda: gpu.view(target, data.size).__setitem__(
                slice(None), data))

        def memcpy_dtoh_async(dest, src, stream=None):
            def op():
                dest.view(np.uint8).reshape(-1)[:] = gpu.view(int(src), dest.nbytes)
            gpu.submit(stream.handle, op)

        driver.Error = Error
        driver.init = lambda: None
        driver.Device = Device
        driver.Stream = Stream
        driver.mem_alloc = Allocation
        driver.memcpy_htod_async = memcpy_htod_async
        driver.memcpy_dtoh_async = memcpy_dtoh_async
        return driver

    def _tensorrt(self):
        import onnxruntime as ort

        gpu = self
        trt = types.ModuleType("tensorrt")
        trt.__version__ = self.version

        class DataType(enum.Enum):
            FLOAT = "float32"
            INT64 = "int64"

        onnx_types = {"tensor(float)": DataType.FLOAT, "tensor(int64)": DataType.INT64}

        class Logger:
            ERROR = 1

            def __init__(self, level=None):
                self.level = level

        class Context:
            def __init__(self, engine):
                self.engine = engine
                self.shapes: dict[str, tuple] = {}
                self.addresses: dict[str, int] = {}

            def set_input_shape(self, name, shape):
                assert name in self.engine.inputs, name
                self.shapes[name] = tuple(int(d) for d in shape)
                return True

            def set_tensor_address(self, name, ptr):
                assert name in self.engine.dtypes, name
                self.addresses[name] = int(ptr)
                return True

            def get_tensor_shape(self, name):
                return self.engine.output_shape(name, self.shapes)

            def execute_async_v3(self, stream_handle):
                gpu.counts["enqueues"] += 1
                shapes, addresses = dict(self.shapes), dict(self.addresses)
                gpu.submit(stream_handle, lambda: self.engine.execute(shapes, addresses))
                return True

        class Engine:
            def __init__(self, data: bytes):
                self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
                self.inputs = [i.name for i in self.session.get_inputs()]
                self.outputs = [o.name for o in self.session.get_outputs()]
                self.dtypes = {t.name: onnx_types[t.type] for t in
                               (*self.session.get_inputs(), *self.session.get_outputs())}
                self._shape_cache: dict[tuple, dict] = {}

            @property
            def num_io_tensors(self):
                return len(self.dtypes)

            def get_tensor_name(self, i):
                return list(self.dtypes)[i]

            def get_tensor_dtype(self, name):
                return self.dtypes[name]

            def create_execution_context(self):
                return Context(self)

            def output_shape(self, name, shapes):
                key = tuple(sorted(shapes.items()))
                if key not in self._shape_cache:
                    feeds = {n: np.zeros(shapes[n], self.dtypes[n].value) for n in self.inputs}
                    values = self.session.run(None, feeds)
                    self._shape_cache[key] = {n: v.shape for n, v in zip(self.outputs, values)}
                return self._shape_cache[key][name]

            def execute(self, shapes, addresses):
                feeds = {}
                for n in self.inputs:
                    dtype = np.dtype(self.dtypes[n].value)
                    nbytes = int(np.prod(shapes[n])) * dtype.itemsize
                    feeds[n] = gpu.view(addresses[n], nbytes).view(dtype).reshape(shapes[n]).copy()
                for n, value in zip(self.outputs, self.session.run(None, feeds)):
                    value = np.ascontiguousarray(value, np.dtype(self.dtypes[n].value))
                    gpu.view(addresses[n], value.nbytes)[:] = value.view(np.uint8).reshape(-1)

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def deserialize_cuda_engine(self, data):
                if not data.startswith(b"\x08"):  # an ONNX ModelProto starts with ir_version
                    return None
                gpu.counts["engines"] += 1
                return Engine(bytes(data))

        trt.DataType = DataType
        trt.Logger = Logger
        trt.Runtime = Runtime
        trt.nptype = lambda dtype: np.dtype(dtype.value).type
        return trt

    def _cudart(self):
        gpu = self
        rt = types.ModuleType("cuda.bindings.runtime")

        class cudaError_t(enum.IntEnum):  # noqa: N801 - the real enum's name
            cudaSuccess = 0
            cudaErrorStreamCaptureUnsupported = 900

        class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
            cudaStreamCaptureModeGlobal = 0
            cudaStreamCaptureModeThreadLocal = 1

        def begin(handle, mode):
            if gpu.capture_fails:
                return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
            assert handle not in gpu._capturing
            gpu._capturing[handle] = []
            return (cudaError_t.cudaSuccess,)

        def end(handle):
            gpu.counts["captures"] += 1
            return cudaError_t.cudaSuccess, gpu._capturing.pop(handle)

        def launch(executable, handle):
            gpu.counts["graph_launches"] += 1
            for op in executable:
                gpu.submit(handle, op)
            return (cudaError_t.cudaSuccess,)

        rt.cudaError_t = cudaError_t
        rt.cudaStreamCaptureMode = cudaStreamCaptureMode
        rt.cudaStreamBeginCapture = begin
        rt.cudaStreamEndCapture = end
        rt.cudaGraphInstantiate = lambda graph, flags: (cudaError_t.cudaSuccess, list(graph))
        rt.cudaGraphLaunch = launch
        rt.cudaGraphExecDestroy = lambda executable: (cudaError_t.cudaSuccess,)
        rt.cudaGraphDestroy = lambda graph: (cudaError_t.cudaSuccess,)
        return rt

