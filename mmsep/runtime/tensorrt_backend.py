"""TensorRT backend: the model directory's engines, run through pycuda.

Engines are loaded once, when the backend is created, and their device buffers are allocated once, at
the optimisation profile's largest shape, and reused across calls and requests. Values returned
with ``on_device=True`` are ``DeviceArray`` views of those buffers: valid until the same stage
runs again, which is all a request's pipeline needs (each output is consumed by the next stage).

The sampling loop keeps the latent in two device buffers used in turn, with the step times of a
request uploaded once as a (steps, batch) table. Where cuda-python is installed the whole loop is
captured as one CUDA graph per (batch, steps, buffer addresses) and replayed for later requests;
where it is not, or where TensorRT refuses the capture, the steps are enqueued one by one.

Engines are specific to the TensorRT version and the GPU they were built with. The manifest's
"tensorrt" section records both; ``engine_refusal`` compares them with this machine and says why
the engines cannot be used (``create_backend`` falls back to ONNX Runtime under ``auto``).
"""

from __future__ import annotations

import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..stages import StageSpec
from .backends import _check_inputs, unconditional_half
from .errors import BackendError, BackendUnavailable, ModelDirError, one_line
from ..model_files import sha256_file
from .model_dir import ModelDir

_GRAPH_CACHE_SIZE = 8


@dataclass(frozen=True)
class DeviceArray:
    """A float32/int64 tensor in GPU memory at ``ptr`` (owned by the backend)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _import_gpu_stack():
    """(tensorrt, pycuda.driver) or BackendUnavailable saying what is missing."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT is not installed ({exc}); use --backend ort-cuda "
                                 "or ort-cpu") from None
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendUnavailable(f"pycuda is not installed ({exc}); pip install pycuda, or use "
                                 "--backend ort-cuda or ort-cpu") from None
    return tensorrt, cuda


def tensorrt_importable() -> bool:
    """Whether tensorrt and pycuda can be imported (without importing them)."""
    from importlib.util import find_spec

    return all(_found(name, find_spec) for name in ("tensorrt", "pycuda"))


def _found(name: str, find_spec) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _import_cudart():
    """cuda-python's runtime API (for CUDA graph capture), or None."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            return None
    return runtime


def device_info(device_id: int = 0) -> dict:
    """TensorRT version, GPU name and compute capability of this machine (BackendUnavailable
    when TensorRT, pycuda or a CUDA device is missing)."""
    trt, cuda = _import_gpu_stack()
    try:
        cuda.init()
        count = cuda.Device.count()
        if device_id >= count:
            raise BackendUnavailable(f"no CUDA device {device_id} (this machine has {count})")
        device = cuda.Device(device_id)
        major, minor = device.compute_capability()
        name = device.name()
    except cuda.Error as exc:
        raise BackendUnavailable(f"CUDA is not usable here ({one_line(exc)})") from None
    return {"version": trt.__version__, "gpu": name, "compute_capability": f"{major}.{minor}"}


def engine_refusal(section: Mapping | None, here: Mapping) -> str | None:
    """Why the manifest's engines (its "tensorrt" section) cannot run on the machine described
    by ``here`` (``device_info()``), or None when they can."""
    if not section or section.get("status") != "built":
        reason = (section or {}).get("reason", "no engines recorded")
        return (f"this model directory has no TensorRT engines ({reason}); build them on this "
                "machine with mmsep-export --engines-only DIR")
    if section.get("version") != here["version"]:
        return (f"the engines were built with TensorRT {section.get('version')} and this machine "
                f"has TensorRT {here['version']}; rebuild them with mmsep-export --engines-only")
    if str(section.get("compute_capability")) != here["compute_capability"] or \
            section.get("gpu") != here["gpu"]:
        return (f"the engines were built for {section.get('gpu')} (compute capability "
                f"{section.get('compute_capability')}) and this GPU is {here['gpu']} (compute "
                f"capability {here['compute_capability']}); rebuild them with "
                "mmsep-export --engines-only")
    return None


class _Stage:
    """One engine with its execution context and its reusable device buffers."""

    def __init__(self, backend: TrtBackend, spec: StageSpec, engine):
        self.spec = spec
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(spec.name, "TensorRT could not create an execution context "
                                          "(out of GPU memory?)")
        self._backend = backend
        self._buffers: dict[str, Any] = {}

    def buffer(self, name: str, nbytes: int):
        """A device buffer of at least ``nbytes`` for ``name``, allocated once and reused."""
        buf = self._buffers.get(name)
        if buf is None or buf[1] < nbytes:
            size = max(nbytes, self._backend.max_bytes(self.spec, name))
            buf = (self._backend.alloc(size), size)
            self._buffers[name] = buf
        return int(buf[0])

    def call(self, ok, what: str) -> None:
        if not ok:
            raise BackendError(self.spec.name, f"TensorRT could not {what}")


class TrtBackend:
    """TensorRT engines of a model directory on CUDA device ``device_id`` (see module doc)."""

    name = "trt"

    def __init__(self, model: ModelDir, *, device_id: int = 0, cuda_graphs: bool = True,
                 verify: bool = True):
        here = device_info(device_id)
        refusal = engine_refusal(model.manifest.get("tensorrt"), here)
        if refusal:
            raise BackendUnavailable(f"{model.path}: {refusal}")
        trt, cuda = _import_gpu_stack()
        self._trt, self._cuda = trt, cuda
        self.model = model
        self.device_info = here
        self.precision = model.manifest["tensorrt"].get("precision", "fp16")
        self._verify = verify
        self._cudart = _import_cudart() if cuda_graphs else None
        self.cuda_graphs = self._cudart is not None
        self._context = cuda.Device(device_id).retain_primary_context()
        self._context.push()
        self._stream = cuda.Stream()
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        self._stages: dict[str, _Stage] = {}
        self._allocations: list = []
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self._closed = False
        try:
            for stage in model.specs:  # every engine loaded once, up front: fail fast
                self._stage(stage)
        except BaseException:
            self.close()
            raise

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> TrtBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stream.synchronize()
        for key in list(self._graphs):
            self._drop_graph(key)
        self._stages.clear()
        self._allocations.clear()
        self._context.pop()

    @property
    def max_batch(self) -> int:
        """The largest batch of windows the engines' optimisation profiles accept."""
        return self.model.info.max_batch

    # -- memory --------------------------------------------------------------------------------
    def alloc(self, nbytes: int):
        allocation = self._cuda.mem_alloc(max(int(nbytes), 1))
        self._allocations.append(allocation)
        return allocation

    def max_bytes(self, spec: StageSpec, name: str) -> int:
        """Bytes of tensor ``name`` at the profile's largest batch (the denoiser's latent
        buffers also serve the sampler; its conditioning buffers hold both branches)."""
        tensor = spec.tensor(name)
        shape = tensor.concrete(spec.max_batch)
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize

    def upload(self, array: np.ndarray) -> DeviceArray:
        """A device copy of ``array`` in a buffer of its own (kept until ``close``)."""
        array = np.ascontiguousarray(array)
        allocation = self.alloc(array.nbytes)
        self._cuda.memcpy_htod_async(allocation, array, self._stream)
        self._stream.synchronize()
        return DeviceArray(int(allocation), tuple(array.shape), array.dtype)

    def to_host(self, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        out = np.empty(value.shape, value.dtype)
        self._cuda.memcpy_dtoh_async(out, value.ptr, self._stream)
        self._stream.synchronize()
        return out

    def _put(self, ptr: int, array: np.ndarray, keep: list) -> None:
        array = np.ascontiguousarray(array)
        keep.append(array)  # the copy is asynchronous: the source must outlive it
        self._cuda.memcpy_htod_async(ptr, array, self._stream)

    # -- engines -------------------------------------------------------------------------------
    def _stage(self, stage: str) -> _Stage:
        loaded = self._stages.get(stage)
        if loaded is not None:
            return loaded
        spec = self.model.specs.get(stage)
        record = self.model.manifest["tensorrt"].get("engines", {}).get(stage)
        if spec is None or record is None:
            raise BackendError(stage, "this model has no such stage engine")
        path = self.model.path / record["file"]
        if not path.is_file():
            raise ModelDirError(f"{self.model.path}: missing engine {record['file']} (re-run "
                                "mmsep-export --engines-only)")
        if self._verify and sha256_file(path) != record["sha256"]:
            raise ModelDirError(f"{path}: SHA-256 does not match the manifest (tampered or "
                                "incomplete)")
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(stage, f"TensorRT could not deserialise {path.name} (built by "
                                      "another TensorRT version, or out of GPU memory)")
        self._check_engine(spec, engine)
        loaded = self._stages[stage] = _Stage(self, spec, engine)
        return loaded

    def _check_engine(self, spec: StageSpec, engine) -> None:
        trt = self._trt
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        wanted = set(spec.input_names) | set(spec.output_names)
        if names != wanted:
            raise BackendError(spec.name, f"engine tensors {sorted(names)} differ from the "
                                          f"manifest's {sorted(wanted)}")
        for tensor in (*spec.inputs, *spec.outputs):
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor.name)))
            if dtype != np.dtype(tensor.dtype):
                raise BackendError(spec.name, f"engine tensor {tensor.name!r} is {dtype}, the "
                                              f"contract says {tensor.dtype}")

    def _bind(self, st: _Stage, inputs: Mapping[str, Any], batch: int, keep: list,
              outputs: Mapping[str, int] | None = None) -> dict[str, DeviceArray]:
        """Bind checked ``inputs`` of ``batch`` (host arrays are copied into the stage's buffers,
        device arrays bound in place) and the outputs (the stage's buffers unless ``outputs``
        gives addresses)."""
        spec, context = st.spec, st.context
        _check_profile(spec, batch)
        for tensor in spec.inputs:
            value = inputs[tensor.name]
            if isinstance(value, DeviceArray):
                ptr = value.ptr
            else:
                ptr = st.buffer(tensor.name, np.asarray(value).nbytes)
                self._put(ptr, value, keep)
            st.call(context.set_input_shape(tensor.name, tuple(value.shape)),
                    f"set the shape of input {tensor.name!r} to {tuple(value.shape)}")
            st.call(context.set_tensor_address(tensor.name, ptr), f"bind input {tensor.name!r}")
        bound = {}
        for tensor in spec.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(tensor.name))
            if shape != tensor.concrete(batch):
                raise BackendError(spec.name, f"output {tensor.name!r} would have shape {shape}, "
                                              f"the contract says {tensor.concrete(batch)}")
            dtype = np.dtype(tensor.dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            ptr = outputs[tensor.name] if outputs else st.buffer(tensor.name, nbytes)
            st.call(context.set_tensor_address(tensor.name, ptr), f"bind output {tensor.name!r}")
            bound[tensor.name] = DeviceArray(ptr, shape, dtype)
        return bound

    def _enqueue(self, st: _Stage) -> None:
        st.call(st.context.execute_async_v3(self._stream.handle), "enqueue the engine")

    # -- the Backend protocol ------------------------------------------------------------------
    def run(self, stage: str, inputs: Mapping[str, Any], *,
            on_device: bool = False) -> dict[str, Any]:
        st = self._stage(stage)
        keep: list = []
        bound = self._bind(st, inputs, _check_inputs(st.spec, inputs), keep)
        self._enqueue(st)
        if on_device:
            self._stream.synchronize()  # stage timings stay honest; no later launch is waiting
            return bound
        return self._fetch(bound)

    def _fetch(self, bound: Mapping[str, DeviceArray]) -> dict[str, np.ndarray]:
        out = {}
        for name, value in bound.items():
            out[name] = np.empty(value.shape, value.dtype)
            self._cuda.memcpy_dtoh_async(out[name], value.ptr, self._stream)
        self._stream.synchronize()
        return out

    def condition(self, inputs: Mapping[str, np.ndarray],
                  uncond: Mapping[str, np.ndarray]) -> dict[str, DeviceArray]:
        """The conditioner writes the conditional branch straight into the first half of the
        denoiser's conditioning buffers; the cached unconditional branch fills the second."""
        st = self._stage("conditioner")
        denoiser = self._stage("denoiser")
        batch = _check_inputs(st.spec, inputs)
        targets, stacked, keep = {}, {}, []
        for tensor in st.spec.outputs:
            item = tensor.concrete(1)[1:]
            other = unconditional_half(uncond, tensor.name, item)
            half = batch * int(np.prod(item, dtype=np.int64)) * 4
            ptr = denoiser.buffer(tensor.name, 2 * half)
            targets[tensor.name] = ptr
            self._put(ptr + half, np.broadcast_to(other, (batch, *item)).astype(np.float32),
                      keep)
            stacked[tensor.name] = DeviceArray(ptr, (2 * batch, *item), np.dtype(np.float32))
        self._bind(st, inputs, batch, keep, outputs=targets)
        self._enqueue(st)
        self._stream.synchronize()
        return stacked

    def sample(self, x0: np.ndarray, mix_latent: Any, conditioning: Mapping[str, Any],
               steps: int, cfg: float) -> DeviceArray:
        """Euler + CFG from t=0 to 1 in ``steps`` denoiser launches (one CUDA graph where
        possible); returns the final latent on the device."""
        st = self._stage("denoiser")
        spec = st.spec
        batch = x0.shape[0]
        _check_profile(spec, batch)
        keep: list = []
        fixed: dict[str, Any] = dict(conditioning)
        if "mix_latent" in spec.input_names:
            if mix_latent is None:
                raise BackendError("denoiser", "this separation model needs a mixture latent")
            fixed["mix_latent"] = mix_latent
        for name, value in fixed.items():  # host values go into the stage's own buffers
            if not isinstance(value, DeviceArray):
                value = np.ascontiguousarray(value, dtype=np.float32)
                ptr = st.buffer(name, value.nbytes)
                self._put(ptr, value, keep)
                fixed[name] = DeviceArray(ptr, value.shape, value.dtype)
        latent = np.ascontiguousarray(x0, dtype=np.float32)
        x_bytes = latent.nbytes
        buffers = (st.buffer("x", x_bytes), st.buffer("x_next", x_bytes))
        times = np.repeat((np.arange(steps, dtype=np.float32) / steps)[:, None], batch, axis=1)
        table = st.buffer("t", times.nbytes)  # grows once to the longest steps x batch seen
        scalars = st.buffer("dt", 2 * batch * 4)  # dt then cfg, batch values each
        self._put(buffers[0], latent, keep)
        self._put(table, times, keep)
        self._put(scalars, np.concatenate([np.full(batch, 1.0 / steps, np.float32),
                                           np.full(batch, cfg, np.float32)]), keep)
        shapes = {"x": latent.shape, "t": (batch,), "dt": (batch,), "cfg": (batch,)}

        def bind_step(i):
            step = {"x": (buffers[i % 2], shapes["x"]),
                    "x_next": (buffers[(i + 1) % 2], None),
                    "t": (table + i * batch * 4, shapes["t"]),
                    "dt": (scalars, shapes["dt"]),
                    "cfg": (scalars + batch * 4, shapes["cfg"])}
            for name, value in fixed.items():
                step[name] = (value.ptr, value.shape)
            for name, (ptr, shape) in step.items():
                if shape is not None:
                    st.call(st.context.set_input_shape(name, tuple(shape)),
                            f"set the shape of input {name!r}")
                st.call(st.context.set_tensor_address(name, ptr), f"bind {name!r}")

        def enqueue_steps():
            for i in range(steps):
                bind_step(i)
                self._enqueue(st)

        def warm_up():
            # TensorRT needs one plain enqueue after a shape change before it can be captured;
            # step 0 writes only the second latent buffer, which the loop overwrites first.
            bind_step(0)
            self._enqueue(st)

        key = (batch, steps, buffers, table, scalars,
               tuple(sorted((n, v.ptr) for n, v in fixed.items())))
        if not self._launch_graph(key, warm_up, enqueue_steps):
            enqueue_steps()
        self._stream.synchronize()
        return DeviceArray(buffers[steps % 2], tuple(latent.shape), np.dtype(np.float32))

    # -- CUDA graphs ---------------------------------------------------------------------------
    def _launch_graph(self, key: tuple, warm_up, enqueue_steps) -> bool:
        """Replay (capturing first if needed) the step loop for ``key``; False when graphs are
        off or the capture failed (the caller then enqueues the steps itself)."""
        if not self.cuda_graphs:
            return False
        rt = self._cudart
        entry = self._graphs.get(key)
        if entry is None:
            warm_up()
            self._stream.synchronize()
            handle = self._stream.handle
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            try:
                _check(rt, rt.cudaStreamBeginCapture(handle, mode), "begin a capture")
                try:
                    enqueue_steps()
                finally:
                    err, graph = rt.cudaStreamEndCapture(handle)
                _check(rt, (err,), "end the capture")
                err, executable = rt.cudaGraphInstantiate(graph, 0)
                _check(rt, (err,), "instantiate the graph")
            except (BackendError, RuntimeError) as exc:
                warnings.warn(f"CUDA graph capture of the denoiser loop failed ({exc}); "
                              "running the steps one by one", RuntimeWarning, stacklevel=3)
                self.cuda_graphs = False
                return False
            entry = self._graphs[key] = (graph, executable)
            while len(self._graphs) > _GRAPH_CACHE_SIZE:
                self._drop_graph(next(iter(self._graphs)))
        self._graphs.move_to_end(key)
        _check(rt, rt.cudaGraphLaunch(entry[1], self._stream.handle), "launch the graph")
        return True

    def _drop_graph(self, key: tuple) -> None:
        graph, executable = self._graphs.pop(key)
        self._cudart.cudaGraphExecDestroy(executable)
        self._cudart.cudaGraphDestroy(graph)


def _check(rt, result: tuple, what: str) -> None:
    err = result[0]
    if err != rt.cudaError_t.cudaSuccess:
        raise BackendError("denoiser", f"CUDA could not {what} ({err!r})")


def _check_profile(spec: StageSpec, batch: int) -> None:
    if batch > spec.max_batch:
        raise BackendError(spec.name, f"batch {batch} exceeds the engine's optimisation profile "
                                      f"(max {spec.max_batch}); lower --max-batch or rebuild the "
                                      "engines with a larger --max-batch")
