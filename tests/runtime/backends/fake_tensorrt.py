"""The ``tensorrt`` half of the CPU stand-in (see fake_gpu.py for what it models and refuses).

It also refuses what TensorRT's guide on CUDA graphs forbids: a graph replayed on an execution
context whose last plain enqueue was at other shapes (the context's shape-dependent state is no
longer the capture's; AssertionError when the replay runs), and a USER_MANAGED context enqueued
before ``set_device_memory`` gave it activation memory of the engine's size.
"""

from __future__ import annotations

import enum
import json
import types

import numpy as np

from tests.runtime.backends.fake_gpu import ALIGNMENT


class DataType(enum.IntEnum):  # tensorrt.DataType's members and values
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


_NUMPY_TYPES = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8,
                DataType.INT64: np.int64}
_ONNX_TYPES = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF,
               "tensor(int8)": DataType.INT8, "tensor(int32)": DataType.INT32,
               "tensor(bool)": DataType.BOOL, "tensor(uint8)": DataType.UINT8,
               "tensor(int64)": DataType.INT64}


class ExecutionContextAllocationStrategy(enum.IntEnum):  # TensorRT 10's members and values
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


ACTIVATION_BYTES = 4096  # what every fake engine asks for its execution context's activations


def nptype(dtype: DataType):
    """tensorrt.nptype: the numpy type of a TensorRT data type (TypeError for others)."""
    if dtype not in _NUMPY_TYPES:
        raise TypeError(f"could not resolve TensorRT datatype to an equivalent numpy datatype: "
                        f"{dtype}")
    return _NUMPY_TYPES[dtype]


def tensorrt_module(gpu):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = gpu.version
    trt.DataType = DataType
    trt.ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    trt.Logger = Logger
    trt.Runtime = type("Runtime", (Runtime,), {"gpu": gpu})
    trt.nptype = nptype
    return trt


class Logger:
    ERROR = 1

    def __init__(self, level=None):
        self.level = level


class Runtime:
    gpu = None  # set per stand-in

    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data):
        self.gpu.need_context("deserializeCudaEngine")
        if not data.startswith(b"\x08"):  # an ONNX ModelProto starts with ir_version
            return None
        self.gpu.counts["engines"] += 1
        return Engine(self.gpu, bytes(data))


class Engine:
    def __init__(self, gpu, data: bytes):
        import onnxruntime as ort

        self.gpu = gpu
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.dtypes = {t.name: _ONNX_TYPES[t.type] for t in
                       (*self.session.get_inputs(), *self.session.get_outputs())}
        meta = self.session.get_modelmeta().custom_metadata_map
        self.profile = {n: tuple(map(tuple, bounds))
                        for n, bounds in json.loads(meta["fake.profile"]).items()}
        self._shape_cache: dict[tuple, dict] = {}

    @property
    def num_io_tensors(self):
        return len(self.dtypes)

    def get_tensor_name(self, i):
        return list(self.dtypes)[i]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        self.gpu.need_context("createExecutionContext")
        return Context(self, strategy == ExecutionContextAllocationStrategy.USER_MANAGED)

    def get_device_memory_size_for_profile_v2(self, profile_index):
        assert profile_index == 0, "the fake engines have one optimisation profile"
        return ACTIVATION_BYTES

    def in_profile(self, name, shape) -> bool:
        low, high = self.profile[name]
        return len(shape) == len(low) and all(a <= s <= b for a, s, b in zip(low, shape, high))

    def output_shape(self, name, shapes):
        key = tuple(sorted(shapes.items()))
        if key not in self._shape_cache:
            feeds = {n: np.zeros(shapes[n], nptype(self.dtypes[n])) for n in self.inputs}
            values = self.session.run(None, feeds)
            self._shape_cache[key] = {n: v.shape for n, v in zip(self.outputs, values)}
        return self._shape_cache[key][name]

    def execute(self, shapes, addresses):
        feeds = {}
        for n in self.inputs:
            dtype = np.dtype(nptype(self.dtypes[n]))
            nbytes = int(np.prod(shapes[n])) * dtype.itemsize
            feeds[n] = self.gpu.view(addresses[n], nbytes).view(dtype).reshape(shapes[n]).copy()
        for n, value in zip(self.outputs, self.session.run(None, feeds)):
            value = np.ascontiguousarray(value, nptype(self.dtypes[n]))
            self.gpu.view(addresses[n], value.nbytes)[:] = value.view(np.uint8).reshape(-1)


class Context:
    def __init__(self, engine, user_managed: bool = False):
        self.engine, self.gpu = engine, engine.gpu
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.enqueued_shapes = None  # the shapes of the last enqueue that was not captured
        self.has_memory = not user_managed  # USER_MANAGED: none until set_device_memory

    def set_device_memory(self, memory, size):
        ptr = int(memory)
        assert ptr % ALIGNMENT == 0 and self.gpu.is_device_address(ptr), \
            "setDeviceMemory: not an aligned device address"
        assert size >= ACTIVATION_BYTES, f"setDeviceMemory: {size} bytes, the engine needs " \
                                         f"{ACTIVATION_BYTES}"
        self.has_memory = True

    def replay(self, shapes, addresses):
        """Run the engine as captured in a graph at ``shapes``."""
        if shapes != self.enqueued_shapes:
            # TensorRT keeps shape-dependent state in the context: a graph replays correctly
            # only on a context whose last enqueue was at the capture's shapes
            raise AssertionError(f"a CUDA graph captured at {shapes} replayed on a context "
                                 f"last enqueued at {self.enqueued_shapes}")
        self.engine.execute(shapes, addresses)

    def set_input_shape(self, name, shape):
        if name not in self.engine.inputs:
            return False  # "... is not an input tensor" / unknown name
        capture = self.gpu.capture_of_this_thread()
        if capture is not None:  # shape work is not capturable: the capture is invalidated
            capture["invalid"] = f"set_input_shape({name!r}) during the capture"
        shape = tuple(int(d) for d in shape)
        if not self.engine.in_profile(name, shape):
            return False  # TensorRT: "... is out of the optimization profile bounds"
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, ptr):
        if name not in self.engine.dtypes:
            return False  # "Tensor ... not found"
        if int(ptr) % ALIGNMENT:
            return False  # setTensorAddress: "at least 256-byte alignment"
        if not self.gpu.is_device_address(int(ptr)):
            return False  # not device memory: the real engine would fault when it ran
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_shape(self, name):
        return self.engine.output_shape(name, self.shapes)

    def execute_async_v3(self, stream_handle):
        gpu = self.gpu
        gpu.need_context("enqueueV3")
        if gpu.pending_error is not None:
            gpu.pending_error = None  # TensorRT read it with cudaGetLastError and gave up
            return False
        if any(n not in self.shapes for n in self.engine.inputs) or \
                any(n not in self.addresses for n in self.engine.dtypes) or not self.has_memory:
            return False  # "Tensor ... is bound to nullptr" / input shape or memory not set
        shapes, addresses = dict(self.shapes), dict(self.addresses)
        capture = gpu._capturing.get(stream_handle)
        if capture is not None and shapes != self.enqueued_shapes:
            capture["invalid"] = "enqueueV3 captured before a plain enqueue at these shapes"
            return False
        gpu.counts["enqueues"] += 1
        if capture is None:
            gpu.run_queued(stream_handle)  # the copies before it have run by the time it reads
            self.enqueued_shapes = shapes
            gpu.submit(stream_handle, lambda: self.engine.execute(shapes, addresses))
        else:
            gpu.submit(stream_handle, lambda: self.replay(shapes, addresses))
        return True
