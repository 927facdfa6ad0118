"""Backends that run the stage graphs of a model directory.

The protocol is small: ``run(stage, inputs) -> outputs`` with numpy arrays in and out, and a
context-manager lifecycle (``close`` releases sessions). ``run(..., on_device=True)`` returns the
backend's device values instead of numpy arrays; such values can be passed back as inputs of a
later ``run``, so a pipeline keeps intermediate tensors where the backend computes (GPU memory for
ONNX Runtime CUDA) and copies to the host only what it needs there. ``condition`` runs the
conditioner for the conditional branch and stacks the cached unconditional branch after it, as the
denoiser takes them. ``sample`` is the Euler + CFG loop written on top of that: one denoiser launch
per step, no host round trip inside the loop.

Backends:
    ort-cpu   ONNX Runtime, CPUExecutionProvider.
    ort-cuda  ONNX Runtime, CUDAExecutionProvider (needs onnxruntime-gpu and a CUDA device);
              IO binding keeps every intermediate tensor on the GPU.
    trt       the model directory's TensorRT engines through pycuda (tensorrt_backend.py);
              refused when they were built for another GPU or TensorRT version.
    auto      the fastest available: trt, then ort-cuda, then ort-cpu; a faster backend that
              cannot be used is skipped with a warning saying why (except when its software is
              simply not installed).

Every failure is raised with the stage named (BackendError), or as BackendUnavailable when a
backend cannot be used at all.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from ..stages import StageSpec
from .errors import BackendError, BackendUnavailable, one_line
from .model_dir import ModelDir

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt")


class Backend(Protocol):
    name: str

    def run(self, stage: str, inputs: Mapping[str, Any], *,
            on_device: bool = False) -> dict[str, Any]: ...

    def condition(self, inputs: Mapping[str, np.ndarray],
                  uncond: Mapping[str, np.ndarray]) -> dict[str, Any]: ...

    def sample(self, x0: np.ndarray, mix_latent: Any, conditioning: Mapping[str, Any],
               steps: int, cfg: float) -> Any: ...

    def to_host(self, value: Any) -> np.ndarray: ...

    def close(self) -> None: ...


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BackendUnavailable(f"onnxruntime is not installed ({exc}); "
                                 "pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


def cuda_available() -> bool:
    """Whether ONNX Runtime offers its CUDA provider in this environment."""
    try:
        ort = _import_ort()
    except BackendUnavailable:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OrtBackend:
    """ONNX Runtime on CPU or CUDA. Sessions are created once per stage, on first use, and
    reused; ``load_seconds`` records what each creation cost."""

    def __init__(self, model: ModelDir, device: str = "cpu", *, device_id: int = 0,
                 threads: int = 0):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self._ort = _import_ort()
        self.model = model
        self.device = device
        self.device_id = device_id
        self.name = f"ort-{device}"
        self._threads = threads
        self._sessions: dict[str, Any] = {}
        self.load_seconds: dict[str, float] = {}
        if device == "cuda":
            if not cuda_available():
                raise BackendUnavailable(
                    "ONNX Runtime's CUDA provider is not available here (install onnxruntime-gpu "
                    "with a matching CUDA, or use --backend ort-cpu)")
            # Creating one session proves that the provider really loads (ORT falls back to the
            # CPU silently when CUDA libraries are missing, which _session turns into an error).
            self._session("conditioner")

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> OrtBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sessions.clear()

    # -- sessions ------------------------------------------------------------------------------
    def _providers(self) -> list:
        if self.device == "cuda":
            return [("CUDAExecutionProvider", {"device_id": self.device_id}),
                    "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _session(self, stage: str):
        session = self._sessions.get(stage)
        if session is not None:
            return session
        if stage not in self.model.specs:
            raise BackendError(stage, "this model has no such stage")
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only; ORT's warnings are not the user's concern
        # ORT's CPU arena kept growing, window after window, once video features ran (peak RSS
        # 3.6 GB over 9 tiny windows, 2.8 GB over 26 with it off for the video stages only, a
        # flat 1.8 GB with it off everywhere; no measurable cost: BENCHMARKS.md, video)
        options.enable_cpu_mem_arena = False
        if self._threads:
            options.intra_op_num_threads = self._threads
        path = self.model.onnx_path(stage)
        started = time.perf_counter()
        self.model.check_unchanged()  # a graph is read only from the directory that was checked
        try:
            session = ort.InferenceSession(str(path), options, providers=self._providers())
        except Exception as exc:  # ORT raises its own pybind exception types
            self.model.check_unchanged()  # a swap mid-load is reported as such
            raise BackendError(stage, f"cannot load {path.name} with ONNX Runtime "
                                      f"({one_line(exc, 400)})") from None
        self.model.check_unchanged()  # ... and not swapped while it was read
        if self.device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable(f"ONNX Runtime could not start its CUDA provider for stage "
                                     f"{stage!r} (providers: {session.get_providers()})")
        self.load_seconds[stage] = time.perf_counter() - started
        self._check_graph(stage, session)
        self._sessions[stage] = session
        return session

    def _check_graph(self, stage: str, session) -> None:
        spec = self.model.specs[stage]
        names_in = [i.name for i in session.get_inputs()]
        names_out = [o.name for o in session.get_outputs()]
        if sorted(names_in) != sorted(spec.input_names) or \
                sorted(names_out) != sorted(spec.output_names):
            raise BackendError(stage, f"graph inputs {names_in} / outputs {names_out} differ "
                                      f"from the manifest's {list(spec.input_names)} / "
                                      f"{list(spec.output_names)}")

    # -- running -------------------------------------------------------------------------------
    def run(self, stage: str, inputs: Mapping[str, Any], *,
            on_device: bool = False) -> dict[str, Any]:
        """Run ``stage``. Inputs are numpy arrays or values this backend returned; outputs are
        numpy arrays, or device values with ``on_device=True``."""
        session = self._session(stage)
        spec = self.model.specs[stage]
        _check_inputs(spec, inputs)
        ort = self._ort
        try:
            binding = session.io_binding()
            for tensor in spec.inputs:
                value = inputs[tensor.name]
                if isinstance(value, ort.OrtValue):
                    binding.bind_ortvalue_input(tensor.name, value)
                else:
                    binding.bind_cpu_input(tensor.name, np.ascontiguousarray(value))
            out_device = self.device if on_device else "cpu"
            out_id = self.device_id if out_device != "cpu" else 0  # the CUDA id is not a CPU's
            for tensor in spec.outputs:
                binding.bind_output(tensor.name, out_device, out_id)
            session.run_with_iobinding(binding)
            values = binding.get_outputs()
        except Exception as exc:
            raise BackendError(stage, f"ONNX Runtime failed: {one_line(exc, 400)}") from None
        if on_device:
            return dict(zip(spec.output_names, values))
        # copy: the returned arrays must not alias buffers ONNX Runtime may reuse
        return {name: np.array(v.numpy(), copy=True) for name, v in zip(spec.output_names, values)}

    def upload(self, array: np.ndarray):
        """A device copy of ``array`` to pass as a ``run`` input."""
        array = np.ascontiguousarray(array)
        try:
            return self._ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id)
        except Exception as exc:
            raise BackendError("upload", f"cannot place a {array.dtype} {array.shape} tensor on "
                                         f"{self.device}: {one_line(exc, 400)}") from None

    def to_host(self, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        return np.array(value.numpy(), copy=True)

    def frame_resizer(self, clip_size: int, sync_size: int):
        """A ``resize.FrameResizer`` on the GPU for CUDA; None on the CPU, where PIL's resize
        is faster than the graph's dense matrix products (BENCHMARKS.md, video preprocessing)."""
        if self.device == "cpu":
            return None
        from .resize import FrameResizer

        return FrameResizer(self._ort, self.device, self.device_id, clip_size, sync_size)

    def condition(self, inputs: Mapping[str, np.ndarray],
                  uncond: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Both CFG branches' conditioning for the denoiser: the conditioner's output for
        ``inputs`` (batch B), then ``uncond`` (batch 1, one branch's conditioning) repeated B times.

        The two halves are joined on the host (once per batch, outside the step loop) and placed
        on the device for CUDA.
        """
        cond = self.run("conditioner", inputs)
        stacked = stack_branches(cond, uncond)
        if self.device == "cpu":
            return stacked
        return {name: self.upload(value) for name, value in stacked.items()}

    def sample(self, x0: np.ndarray, mix_latent: Any, conditioning: Mapping[str, Any],
               steps: int, cfg: float):
        """Euler from t=0 to 1 in ``steps`` steps with guidance ``cfg``; returns a device value.

        ``conditioning`` is the conditioner's output (device values or arrays); ``mix_latent`` is
        None for a generation-only model.
        """
        batch = x0.shape[0]
        dt = self.upload(np.full(batch, 1.0 / steps, np.float32))
        strength = self.upload(np.full(batch, cfg, np.float32))
        times = [self.upload(np.full(batch, i / steps, np.float32)) for i in range(steps)]
        fixed = {name: _device(self, v) for name, v in conditioning.items()}
        if "mix_latent" in self.model.specs["denoiser"].input_names:
            if mix_latent is None:
                raise BackendError("denoiser", "this separation model needs a mixture latent")
            fixed["mix_latent"] = _device(self, mix_latent)
        x = self.upload(x0.astype(np.float32, copy=False))
        for i in range(steps):
            x = self.run("denoiser", {**fixed, "x": x, "t": times[i], "dt": dt, "cfg": strength},
                         on_device=True)["x_next"]
        return x


def stack_branches(cond: Mapping[str, np.ndarray],
                   uncond: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[conditional; unconditional] on the leading axis, the unconditional batch-1 conditioning
    repeated to the conditional batch."""
    return {name: np.concatenate([value, np.broadcast_to(
        unconditional_half(uncond, name, value.shape[1:]), value.shape)])
        for name, value in cond.items()}


def unconditional_half(uncond: Mapping[str, np.ndarray], name: str,
                       item: tuple[int, ...]) -> np.ndarray:
    """``uncond[name]``, checked to be one item (1, *item) of a conditioning tensor."""
    other = np.asarray(uncond[name])
    if other.shape != (1, *item):
        raise BackendError("conditioner", f"unconditional {name!r} has shape {other.shape}, "
                                          f"expected {(1, *item)}")
    return other


def _device(backend: OrtBackend, value: Any):
    return value if isinstance(value, backend._ort.OrtValue) else backend.upload(value)


def _check_inputs(spec: StageSpec, inputs: Mapping[str, Any]) -> int:
    """Names, dtypes and shapes against the stage contract, with one consistent batch; returns
    that batch."""
    missing = [n for n in spec.input_names if n not in inputs]
    extra = [n for n in inputs if n not in spec.input_names]
    if missing or extra:
        raise BackendError(spec.name, f"inputs missing {missing}, unexpected {extra}")
    batch = None
    for tensor in spec.inputs:
        value = inputs[tensor.name]
        shape = tuple(value.shape() if callable(value.shape) else value.shape)
        if hasattr(value, "data_type"):  # an OrtValue
            dtype = _ORT_TYPES.get(value.data_type(), value.data_type())
        else:  # a numpy array or a TensorRT DeviceArray
            dtype = str(np.dtype(value.dtype))
        if dtype != tensor.dtype:
            raise BackendError(spec.name, f"input {tensor.name!r} is {dtype}, "
                                          f"expected {tensor.dtype}")
        if batch is None and shape:
            batch = shape[0] // max(tensor.batch_multiple, 1)
        want = tensor.concrete(batch or 0)
        if shape != want:
            raise BackendError(spec.name, f"input {tensor.name!r} has shape {shape}, "
                                          f"expected {want}")
    return batch or 0


_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64",
              "tensor(float16)": "float16", "tensor(int32)": "int32"}


def create_backend(model: ModelDir, name: str = "auto", *, threads: int = 0):
    """The backend called ``name`` (one of BACKENDS) for ``model``; ``auto`` tries trt, ort-cuda
    and ort-cpu in that order. The chosen backend's ``name`` says which."""
    backend = _create_backend(model, name, threads=threads)
    try:
        model.check_unchanged()  # TensorRT reads every engine up front: not from a swapped dir
    except BaseException:
        backend.close()
        raise
    return backend


def _create_backend(model: ModelDir, name: str, *, threads: int):
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "trt":
        from .tensorrt_backend import TrtBackend

        return TrtBackend(model)
    if name == "ort-cpu":
        return OrtBackend(model, "cpu", threads=threads)
    if name == "ort-cuda":
        return OrtBackend(model, "cuda", threads=threads)
    trt = _auto_tensorrt(model)
    if trt is not None:
        return trt
    if cuda_available():
        try:
            return OrtBackend(model, "cuda", threads=threads)
        except (BackendUnavailable, BackendError) as exc:
            warnings.warn(f"ONNX Runtime CUDA is listed but did not start ({exc}); using the CPU",
                          RuntimeWarning, stacklevel=2)
    return OrtBackend(model, "cpu", threads=threads)


def _auto_tensorrt(model: ModelDir):
    """The TensorRT backend when its software, a GPU and matching engines are all there; else
    None, with a warning when the reason is worth knowing (engines present but unusable)."""
    from .tensorrt_backend import TrtBackend, tensorrt_importable

    if not tensorrt_importable() or (model.manifest.get("tensorrt") or {}).get("status") != "built":
        return None
    try:
        return TrtBackend(model)
    except (BackendUnavailable, BackendError) as exc:
        warnings.warn(f"not using the TensorRT engines: {exc}; falling back to ONNX Runtime",
                      RuntimeWarning, stacklevel=3)
        return None
