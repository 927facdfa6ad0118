"""What every backend offers the Separator, mmsep-batch and the benchmarks, and the helpers the
backends share.

A backend runs the stage graphs of one model directory: numpy arrays in, numpy arrays out, or,
with ``run(..., on_device=True)``, the backend's own device values, which a later ``run`` accepts
as inputs, so a pipeline keeps intermediate tensors where the backend computes and copies to the
host only what it needs there. ``condition`` and ``sample`` are the two calls around the sampling
loop: both CFG branches' conditioning, then every Euler step (``mmsep.stages.euler_schedule``)
without a host round trip. Every failure is a BackendError naming the stage.

This module imports no backend: ort.py and tensorrt.py import it, never each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ...stages import Stage, StageSpec, Tensor
from ..errors import BackendError


@runtime_checkable
class Backend(Protocol):
    """The members the runtime uses; a backend is a context manager that ``close``s on exit."""

    name: str  # one of factory.BACKENDS except "auto": what actually runs

    @property
    def precision(self) -> str:
        """What the graphs or engines compute in: "fp16" (mixed, fp32 I/O), "bf16" or "fp32"."""

    @property
    def max_batch(self) -> int | None:
        """The largest batch of windows the backend accepts (fixed engine profiles), or None
        when its batch axis is unbounded."""

    def run(self, stage: str, inputs: Mapping[str, Any], *,
            on_device: bool = False) -> dict[str, Any]:
        """Run ``stage`` on ``inputs`` (checked with ``check_inputs``): numpy arrays or device
        values of this backend. Returns numpy arrays, or device values with ``on_device``."""

    def condition(self, inputs: Mapping[str, np.ndarray],
                  uncond: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The denoiser's conditioning for a batch B: the conditioner's outputs for ``inputs``,
        then ``uncond`` (one item of one branch) repeated B times (``stack_branches``)."""

    def sample(self, x0: np.ndarray, mix_latent: Any, conditioning: Mapping[str, Any],
               steps: int, cfg: float) -> Any:
        """Euler + CFG from ``x0`` at t=0 to t=1 in ``steps`` denoiser runs with guidance
        ``cfg``; returns the final latent as a device value (or a host array). ``mix_latent`` is
        None for a generation-only model."""

    def to_host(self, value: Any) -> np.ndarray:
        """A numpy copy of a device value (numpy arrays are returned as they are)."""

    def frame_resizer(self, clip_size: int, sync_size: int):
        """A resizer of video frames on the backend's device, or None where the host's resize
        is the better choice: ``run(frames, clip_index, sync_index)`` as
        ``resize.FrameResizer``'s, ``accepts(height, width)`` (False: resize that video on the
        host) and ``takes_yuv`` (whether ``run`` takes ``pixels.YuvFrames``)."""

    def close(self) -> None:
        """Release sessions, engines and device memory; a second call does nothing."""

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc) -> None: ...


def check_inputs(spec: StageSpec, inputs: Mapping[str, Any]) -> int:
    """Names, dtypes and shapes of ``inputs`` against the stage contract, with one consistent
    batch; returns that batch. Values are numpy arrays, OrtValues or TensorRT DeviceArrays."""
    missing = [n for n in spec.input_names if n not in inputs]
    extra = [n for n in inputs if n not in spec.input_names]
    if missing or extra:
        raise BackendError(spec.name, f"inputs missing {missing}, unexpected {extra}")
    batch = None
    for tensor in spec.inputs:
        value = inputs[tensor.name]
        shape = tuple(value.shape() if callable(value.shape) else value.shape)
        dtype = _dtype_name(value)
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


def _dtype_name(value: Any) -> str:
    if hasattr(value, "data_type"):  # an OrtValue: "tensor(float)"
        onnx_type = value.data_type()
        return _ORT_TYPES.get(onnx_type, onnx_type)
    return str(np.dtype(value.dtype))  # a numpy array or a DeviceArray


_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64",
              "tensor(float16)": "float16", "tensor(int32)": "int32", "tensor(bool)": "bool"}


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
        raise BackendError(Stage.CONDITIONER, f"unconditional {name!r} has shape {other.shape}, "
                                              f"expected {(1, *item)}")
    return other


def step_invariant_inputs(spec: StageSpec, mix_latent: Any,
                          conditioning: Mapping[str, Any]) -> dict[str, Any]:
    """The denoiser inputs that stay the same across steps: the conditioning and, for a
    separation model (whose denoiser reads one), the mixture latent."""
    fixed = dict(conditioning)
    if Tensor.MIX_LATENT in spec.input_names:
        if mix_latent is None:
            raise BackendError(spec.name, "this separation model needs a mixture latent")
        fixed[Tensor.MIX_LATENT] = mix_latent
    return fixed
