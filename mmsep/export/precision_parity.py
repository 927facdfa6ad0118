"""A reduced-precision graph (mixed_precision.py) on the CPU against its PyTorch fp32 module:
ONNX Runtime's CPU provider, or onnx's reference evaluator for faithful rounding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..stages import StageSpec
from .errors import ExportError, ParityError
from .parity import PARITY_BATCH, ParityResult, relative_l2, torch_reference

@dataclass(frozen=True)
class SkippedCheck:
    """A parity check that could not run here, with the reason (never reported as passed)."""

    stage: str
    backend: str
    reason: str

    def to_json(self) -> dict:
        return {"backend": self.backend, "skipped": self.reason}


def check_reduced_precision(module, spec: StageSpec, path: Path, precision: str = "fp16", *,
                            batch: int = PARITY_BATCH, seed: int = 1, emulate: bool = False,
                            raise_on_failure: bool = True) -> ParityResult | SkippedCheck:
    """The reduced-precision graph on the CPU vs the PyTorch fp32 module.

    Relative L2 per output at ``batch`` (not the export batch); the bound is
    ``spec.reduced_precision_tolerance``; raises ParityError beyond it (unless
    ``raise_on_failure`` is False).

    By default the graph runs on ONNX Runtime's CPU provider. That provider has fp16 kernels for
    few ops: it computes the others in fp32 and removes the Cast pairs it inserts between them, so
    chains of pointwise ops skip their intermediate fp16 rounding and the figure is optimistic.
    ``emulate=True`` runs onnx's reference evaluator instead (numpy: every op rounds its output
    to the graph's types, as a GPU kernel does) - faithful but slow, for small graphs; it also
    runs bf16 graphs, which ONNX Runtime refuses: without ``emulate`` a bf16 graph gives a
    SkippedCheck with ONNX Runtime's reason instead of a number.
    """
    if emulate:
        return _check_emulated(module, spec, Path(path), precision, batch, seed, raise_on_failure)
    import onnxruntime as ort

    from .example_inputs import example_inputs

    backend = f"onnxruntime-cpu-{precision}"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (NOT_IMPLEMENTED, ...)
        if precision == "bf16":
            first = str(exc).splitlines()[0][:200]
            return SkippedCheck(spec.name, backend, f"ONNX Runtime {ort.__version__} cannot run "
                                f"this bf16 graph on the CPU ({first}); emulate=True runs it "
                                "with the ONNX reference evaluator")
        raise ExportError(f"stage {spec.name}: ONNX Runtime cannot load {Path(path).name}: "
                          f"{str(exc).splitlines()[0][:300]}") from exc
    inputs = example_inputs(spec, batch, seed=seed)
    expected = torch_reference(module, spec, inputs)
    try:
        got = session.run(list(spec.output_names), {k: v.numpy() for k, v in inputs.items()})
    except Exception as exc:
        if precision == "bf16":
            return SkippedCheck(spec.name, backend, f"ONNX Runtime {ort.__version__} cannot run "
                                f"this bf16 graph on the CPU ({str(exc).splitlines()[0][:200]})")
        raise ExportError(f"stage {spec.name}: ONNX Runtime failed on {Path(path).name}: "
                          f"{str(exc).splitlines()[0][:300]}") from exc
    return _compare(spec, precision, backend, batch, got, expected, raise_on_failure)


def _check_emulated(module, spec: StageSpec, path: Path, precision: str, batch: int, seed: int,
                    raise_on_failure: bool) -> ParityResult:
    from onnx.reference import ReferenceEvaluator

    from .example_inputs import example_inputs

    inputs = example_inputs(spec, batch, seed=seed)
    expected = torch_reference(module, spec, inputs)
    try:
        evaluator = ReferenceEvaluator(str(path))
        got = evaluator.run(list(spec.output_names), {k: v.numpy() for k, v in inputs.items()})
    except Exception as exc:  # the evaluator raises many types
        raise ExportError(f"stage {spec.name}: the ONNX reference evaluator failed on "
                          f"{path.name}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return _compare(spec, precision, f"onnx-reference-{precision}", batch, got, expected,
                    raise_on_failure)


def _compare(spec: StageSpec, precision: str, backend: str, batch: int, got, expected: dict,
             raise_on_failure: bool) -> ParityResult:
    errors = {}
    for name, value in zip(spec.output_names, got):
        value = np.asarray(value)
        want_shape = spec.tensor(name).concrete(batch)
        if value.shape != want_shape:
            raise ParityError(f"stage {spec.name}: {precision} graph output {name} has shape "
                              f"{value.shape}, contract says {want_shape} at batch {batch}")
        errors[name] = relative_l2(value, expected[name])
    result = ParityResult(spec.name, backend, batch, errors, spec.reduced_precision_tolerance)
    if raise_on_failure and not result.passed:
        worst = max(errors, key=errors.get)
        raise ParityError(f"stage {spec.name}: {precision} graph output {worst} differs from "
                          f"PyTorch fp32 by relative L2 {errors[worst]:.2e} > "
                          f"{spec.reduced_precision_tolerance:.0e}")
    return result
