"""Run an exported graph with ONNX Runtime (CPU, or CUDA where the export runs on a GPU)
against its PyTorch fp32 module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..stages import StageSpec
from .errors import ExportError, ParityError, UsageError
from .example_inputs import example_inputs

PARITY_BATCH = 3  # deliberately not the export batch, so a baked-in batch size shows up


@dataclass(frozen=True)
class ParityResult:
    stage: str
    backend: str
    batch: int
    errors: dict[str, float]  # output name -> relative L2 error against PyTorch fp32
    tolerance: float

    @property
    def worst(self) -> float:
        return max(self.errors.values())

    @property
    def passed(self) -> bool:
        return self.worst <= self.tolerance

    def to_json(self) -> dict:
        return {"backend": self.backend, "batch": self.batch, "tolerance": self.tolerance,
                "rel_l2": self.errors, "passed": self.passed}


def relative_l2(value: np.ndarray, reference: np.ndarray) -> float:
    value = np.asarray(value, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if value.shape != reference.shape:
        return float("inf")
    return float(np.linalg.norm(value - reference) / max(np.linalg.norm(reference), 1e-30))


PARITY_DEVICES = ("auto", "cpu", "cuda")


def resolve_parity_device(choice: str = "auto") -> str:
    """The device of the export's parity checks: "cuda" (PyTorch and ONNX Runtime on the GPU)
    where both see one, else "cpu"; an explicit "cuda" that cannot run raises UsageError."""
    if choice not in PARITY_DEVICES:
        raise ValueError(f"parity device must be one of {', '.join(PARITY_DEVICES)}, got "
                         f"{choice!r}")
    if choice == "cpu":
        return "cpu"
    missing = cuda_missing()
    if missing and choice == "cuda":
        raise UsageError(f"--parity-device cuda: {'; '.join(missing)}")
    return "cpu" if missing else "cuda"


def cuda_missing() -> list[str]:
    """Why PyTorch and ONNX Runtime cannot both run on a GPU here (empty: they can)."""
    from ..runtime.backends.ort import cuda_refusal

    missing = [] if torch.cuda.is_available() else ["PyTorch sees no CUDA GPU"]
    refusal = cuda_refusal()
    return missing + ([] if refusal is None else [refusal])


def torch_reference(module: torch.nn.Module, spec: StageSpec, inputs: dict[str, torch.Tensor],
                    device: str = "cpu") -> dict[str, np.ndarray]:
    """The module's fp32 outputs (host arrays). On "cuda" the module is moved to the GPU and back
    afterwards, with TF32 off, so that the reference is fp32."""
    if device == "cpu":
        with torch.no_grad():
            return _named_outputs(spec, module.eval()(*inputs.values()))
    home = next((p.device for p in module.parameters()), torch.device("cpu"))
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        module = module.eval().to(device)
        with torch.no_grad():
            return _named_outputs(spec, module(*(v.to(device) for v in inputs.values())))
    finally:
        module.to(home)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        torch.cuda.empty_cache()  # the memory goes back to ONNX Runtime's sessions


def _named_outputs(spec: StageSpec, out) -> dict[str, np.ndarray]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {name: o.float().cpu().numpy() for name, o in zip(spec.output_names, outs)}


class StageReference:
    """A stage's random inputs and PyTorch fp32 outputs per batch size, each computed once on
    ``device`` (the fp32 graph and its reduced copies are checked against the same numbers)."""

    def __init__(self, module: torch.nn.Module, spec: StageSpec, device: str = "cpu",
                 seed: int = 1):
        self.module, self.spec, self.device, self.seed = module, spec, device, seed
        self._cache: dict[int, tuple[dict, dict]] = {}

    def at(self, batch: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(inputs, expected outputs) at ``batch``, as host arrays."""
        if batch not in self._cache:
            inputs = example_inputs(self.spec, batch, seed=self.seed)
            expected = torch_reference(self.module, self.spec, inputs, self.device)
            self._cache[batch] = ({k: v.numpy() for k, v in inputs.items()}, expected)
        return self._cache[batch]


def onnxruntime_session(path: Path, spec: StageSpec, device: str = "cpu",
                        precision: str = "fp32", configure=None):
    """An ONNX Runtime session of ``path`` on ``device``; ExportError when it cannot load or
    would not run on that device (ONNX Runtime falls back to the CPU silently). ``configure``,
    when given, is called with the SessionOptions before the session is made."""
    import onnxruntime as ort

    from ..runtime.backends.ort import preload_cuda_libraries, session_providers

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if configure is not None:
        configure(options)
    if device == "cuda":
        preload_cuda_libraries()
    try:
        session = ort.InferenceSession(str(path), options,
                                       providers=session_providers(device, 0, precision))
    except Exception as exc:  # ORT raises its own exception types (NOT_IMPLEMENTED, ...)
        raise ExportError(f"stage {spec.name}: ONNX Runtime cannot load {Path(path).name} on "
                          f"{device}: {str(exc).splitlines()[0][:300]}") from exc
    wanted = session_providers(device)[0]
    wanted = wanted[0] if isinstance(wanted, tuple) else wanted
    if session.get_providers()[0] != wanted:
        raise ExportError(f"stage {spec.name}: {Path(path).name} runs on "
                          f"{session.get_providers()[0]}, not {wanted}")
    return session


def check_onnxruntime(module: torch.nn.Module, spec: StageSpec, path: Path,
                      *, batch: int = PARITY_BATCH, seed: int = 1, device: str = "cpu",
                      reference: StageReference | None = None) -> ParityResult:
    """Relative L2 per output of the fp32 graph on ONNX Runtime vs PyTorch fp32 on random inputs,
    both on ``device`` (``reference.device`` when a reference is given); raises ParityError
    beyond the stage's bound."""
    reference = reference or StageReference(module, spec, device, seed)
    device = reference.device
    inputs, expected = reference.at(batch)
    session = onnxruntime_session(path, spec, device, "fp32")
    got = session.run(list(spec.output_names), inputs)
    errors = {}
    for name, value in zip(spec.output_names, got):
        want_shape = spec.tensor(name).concrete(batch)
        if value.shape != want_shape:
            raise ParityError(f"stage {spec.name}: ONNX Runtime output {name} has shape "
                              f"{value.shape}, contract says {want_shape} at batch {batch}")
        errors[name] = relative_l2(value, expected[name])
    result = ParityResult(spec.name, f"onnxruntime-{device}-fp32", batch, errors,
                          spec.onnx_tolerance)
    if not result.passed:
        worst = max(errors, key=errors.get)
        raise ParityError(f"stage {spec.name}: ONNX Runtime output {worst} differs from PyTorch by "
                          f"relative L2 {errors[worst]:.2e} > {spec.onnx_tolerance:.0e}")
    return result
