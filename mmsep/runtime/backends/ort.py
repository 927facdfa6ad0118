"""The ONNX Runtime backend (``ort-cpu``, ``ort-cuda``; protocol.py says what a backend offers).

Sessions are created once per stage, on first use. On CUDA, IO binding keeps every intermediate
tensor on the GPU: device values are OrtValues, and the sampling loop uploads the step times once
and chains the denoiser's outputs from step to step without a host round trip.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...closing import Closing
from ...stages import Stage, Tensor, euler_schedule
from ..errors import BackendError, BackendUnavailable, one_line
from ..model_dir import ModelDir
from .protocol import check_inputs, stack_branches, step_invariant_inputs


def import_ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BackendUnavailable(f"onnxruntime is not installed ({exc}); "
                                 "pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


def cuda_available() -> bool:
    """Whether ONNX Runtime offers its CUDA provider in this environment."""
    try:
        ort = import_ort()
    except BackendUnavailable:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OrtBackend(Closing):
    """ONNX Runtime on CPU or CUDA. Sessions are created once per stage, on first use, and
    reused; ``load_seconds`` records what each creation cost."""

    def __init__(self, model: ModelDir, device: str = "cpu", *, device_id: int = 0,
                 threads: int = 0):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self._ort = import_ort()
        self.model = model
        self.device = device
        self.device_id = device_id
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
            self._session(Stage.CONDITIONER)

    @property
    def name(self) -> str:
        return f"ort-{self.device}"

    @property
    def max_batch(self) -> None:
        """None: ONNX Runtime's batch axis is dynamic."""
        return None

    # -- lifecycle -----------------------------------------------------------------------------
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

        return FrameResizer(self._ort, self.device, self.device_id, clip_size, sync_size)

    def condition(self, inputs: Mapping[str, np.ndarray],
                  uncond: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Both CFG branches' conditioning for the denoiser: the conditioner's output for
        ``inputs`` (batch B), then ``uncond`` (batch 1, one branch's conditioning) repeated B times.

        The two halves are joined on the host (once per batch, outside the step loop) and placed
        on the device for CUDA.
        """
        cond = self.run(Stage.CONDITIONER, inputs)
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
        spec = self.model.specs[Stage.DENOISER]

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
