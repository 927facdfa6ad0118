"""Choosing a backend by name.

    ort-cpu   ONNX Runtime, CPUExecutionProvider.
    ort-cuda  ONNX Runtime, CUDAExecutionProvider (needs onnxruntime-gpu and a CUDA device).
    trt       the model directory's TensorRT engines through pycuda; refused when they were
              built for another GPU or TensorRT version.
    auto      the fastest available: trt, then ort-cuda, then ort-cpu; a faster backend that
              cannot be used is skipped with a warning saying why (except when its software is
              not installed, or NVIDIA's driver sees no GPU: cuda_driver.py).

``precision`` chooses ONNX Runtime's graphs (ort.graph_precision: "auto" runs the fp16 graphs on
CUDA, fp32 on the CPU); TensorRT engines run in the precision they were built with.

BackendUnavailable says why a backend cannot be used at all. tensorrt.py is imported only when
TensorRT is asked for or tried.
"""

from __future__ import annotations

import warnings

from ..errors import BackendError, BackendUnavailable
from ..model_dir import ModelDir
from .cuda_driver import cuda_device_problem
from .ort import OrtBackend, cuda_available
from .protocol import Backend

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt")

__all__ = ["BACKENDS", "create_backend", "cuda_available"]


def create_backend(model: ModelDir, name: str = "auto", *, threads: int = 0,
                   precision: str = "auto") -> Backend:
    """The backend called ``name`` (one of BACKENDS) for ``model``; ``auto`` tries trt, ort-cuda
    and ort-cpu in that order. The chosen backend's ``name`` and ``precision`` say which."""
    backend = _create_backend(model, name, threads=threads, precision=precision)
    try:
        model.check_unchanged()  # TensorRT reads every engine up front: not from a swapped dir
    except BaseException:
        backend.close()
        raise
    return backend


def _create_backend(model: ModelDir, name: str, *, threads: int, precision: str) -> Backend:
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "trt":
        from .tensorrt import TrtBackend

        return TrtBackend(model)
    if name == "ort-cpu":
        return OrtBackend(model, "cpu", threads=threads, precision=precision)
    if name == "ort-cuda":
        return OrtBackend(model, "cuda", threads=threads, precision=precision)
    trt = _auto_tensorrt(model)
    if trt is not None:
        return trt
    if cuda_available():
        try:
            return OrtBackend(model, "cuda", threads=threads, precision=precision)
        except (BackendUnavailable, BackendError) as exc:
            warnings.warn(f"ONNX Runtime CUDA is listed but did not start ({exc}); using the CPU",
                          RuntimeWarning, stacklevel=2)
    return OrtBackend(model, "cpu", threads=threads, precision=precision)


def _auto_tensorrt(model: ModelDir) -> Backend | None:
    """The TensorRT backend when its software, a GPU and matching engines are all there; else
    None, with a warning when the reason is worth knowing (engines present but unusable: not
    when the driver sees no GPU, as for ort-cuda)."""
    from .tensorrt import TrtBackend, tensorrt_importable

    if not tensorrt_importable() or (model.manifest.get("tensorrt") or {}).get("status") != "built":
        return None
    if cuda_device_problem() is not None:
        return None
    try:
        return TrtBackend(model)
    except (BackendUnavailable, BackendError) as exc:
        warnings.warn(f"not using the TensorRT engines: {exc}; falling back to ONNX Runtime",
                      RuntimeWarning, stacklevel=3)
        return None
