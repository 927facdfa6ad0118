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
    """Run a serialised engine once on CUDA torch tensors; returns the outputs (CUDA tensors)."""
    import torch

    trt = tb._tensorrt()
    stage = spec.name
    logger = tb._logger(trt, stage)
    need = tb._checker(logger, stage)
    runtime = need(trt.Runtime(logger), "create a runtime")
    engine = need(runtime.deserialize_cuda_engine(Path(engine_path).read_bytes()),
                  f"deserialise {Path(engine_path).name}")
    context = need(engine.create_execution_context(), "create an execution context")
    try:
        check_engine_tensors(trt, spec, engine)
    except BackendError as exc:
        raise tb.EngineBuildError(str(exc)) from None
    stream = torch.cuda.Stream()
    keep, outputs = [], {}
    with torch.cuda.stream(stream):
        for tensor in spec.inputs:
            dtype = getattr(torch, tensor.dtype)  # the engine's, by check_engine_tensors
            value = inputs[tensor.name].to(device="cuda", dtype=dtype).contiguous()
            keep.append(value)
            need(context.set_input_shape(tensor.name, tuple(value.shape)),
                 f"set the shape of input {tensor.name} to {tuple(value.shape)}")
            need(context.set_tensor_address(tensor.name, value.data_ptr()),
                 f"bind input {tensor.name}")
        for tensor in spec.outputs:
            shape = tuple(context.get_tensor_shape(tensor.name))
            if any(d < 0 for d in shape):
                need(False, f"infer the shape of output {tensor.name} (got {shape})")
            dtype = getattr(torch, tensor.dtype)
            outputs[tensor.name] = torch.empty(shape, dtype=dtype, device="cuda")
            need(context.set_tensor_address(tensor.name, outputs[tensor.name].data_ptr()),
                 f"bind output {tensor.name}")
        missing = context.infer_shapes()
        if missing:
            need(False, f"infer shapes (unspecified: {list(missing)})")
        need(context.execute_async_v3(stream.cuda_stream), "enqueue the engine")
    stream.synchronize()
    return outputs


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
