"""Whether this machine has a CUDA GPU, asked of NVIDIA's driver library itself (no torch, no
pycuda: the runtime has neither).

onnxruntime-gpu lists its CUDA provider whether or not a GPU is there; a session asked for it on
a machine without one prints ONNX Runtime's own multi-line errors and falls back to the CPU. The
driver answers the question quietly first: its library is missing, ``cuInit`` fails, or it counts
no device.
"""

from __future__ import annotations

import ctypes
import functools
import sys

DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"


@functools.cache
def cuda_device_problem() -> str | None:
    """Why no CUDA GPU can be used in this process, or None when the driver sees one. Asked once
    per process (``cuInit`` is idempotent; the answer does not change)."""
    try:
        driver = ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return f"no NVIDIA driver here ({DRIVER_LIBRARY} cannot be loaded)"
    return driver_problem(driver)


def driver_problem(driver) -> str | None:
    """``cuda_device_problem`` given the loaded driver library."""
    status = driver.cuInit(0)
    if status != 0:
        return f"the NVIDIA driver cannot start CUDA ({_error_name(driver, status)})"
    count = ctypes.c_int(0)
    status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        return f"the NVIDIA driver cannot count its GPUs ({_error_name(driver, status)})"
    if count.value < 1:
        return "the NVIDIA driver sees no GPU (check CUDA_VISIBLE_DEVICES)"
    return None


def _error_name(driver, status: int) -> str:
    name = ctypes.c_char_p()
    if driver.cuGetErrorName(status, ctypes.byref(name)) == 0 and name.value:
        return f"{name.value.decode(errors='replace')}, CUresult {status}"
    return f"CUresult {status}"
