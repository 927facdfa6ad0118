"""A reduced-precision graph (mixed_precision.py) against its PyTorch fp32 module: ONNX Runtime
(CPU or CUDA), or onnx's reference evaluator for faithful rounding on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..stages import StageSpec
from .errors import ExportError, ParityError
from .parity import (PARITY_BATCH, ParityResult, StageReference, onnxruntime_session,
                     relative_l2)

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
                            raise_on_failure: bool = True, device: str = "cpu",
                            reference: StageReference | None = None
                            ) -> ParityResult | SkippedCheck:
    """The reduced-precision graph vs the PyTorch fp32 module (``reference``, made here on
    ``device`` when not given).

    Relative L2 per output at ``batch`` (not the export batch); the bound is
    ``spec.reduced_precision_tolerance``; raises ParityError beyond it (unless
    ``raise_on_failure`` is False).

    By default the graph runs on ONNX Runtime on the reference's device. On "cuda" that is the
    runtime's own provider, with fp16 kernels throughout. ONNX Runtime's CPU provider has fp16
    kernels for few ops: it computes the others in fp32 and removes the Cast pairs it inserts
    between them, so chains of pointwise ops skip their intermediate fp16 rounding and the CPU
    figure is optimistic. ``emulate=True`` runs onnx's reference evaluator instead (numpy: every op
    rounds its output to the graph's types, as a GPU kernel does) - faithful but slow, for small
    graphs; it also runs bf16 graphs, which ONNX Runtime refuses: without ``emulate`` a bf16 graph
    gives a SkippedCheck with ONNX Runtime's reason instead of a number.
    """
    reference = reference or StageReference(module, spec, "cpu" if emulate else device, seed)
    if emulate:
        return _check_emulated(spec, Path(path), precision, batch, reference, raise_on_failure)
    device = reference.device
    backend = f"onnxruntime-{device}-{precision}"
    try:
        session = onnxruntime_session(path, spec, device, precision)
    except ExportError as exc:
        if precision == "bf16":
            return _bf16_refused(spec, backend, device, exc.__cause__ or exc)
        raise
    inputs, expected = reference.at(batch)
    try:
        got = session.run(list(spec.output_names), inputs)
    except Exception as exc:  # ORT raises its own exception types (NOT_IMPLEMENTED, ...)
        if precision == "bf16":
            return _bf16_refused(spec, backend, device, exc)
        raise ExportError(f"stage {spec.name}: ONNX Runtime failed on {Path(path).name}: "
                          f"{str(exc).splitlines()[0][:300]}") from exc
    return _compare(spec, precision, backend, batch, got, expected, raise_on_failure)


def _bf16_refused(spec: StageSpec, backend: str, device: str, exc: BaseException) -> SkippedCheck:
    import onnxruntime as ort

    first = str(exc).splitlines()[0][:200]
    return SkippedCheck(spec.name, backend, f"ONNX Runtime {ort.__version__} cannot run this "
                        f"bf16 graph on the {device} ({first}); emulate=True runs it with the "
                        "ONNX reference evaluator")


def _check_emulated(spec: StageSpec, path: Path, precision: str, batch: int,
                    reference: StageReference, raise_on_failure: bool) -> ParityResult:
    from onnx.reference import ReferenceEvaluator

    inputs, expected = reference.at(batch)
    try:
        evaluator = ReferenceEvaluator(str(path))
        got = evaluator.run(list(spec.output_names), inputs)
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
