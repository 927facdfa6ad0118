"""What this machine offers the TensorRT backend: the imports, the GPU, and whether a model
directory's engines can run on it (its tensors against the stage contract included).

Engines are specific to the TensorRT version and the GPU they were built with. The manifest's
"tensorrt" section records both; ``engine_refusal`` compares them with this machine and says why
the engines cannot be used (``create_backend`` falls back to ONNX Runtime under ``auto``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np

from ...stages import StageSpec
from ..errors import BackendError, BackendUnavailable, one_line


def import_gpu_stack():
    """(tensorrt, pycuda.driver) or BackendUnavailable saying what is missing."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT is not installed ({exc}); use the ort-cuda or "
                                 "ort-cpu backend") from None
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendUnavailable(f"pycuda is not installed ({exc}); pip install pycuda, or use "
                                 "the ort-cuda or ort-cpu backend") from None
    return tensorrt, cuda


def tensorrt_importable() -> bool:
    """Whether tensorrt and pycuda can be imported (without importing them)."""
    from importlib.util import find_spec

    return all(_found(name, find_spec) for name in ("tensorrt", "pycuda"))


def _found(name: str, find_spec) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def device_info(device_id: int = 0) -> dict:
    """TensorRT version, GPU name and compute capability of this machine (BackendUnavailable
    when TensorRT, pycuda or a CUDA device is missing)."""
    trt, cuda = import_gpu_stack()
    try:
        cuda.init()
        count = cuda.Device.count()
        if device_id >= count:
            raise BackendUnavailable(f"no CUDA device {device_id} (this machine has {count})")
        device = cuda.Device(device_id)
        major, minor = device.compute_capability()
        name = device.name()
    except cuda.Error as exc:
        raise BackendUnavailable(f"CUDA is not usable here ({one_line(exc)})") from None
    return {"version": trt.__version__, "gpu": name, "compute_capability": f"{major}.{minor}"}


def engine_refusal(section: Mapping | None, here: Mapping) -> str | None:
    """Why the manifest's engines (its "tensorrt" section) cannot run on the machine described
    by ``here`` (``device_info()``), or None when they can."""
    if not section or section.get("status") != "built":
        reason = (section or {}).get("reason", "no engines recorded")
        return (f"this model directory has no TensorRT engines ({reason}); build them on this "
                "machine with mmsep-export --engines-only DIR")
    if section.get("version") != here["version"]:
        return (f"the engines were built with TensorRT {section.get('version')} and this machine "
                f"has TensorRT {here['version']}; rebuild them with mmsep-export --engines-only")
    if str(section.get("compute_capability")) != here["compute_capability"] or \
            section.get("gpu") != here["gpu"]:
        return (f"the engines were built for {section.get('gpu')} (compute capability "
                f"{section.get('compute_capability')}) and this GPU is {here['gpu']} (compute "
                f"capability {here['compute_capability']}); rebuild them with "
                "mmsep-export --engines-only")
    return None


def check_engine_tensors(trt, spec: StageSpec, engine) -> None:
    """The engine's I/O tensors against the stage contract: the same names, the same dtypes
    (``trt.nptype`` of each tensor's type); BackendError naming the stage otherwise."""
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    wanted = set(spec.input_names) | set(spec.output_names)
    if names != wanted:
        raise BackendError(spec.name, f"engine tensors {sorted(names)} differ from the stage "
                                      f"contract's {sorted(wanted)}")
    for tensor in (*spec.inputs, *spec.outputs):
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor.name)))
        if dtype != np.dtype(tensor.dtype):
            raise BackendError(spec.name, f"engine tensor {tensor.name!r} is {dtype}, the "
                                          f"contract says {tensor.dtype}")
