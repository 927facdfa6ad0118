"""TensorRT backend: the model directory's engines, run through pycuda.

Engines are loaded once, when the backend is created, and their device buffers are allocated once,
at the optimisation profile's largest shape, and reused across calls and requests. Values returned
with ``on_device=True`` are ``DeviceArray`` views of those buffers: valid until the same stage
runs again, which is all a request's pipeline needs (each output is consumed by the next stage).

Every tensor TensorRT reads or writes is bound at a 256-byte aligned address (setTensorAddress
refuses anything else): each buffer is an allocation of its own, and the step times and the dt/cfg
scalars of the sampling loop sit in aligned slots. The loop keeps the latent in two device buffers
used in turn. Where cuda-python is installed the whole loop is captured as one CUDA graph per
(batch, steps, buffer addresses) and replayed for later requests (cuda_graphs.py), each batch size
on an execution context of its own (a graph is valid only on a context that ran no other shapes
since its capture); else, or where the capture fails, the steps are enqueued one by one. Copies
go through page-locked staging buffers (cuda_memory.py); engine compatibility is decided in
tensorrt_env.py. Video frames are resized on the GPU by its frame-resize engines.

The CUDA context (the device's primary context) is current only while a backend method runs, on
the thread that calls it, and is popped in a ``finally``: nothing is left on pycuda's context stack
when a caller forgets ``close``, uses another thread, or hits a CUDA error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ...closing import Closing
from ...model_files import sha256_file
from ...stages import Stage, StageSpec, Tensor, euler_schedule
from ..errors import BackendError, BackendUnavailable, ModelDirError, one_line
from ..model_dir import ModelDir, hash_mismatch
from .cuda_graphs import StepGraphs, import_cudart
from .cuda_memory import CudaMemory, DeviceArray, aligned, in_context
from .protocol import check_inputs, step_invariant_inputs, unconditional_half
from .tensorrt_env import (
    check_engine_tensors,
    device_info,
    engine_refusal,
    import_gpu_stack,
    tensorrt_importable,
)

__all__ = ["DeviceArray", "TrtBackend", "check_engine_tensors", "device_info", "engine_refusal",
           "tensorrt_importable"]


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
        self._graph_contexts: dict[int, Any] = {}

    def graph_context(self, batch: int):
        """The execution context whose captured loops run batches of ``batch``. TensorRT keeps
        shape-dependent state in a context, so a graph replays correctly only on a context
        that has not run other shapes since: each batch size gets a context of its own, all
        sharing one block of activation memory (they run one at a time, on one stream)."""
        context = self._graph_contexts.get(batch)
        if context is not None:
            return context
        trt, engine = self._backend._trt, self.engine
        context = engine.create_execution_context(
            trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise BackendError(self.spec.name, "TensorRT could not create an execution context")
        if hasattr(engine, "get_device_memory_size_for_profile_v2"):  # TensorRT >= 10.1
            size = engine.get_device_memory_size_for_profile_v2(0)
        else:
            size = engine.get_device_memory_size_for_profile(0)
        ptr = self._backend.memory.buffer((self.spec.name, "activations"), size)
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
            context.set_device_memory(ptr, size)
        else:
            context.device_memory = ptr
        self._graph_contexts[batch] = context
        return context

    def buffer(self, name: str, nbytes: int):
        """A device buffer of at least ``nbytes`` for ``name``, allocated once (at the profile's
        largest shape where that is more) and reused."""
        return self._backend.memory.buffer((self.spec.name, name), nbytes,
                                           reserve=self._backend.max_bytes(self.spec, name))

    def call(self, ok, what: str) -> None:
        if not ok:
            raise BackendError(self.spec.name, f"TensorRT could not {what}")


class TrtBackend(Closing):
    """TensorRT engines of a model directory on CUDA device ``device_id`` (see module doc)."""

    name = "trt"

    def __init__(self, model: ModelDir, *, device_id: int = 0, cuda_graphs: bool = True):
        here = device_info(device_id)
        refusal = engine_refusal(model.manifest.get("tensorrt"), here)
        if refusal:
            raise BackendUnavailable(f"{model.path}: {refusal}")
        trt, cuda = import_gpu_stack()
        self._trt, self._cuda = trt, cuda
        self.model = model
        self.device_info = here
        self._precision = model.manifest["tensorrt"].get("precision", "fp16")
        self._graphs = StepGraphs(import_cudart() if cuda_graphs else None, Stage.DENOISER)
        self._context = cuda.Device(device_id).retain_primary_context()
        self._stages: dict[str, _Stage] = {}
        self._resizers: list = []
        self._closed = False
        self._load()

    @in_context
    def _load(self) -> None:
        self.memory = CudaMemory(self._cuda)
        self._stream = self.memory.stream
        self._runtime = self._trt.Runtime(self._trt.Logger(self._trt.Logger.ERROR))
        try:
            for stage in self.model.specs:  # every engine loaded once, up front: fail fast
                self._stage(stage)
        except BaseException:
            self._release()
            self._closed = True
            raise

    @property
    def precision(self) -> str:
        """The engines' precision, as built (the manifest's)."""
        return self._precision

    @property
    def cuda_graphs(self) -> bool:
        """Whether the sampling loop runs as captured CUDA graphs (off after a failed capture)."""
        return self._graphs.enabled

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the stream and release graphs, engines and memory; a CUDA error found on the
        way is raised after everything is released."""
        if self._closed:
            return
        self._closed = True
        failure = self._close_in_context()
        if failure is not None:
            raise BackendError("close", f"CUDA failed before close ({one_line(failure)})")

    @in_context
    def _close_in_context(self):
        try:
            self._stream.synchronize()
            return None
        except self._cuda.Error as exc:
            return exc
        finally:
            self._release()

    def _release(self) -> None:
        for resizer in self._resizers:
            resizer.release()
        self._resizers.clear()
        self._graphs.close()
        self._stages.clear()
        self.memory.release()

    @property
    def max_batch(self) -> int:
        """The largest batch of windows the engines' optimisation profiles accept."""
        return self.model.info.max_batch

    @in_context
    def frame_resizer(self, clip_size: int, sync_size: int):
        """A ``TrtFrameResizer`` on this GPU from the model's frame-resize engines (RGB, and
        yuv420p where built); None (frames resized on the host) for a model directory built
        without them."""
        from ..resize_engine import ENGINE_NAMES as NAMES
        from .tensorrt_resize import TrtFrameResizer

        section = self.model.manifest["tensorrt"]
        if section.get(NAMES[False]) is None:
            return None
        engines = {yuv: self._engine(name, section[name]) for yuv, name in NAMES.items()
                   if section.get(name) is not None}
        resizer = TrtFrameResizer(self._trt, self._cuda, self._context, engines, clip_size,
                                  sync_size)
        self._resizers.append(resizer)
        return resizer

    # -- memory --------------------------------------------------------------------------------
    def max_bytes(self, spec: StageSpec, name: str) -> int:
        """Bytes of tensor ``name`` at the profile's largest batch (the denoiser's latent
        buffers also serve the sampler; its conditioning buffers hold both branches)."""
        tensor = spec.tensor(name)
        shape = tensor.concrete(spec.max_batch)
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize

    @in_context
    def to_host(self, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        return self.memory.fetch({"value": value})["value"]

    # -- engines -------------------------------------------------------------------------------
    def _stage(self, stage: str) -> _Stage:
        loaded = self._stages.get(stage)
        if loaded is not None:
            return loaded
        spec = self.model.specs.get(stage)
        record = self.model.manifest["tensorrt"].get("engines", {}).get(stage)
        if spec is None or record is None:
            raise BackendError(stage, "this model has no such stage engine")
        engine = self._engine(stage, record)
        check_engine_tensors(self._trt, spec, engine)
        loaded = self._stages[stage] = _Stage(self, spec, engine)
        return loaded

    def _engine(self, name: str, record: dict):
        """The deserialised engine of a manifest record, its file checked first (its size, and
        its SHA-256 unless the model directory was opened with verify=False)."""
        path = self.model.path / record["file"]
        if not path.is_file():
            raise ModelDirError(f"{self.model.path}: missing engine {record['file']} (re-run "
                                "mmsep-export --engines-only)")
        self.model.check_file(record["file"], record["sha256"], record.get("bytes"))
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            if not self.model.verified and sha256_file(path) != record["sha256"]:
                raise hash_mismatch(path, skipped=True)
            raise BackendError(name, f"TensorRT could not deserialise {path.name} (built by "
                                     "another TensorRT version, or out of GPU memory)")
        return engine

    def _bind(self, st: _Stage, inputs: Mapping[str, Any], batch: int,
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
                self.memory.put(ptr, value)
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

    def _enqueue(self, st: _Stage, context=None) -> None:
        context = st.context if context is None else context
        st.call(context.execute_async_v3(self._stream.handle), "enqueue the engine")

    # -- the Backend protocol ------------------------------------------------------------------
    @in_context
    def run(self, stage: str, inputs: Mapping[str, Any], *,
            on_device: bool = False) -> dict[str, Any]:
        st = self._stage(stage)
        bound = self._bind(st, inputs, check_inputs(st.spec, inputs))
        self._enqueue(st)
        if on_device:
            self._stream.synchronize()  # stage timings stay honest; no later launch is waiting
            return bound
        return self.memory.fetch(bound)

    @in_context
    def condition(self, inputs: Mapping[str, np.ndarray],
                  uncond: Mapping[str, np.ndarray]) -> dict[str, DeviceArray]:
        """The conditioner writes the conditional branch straight into the first half of the
        denoiser's conditioning buffers; the cached unconditional branch fills the second."""
        st = self._stage(Stage.CONDITIONER)
        denoiser = self._stage(Stage.DENOISER)
        batch = check_inputs(st.spec, inputs)
        targets, stacked = {}, {}
        for tensor in st.spec.outputs:
            item = tensor.concrete(1)[1:]
            dtype = np.dtype(denoiser.spec.tensor(tensor.name).dtype)
            other = unconditional_half(uncond, tensor.name, item)
            half = batch * int(np.prod(item, dtype=np.int64)) * dtype.itemsize
            ptr = denoiser.buffer(tensor.name, 2 * half)
            targets[tensor.name] = ptr
            self.memory.put(ptr + half, np.broadcast_to(other, (batch, *item)).astype(dtype))
            stacked[tensor.name] = DeviceArray(ptr, (2 * batch, *item), dtype)
        self._bind(st, inputs, batch, outputs=targets)
        self._enqueue(st)
        self._stream.synchronize()
        return stacked

    @in_context
    def sample(self, x0: np.ndarray, mix_latent: Any, conditioning: Mapping[str, Any],
               steps: int, cfg: float) -> DeviceArray:
        """Euler + CFG from t=0 to 1 in ``steps`` denoiser launches (one CUDA graph where
        possible); returns the final latent on the device."""
        st = self._stage(Stage.DENOISER)
        batch = x0.shape[0]
        _check_profile(st.spec, batch)
        fixed = self._fixed_inputs(st, mix_latent, conditioning)
        latent = np.ascontiguousarray(x0, dtype=st.spec.tensor(Tensor.X).dtype)
        buffers = (st.buffer(Tensor.X, latent.nbytes), st.buffer(Tensor.X_NEXT, latent.nbytes))
        self.memory.put(buffers[0], latent)
        table, scalars, slot = self._put_schedule(st, batch, steps, cfg)
        shapes = {Tensor.X: latent.shape, Tensor.T: (batch,), Tensor.DT: (batch,),
                  Tensor.CFG: (batch,), **{name: value.shape for name, value in fixed.items()}}
        fixed_ptrs = {name: value.ptr for name, value in fixed.items()}
        context = st.graph_context(batch) if self.cuda_graphs else st.context

        def bind_step(i):
            step = {Tensor.X: buffers[i % 2], Tensor.X_NEXT: buffers[(i + 1) % 2],
                    Tensor.T: table + i * slot, Tensor.DT: scalars, Tensor.CFG: scalars + slot,
                    **fixed_ptrs}
            for name, ptr in step.items():
                st.call(context.set_tensor_address(name, ptr), f"bind {name!r} at {ptr:#x}")

        def enqueue_steps():
            for i in range(steps):
                bind_step(i)
                self._enqueue(st, context)

        for name, shape in shapes.items():  # never inside a capture
            st.call(context.set_input_shape(name, tuple(shape)),
                    f"set the shape of input {name!r} to {tuple(shape)}")
        key = (batch, steps, buffers, table, scalars, tuple(sorted(fixed_ptrs.items())))
        if self.cuda_graphs and key not in self._graphs:
            # TensorRT captures only after a plain enqueue at these shapes; step 0 writes only
            # the second latent buffer, which the loop overwrites first.
            bind_step(0)
            self._enqueue(st, context)
            self._stream.synchronize()
        if not self._graphs.launch(key, self._stream.handle, enqueue_steps):
            enqueue_steps()
        self._stream.synchronize()
        return DeviceArray(buffers[steps % 2], tuple(latent.shape), latent.dtype)

    def _put_schedule(self, st: _Stage, batch: int, steps: int, cfg: float):
        """Copy the step times (``euler_schedule``), dt and cfg of a batch to the device, each
        batch of values in an aligned slot of its own; returns (times, dt and cfg, slot bytes):
        the step times at ``times + i * slot``, dt at ``dt and cfg``, cfg one slot after."""
        dtypes = {name: np.dtype(st.spec.tensor(name).dtype)
                  for name in (Tensor.T, Tensor.DT, Tensor.CFG)}
        slot = aligned(batch * max(d.itemsize for d in dtypes.values()))
        times, dt = euler_schedule(steps)
        table = st.buffer(Tensor.T, steps * slot)  # grows once to the longest request seen
        scalars = st.buffer(Tensor.DT, 2 * slot)
        self.memory.put(table, _slots([np.full(batch, t, dtypes[Tensor.T]) for t in times], slot))
        self.memory.put(scalars, _slots([np.full(batch, dt, dtypes[Tensor.DT]),
                                         np.full(batch, cfg, dtypes[Tensor.CFG])], slot))
        return table, scalars, slot

    def _fixed_inputs(self, st: _Stage, mix_latent: Any,
                      conditioning: Mapping[str, Any]) -> dict[str, DeviceArray]:
        """The denoiser inputs that stay the same across steps, on the device (host values are
        copied into the stage's own buffers)."""
        fixed = step_invariant_inputs(st.spec, mix_latent, conditioning)
        for name, value in fixed.items():
            if not isinstance(value, DeviceArray):
                value = np.ascontiguousarray(value, dtype=st.spec.tensor(name).dtype)
                ptr = st.buffer(name, value.nbytes)
                self.memory.put(ptr, value)
                fixed[name] = DeviceArray(ptr, value.shape, value.dtype)
        return fixed


def _slots(rows: list[np.ndarray], slot: int) -> np.ndarray:
    """The bytes of 1-D arrays ``rows``, each at the start of a ``slot``-byte row."""
    out = np.zeros((len(rows), slot), np.uint8)
    for row, values in zip(out, rows):
        raw = np.ascontiguousarray(values).view(np.uint8)
        row[:raw.size] = raw
    return out


def _check_profile(spec: StageSpec, batch: int) -> None:
    if batch > spec.max_batch:
        raise BackendError(spec.name, f"batch {batch} exceeds the engine's optimisation profile "
                                      f"(max {spec.max_batch}); lower --max-batch or rebuild the "
                                      "engines with a larger --max-batch")

