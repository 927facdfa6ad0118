"""A built TensorRT engine against its PyTorch fp32 module, both on the GPU (relative L2 per
output), for mmsep-export and gpu_check."""

from __future__ import annotations

from pathlib import Path

from ..runtime.backends.tensorrt import check_engine_tensors
from ..runtime.errors import BackendError
from ..stages import StageSpec
from . import tensorrt_build as tb
from .errors import ParityError
from .example_inputs import example_inputs
from .parity import PARITY_BATCH, ParityResult, relative_l2, torch_reference


def run_engine(engine_path: Path, spec: StageSpec, inputs: dict) -> dict:
    """Run a stage's serialised engine once on CUDA torch tensors; returns the outputs (CUDA
    tensors)."""
    import torch

    dtypes = {t.name: getattr(torch, t.dtype) for t in (*spec.inputs, *spec.outputs)}

    def check(trt, engine):
        try:
            check_engine_tensors(trt, spec, engine)
        except BackendError as exc:
            raise tb.EngineBuildError(str(exc)) from None

    ordered = {t.name: inputs[t.name].to(dtype=dtypes[t.name]) for t in spec.inputs}
    return run_graph_engine(engine_path, spec.name, ordered,
                            {name: dtypes[name] for name in spec.output_names}, check=check)


def run_graph_engine(engine_path: Path, name: str, inputs: dict, outputs: dict, *,
                     check=None) -> dict:
    """Run a serialised engine once: ``inputs`` torch tensors (moved to the GPU), ``outputs``
    {name: torch dtype}; ``check(trt, engine)`` may refuse the engine first. Returns the
    outputs (CUDA tensors)."""
    import torch

    trt = tb._tensorrt()
    logger = tb._logger(trt, name)
    need = tb._checker(logger, name)
    runtime = need(trt.Runtime(logger), "create a runtime")
    engine = need(runtime.deserialize_cuda_engine(Path(engine_path).read_bytes()),
                  f"deserialise {Path(engine_path).name}")
    context = need(engine.create_execution_context(), "create an execution context")
    if check is not None:
        check(trt, engine)
    stream = torch.cuda.Stream()
    keep, got = [], {}
    with torch.cuda.stream(stream):
        for tensor, value in inputs.items():
            value = value.to(device="cuda").contiguous()
            keep.append(value)
            need(context.set_input_shape(tensor, tuple(value.shape)),
                 f"set the shape of input {tensor} to {tuple(value.shape)}")
            need(context.set_tensor_address(tensor, value.data_ptr()), f"bind input {tensor}")
        for tensor, dtype in outputs.items():
            shape = tuple(context.get_tensor_shape(tensor))
            if any(d < 0 for d in shape):
                need(False, f"infer the shape of output {tensor} (got {shape})")
            got[tensor] = torch.empty(shape, dtype=dtype, device="cuda")
            need(context.set_tensor_address(tensor, got[tensor].data_ptr()),
                 f"bind output {tensor}")
        missing = context.infer_shapes()
        if missing:
            need(False, f"infer shapes (unspecified: {list(missing)})")
        need(context.execute_async_v3(stream.cuda_stream), "enqueue the engine")
    stream.synchronize()
    return got


def check_engine(module, spec: StageSpec, engine_path: Path, *, tolerance: float | None = None,
                 batch: int = PARITY_BATCH, seed: int = 1,
                 raise_on_failure: bool = True) -> ParityResult:
    """The engine vs the PyTorch fp32 module, both on the GPU: relative L2 per output.

    The bound is ``tolerance`` (default spec.reduced_precision_tolerance; use
    FP32_ENGINE_TOLERANCE for fp32 engines). The module is moved to the GPU for the reference
    and moved back afterwards; TF32 is off for the reference.
    """
    import torch

    tolerance = spec.reduced_precision_tolerance if tolerance is None else tolerance
    inputs = example_inputs(spec, batch, seed=seed)
    expected = torch_reference(module, spec, inputs, "cuda")
    got = run_engine(engine_path, spec, inputs)
    errors = {}
    for name in spec.output_names:
        want_shape = spec.tensor(name).concrete(batch)
        if tuple(got[name].shape) != want_shape:
            raise ParityError(f"stage {spec.name}: engine output {name} has shape "
                              f"{tuple(got[name].shape)}, contract says {want_shape}")
        errors[name] = relative_l2(got[name].float().cpu().numpy(), expected[name])
    torch.cuda.synchronize()
    result = ParityResult(spec.name, "tensorrt", batch, errors, tolerance)
    if raise_on_failure and not result.passed:
        worst = max(errors, key=errors.get)
        raise ParityError(f"stage {spec.name}: TensorRT output {worst} differs from PyTorch fp32 "
                          f"by relative L2 {errors[worst]:.2e} > {tolerance:.0e}")
    return result
