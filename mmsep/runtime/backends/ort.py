"""The ONNX Runtime backend (``ort-cpu``, ``ort-cuda``; protocol.py says what a backend offers).

Sessions are created once per stage, on first use. On CUDA, IO binding keeps every intermediate
tensor on the GPU: device values are OrtValues, and the sampling loop chains the denoiser's outputs
from step to step without a host round trip, replaying CUDA graphs of the steps (ort_graphs.py).

Precision: on CUDA the stages run their fp16 mixed-precision graphs (fp32 inputs and outputs;
``mmsep-export --precision fp16``, the default, writes them) where the model directory has them;
fp32 graphs run with TF32 off, so that fp32 means fp32. The CPU runs the fp32 graphs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ...closing import Closing
from ...stages import Stage, Tensor, euler_schedule
from ..errors import BackendError, BackendUnavailable, InputError, one_line
from ..model_dir import ModelDir
from .cuda_driver import cuda_device_problem
from .ort_graphs import DenoiserGraphs
from .protocol import check_inputs, stack_branches, step_invariant_inputs

PRECISIONS = ("auto", "fp16", "fp32")


def import_ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BackendUnavailable(f"onnxruntime is not installed ({exc}); "
                                 "pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


@functools.cache
def preload_cuda_libraries() -> None:
    """onnxruntime-gpu's own loading of CUDA and cuDNN (``preload_dlls``, where it offers it),
    done once before the first CUDA session: without it a CUDA session can fail to find them.
    ``preload_dlls`` searches NVIDIA's wheels beside onnxruntime only; those elsewhere on sys.path
    (onnxruntime-gpu unpacked into a folder of its own beside a PyTorch install, as on our GPU
    machine) are passed to it folder by folder first."""
    ort = import_ort()
    if not (hasattr(ort, "preload_dlls") and
            "CUDAExecutionProvider" in ort.get_available_providers()):
        return
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every library a folder lacks
        for folder in nvidia_library_folders(Path(ort.__file__).parent.parent):
            ort.preload_dlls(directory=str(folder))
    ort.preload_dlls()  # beside onnxruntime, then the loader's paths; it reports what is missing


def nvidia_library_folders(ort_site: Path) -> list[Path]:
    """The library folders of NVIDIA's CUDA wheels (the ``nvidia`` namespace package) on
    sys.path, except those in ``ort_site``, where ``preload_dlls`` looks by itself."""
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(root) for root in (spec.submodule_search_locations or ())] if spec else []
    return [lib for root in roots if root.parent.resolve() != ort_site.resolve()
            for lib in sorted(root.glob("*/lib")) if lib.is_dir()]


def session_providers(device: str, device_id: int = 0, precision: str = "fp16") -> list:
    """ONNX Runtime's providers for ``device`` ("cpu" or "cuda"); an fp32 graph runs with TF32
    off on CUDA, so that fp32 means fp32."""
    if device == "cuda":
        options = {"device_id": device_id}
        if precision == "fp32":
            options["use_tf32"] = "0"
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def cuda_refusal() -> str | None:
    """Why ONNX Runtime cannot run on a CUDA GPU here (its CUDA provider is not installed, or the
    NVIDIA driver sees no GPU), or None when it can try."""
    try:
        ort = import_ort()
    except BackendUnavailable as exc:
        return str(exc)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("ONNX Runtime's CUDA provider is not available here (install onnxruntime-gpu "
                "with a matching CUDA)")
    problem = cuda_device_problem()
    return None if problem is None else f"ONNX Runtime CUDA needs a GPU: {problem}"


def cuda_available() -> bool:
    """Whether ONNX Runtime offers its CUDA provider here and the NVIDIA driver sees a GPU."""
    return cuda_refusal() is None


def graph_precision(model: ModelDir, device: str, precision: str = "auto") -> str:
    """The graphs to run: "auto" is fp16 on CUDA where the model directory has fp16 graphs (else
    fp32, with a warning) and fp32 on the CPU; "fp16" without fp16 graphs is refused."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device == "cpu"):
        return "fp32"
    if model.has_precision("fp16"):
        return "fp16"
    reason = (f"{model.path} has no fp16 graphs (exported with --precision bf16/fp32, or by an "
              "older mmsep-export); re-export it with mmsep-export --precision fp16")
    if precision == "fp16":
        raise BackendUnavailable(reason)
    warnings.warn(f"{reason}; running the fp32 graphs", RuntimeWarning, stacklevel=3)
    return "fp32"


class OrtBackend(Closing):
    """ONNX Runtime on CPU or CUDA. Sessions are created once per stage, on first use, and
    reused; ``load_seconds`` records what each creation cost. ``precision``: see
    ``graph_precision``. ``cuda_graphs`` (default: on CUDA) replays the denoiser loop as CUDA
    graphs; on the CPU it runs the same pinned loop uncaptured (ort_graphs.py)."""

    def __init__(self, model: ModelDir, device: str = "cpu", *, device_id: int = 0,
                 threads: int = 0, precision: str = "auto", cuda_graphs: bool | None = None):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        refusal = cuda_refusal() if device == "cuda" else None
        if refusal is not None:
            raise BackendUnavailable(f"{refusal}; or use the ort-cpu backend")
        self._ort = import_ort()
        self.model = model
        self.device = device
        self.device_id = device_id
        self._threads = threads
        self._sessions: dict[str, Any] = {}
        self._resizers: list = []  # the frame resizers given out, released by close
        self._closed = False
        self.load_seconds: dict[str, float] = {}
        self._precision = graph_precision(model, device, precision)
        self.lock = threading.Lock()  # device work that must not overlap a capture (ort_graphs)
        self._graphs = None
        if device == "cuda" if cuda_graphs is None else cuda_graphs:
            self._graphs = DenoiserGraphs(
                self._ort, model.onnx_path(Stage.DENOISER, self.precision),
                model.specs[Stage.DENOISER], options=self._session_options,
                providers=self._providers(), device=device, device_id=device_id, lock=self.lock,
                check_unchanged=model.check_unchanged)
        if device == "cuda":
            preload_cuda_libraries()
            # Creating one session proves that the provider really loads (ORT falls back to the
            # CPU silently when CUDA libraries are missing, which _session turns into an error).
            self._session(Stage.CONDITIONER)

    @property
    def name(self) -> str:
        return f"ort-{self.device}"

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def cuda_graphs(self) -> bool:
        """Whether the denoiser loop replays CUDA graphs (off after a failed capture)."""
        return self.device == "cuda" and self._graphs is not None and self._graphs.enabled

    @property
    def max_batch(self) -> None:
        """None: ONNX Runtime's batch axis is dynamic."""
        return None

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        if self._graphs is not None:
            self._graphs.close()
        self._closed = True  # a request still running does not load its sessions again
        self._sessions.clear()
        for resizer in self._resizers:
            resizer.close()
        self._resizers.clear()

    # -- sessions ------------------------------------------------------------------------------
    def _providers(self) -> list:
        return session_providers(self.device, self.device_id, self.precision)

    def _session_options(self):
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
        return options

    def _session(self, stage: str):
        session = self._sessions.get(stage)
        if session is not None:
            return session
        if self._closed:
            raise BackendError(stage, "the backend is closed")
        if stage not in self.model.specs:
            raise BackendError(stage, "this model has no such stage")
        path = self.model.onnx_path(stage, self.precision)
        started = time.perf_counter()
        self.model.check_unchanged()  # a graph is read only from the directory that was checked
        try:
            session = self._ort.InferenceSession(str(path), self._session_options(),
                                                 providers=self._providers())
        except Exception as exc:  # ORT raises its own pybind exception types
            self.model.check_unchanged()  # a swap mid-load is reported as such
            self.model.check_damage(path)
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
        check_inputs(spec, inputs)
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
        from ..resize import FrameResizer

        resizer = FrameResizer(self._ort, self.device, self.device_id, clip_size, sync_size,
                               lock=self.lock)
        self._resizers.append(resizer)
        return resizer

    def condition(self, inputs: Mapping[str, np.ndarray],
                  uncond: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Both CFG branches' conditioning for the denoiser: the conditioner's output for
        ``inputs`` (batch B), then ``uncond`` (batch 1, one branch's conditioning) repeated B times.

        The two halves are joined on the host (once per batch, outside the step loop); ``sample``
        places them on the device.
        """
        return stack_branches(self.run(Stage.CONDITIONER, inputs), uncond)

    def sample(self, x0: np.ndarray, mix_latent: Any, conditioning: Mapping[str, Any],
               steps: int, cfg: float):
        """Euler from t=0 to 1 in ``steps`` steps with guidance ``cfg``; returns a device value
        (a host array from the CUDA graphs, whose buffers the next request reuses).

        ``conditioning`` is the conditioner's output (device values or arrays); ``mix_latent`` is
        None for a generation-only model.
        """
        spec = self.model.specs[Stage.DENOISER]
        if self._graphs is not None:
            fixed = {name: self.to_host(value) for name, value in
                     step_invariant_inputs(spec, mix_latent, conditioning).items()}
            per_step = np.zeros(x0.shape[0], spec.tensor(Tensor.T).dtype)
            check_inputs(spec, {**fixed, Tensor.X: x0, Tensor.T: per_step, Tensor.DT: per_step,
                                Tensor.CFG: per_step})  # bad input is not a capture failure
            x1 = self._graphs.sample(x0, fixed, steps, cfg)
            if x1 is not None:
                return x1

        def per_item(name: str, value: float):
            return self.upload(np.full(x0.shape[0], value, spec.tensor(name).dtype))

        times, step = euler_schedule(steps)
        dt, strength = per_item(Tensor.DT, step), per_item(Tensor.CFG, cfg)
        times = [per_item(Tensor.T, t) for t in times]
        fixed = step_invariant_inputs(spec, mix_latent, conditioning)
        fixed = {name: self._on_device(value) for name, value in fixed.items()}
        x = self.upload(x0.astype(spec.tensor(Tensor.X).dtype, copy=False))
        for t in times:
            x = self.run(Stage.DENOISER, {**fixed, Tensor.X: x, Tensor.T: t, Tensor.DT: dt,
                                          Tensor.CFG: strength}, on_device=True)[Tensor.X_NEXT]
        return x

    def _on_device(self, value: Any):
        return value if isinstance(value, self._ort.OrtValue) else self.upload(value)
