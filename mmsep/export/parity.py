"""Run an exported graph with ONNX Runtime (CPU, fp32) against its PyTorch module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..stages import StageSpec
from .errors import ParityError
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


def torch_reference(module: torch.nn.Module, spec: StageSpec, inputs: dict[str, torch.Tensor]):
    with torch.no_grad():
        out = module.eval()(*inputs.values())
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {name: o.float().numpy() for name, o in zip(spec.output_names, outs)}


def check_onnxruntime(module: torch.nn.Module, spec: StageSpec, path: Path,
                      *, batch: int = PARITY_BATCH, seed: int = 1) -> ParityResult:
    """Relative L2 per output of ORT-CPU vs PyTorch fp32 on random inputs; raises ParityError."""
    import onnxruntime as ort

    inputs = example_inputs(spec, batch, seed=seed)
    expected = torch_reference(module, spec, inputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(list(spec.output_names), {k: v.numpy() for k, v in inputs.items()})
    errors = {}
    for name, value in zip(spec.output_names, got):
        want_shape = spec.tensor(name).concrete(batch)
        if value.shape != want_shape:
            raise ParityError(f"stage {spec.name}: ONNX Runtime output {name} has shape "
                              f"{value.shape}, contract says {want_shape} at batch {batch}")
        errors[name] = relative_l2(value, expected[name])
    result = ParityResult(spec.name, "onnxruntime-cpu-fp32", batch, errors, spec.onnx_tolerance)
    if not result.passed:
        worst = max(errors, key=errors.get)
        raise ParityError(f"stage {spec.name}: ONNX Runtime output {worst} differs from PyTorch by "
                          f"relative L2 {errors[worst]:.2e} > {spec.onnx_tolerance:.0e}")
    return result
