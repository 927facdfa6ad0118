"""The GPU probe of the ONNX Runtime backend: NVIDIA's driver library asked through ctypes (here
a stand-in built from C with the driver's three entry points), and what ``auto`` and ``ort-cuda``
do when onnxruntime-gpu is installed on a machine without a GPU."""

import ctypes
import re
import shutil
import subprocess
import warnings

import pytest

from mmsep.runtime.backends import create_backend
from mmsep.runtime.backends import ort as ort_backend
from mmsep.runtime.backends.cuda_driver import DRIVER_LIBRARY, cuda_device_problem, driver_problem
from mmsep.runtime.errors import BackendUnavailable
from mmsep.runtime.model_dir import ModelDir

# cuInit's status and the device count are compiled in; cuGetErrorName knows one name, as the
# driver knows every CUresult it returns.
STAND_IN = r"""
int cuInit(unsigned int flags) { return flags == 0 ? INIT_STATUS : 1; }
int cuDeviceGetCount(int *count) { *count = DEVICE_COUNT; return 0; }
int cuGetErrorName(int status, const char **name) {
    if (status != 100) return 1;
    *name = "CUDA_ERROR_NO_DEVICE";
    return 0;
}
"""


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A loader of the C stand-in of libcuda for a cuInit status and a device count."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the driver stand-in")
    folder = tmp_path_factory.mktemp("driver")
    source = folder / "driver.c"
    source.write_text(STAND_IN)

    def load(init_status: int, devices: int):
        library = folder / f"libcuda_{init_status}_{devices}.so"
        subprocess.run([compiler, "-shared", "-fPIC", f"-DINIT_STATUS={init_status}",
                        f"-DDEVICE_COUNT={devices}", "-o", str(library), str(source)], check=True)
        return ctypes.CDLL(str(library))

    return load


@pytest.mark.parametrize("init_status,devices,problem", [
    (0, 2, None),
    (0, 0, "the NVIDIA driver sees no GPU (check CUDA_VISIBLE_DEVICES)"),
    (100, 1, "the NVIDIA driver cannot start CUDA (CUDA_ERROR_NO_DEVICE, CUresult 100)"),
    (999, 1, "the NVIDIA driver cannot start CUDA (CUresult 999)"),
])
def test_driver_answers(stand_in, init_status, devices, problem):
    assert driver_problem(stand_in(init_status, devices)) == problem


def test_this_machine():
    try:
        ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        assert cuda_device_problem() == f"no NVIDIA driver here ({DRIVER_LIBRARY} cannot be loaded)"
    else:
        pytest.skip(f"{DRIVER_LIBRARY} loads here: its answer depends on the GPUs")


@pytest.fixture
def gpu_provider_without_gpu(monkeypatch):
    """onnxruntime-gpu's listing (it offers CUDA whether or not a GPU is there) on a machine
    whose driver sees no GPU; the problem string it gives."""
    import onnxruntime

    problem = f"no NVIDIA driver here ({DRIVER_LIBRARY} cannot be loaded)"
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort_backend, "cuda_device_problem", lambda: problem)
    monkeypatch.setattr(ort_backend.OrtBackend, "_session",
                        lambda *a: pytest.fail("no CUDA session may be attempted"))
    return problem


def test_auto_takes_the_cpu_quietly(model_dir, gpu_provider_without_gpu, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend = create_backend(ModelDir(model_dir), "auto")
    assert backend.name == "ort-cpu"
    backend.close()


def test_ort_cuda_says_why(model_dir, gpu_provider_without_gpu):
    want = f"ONNX Runtime CUDA needs a GPU: {gpu_provider_without_gpu}; or use the ort-cpu backend"
    with pytest.raises(BackendUnavailable, match=re.escape(want)):
        create_backend(ModelDir(model_dir), "ort-cuda")
