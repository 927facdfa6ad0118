"""What the benchmark ran on: machine, library versions, memory probes, matrix throughput."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata

_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(query: str) -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine_info() -> dict:
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * _PAGE / 2**30, 1),
            "system": f"{platform.system()} {platform.release()}",
            "gpu": None, "driver": None, "cuda": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        driver = _nvidia_smi("driver_version")
        info["driver"] = driver[0] if driver else None
    return info


def _version(module: str, *, imported: bool = False) -> str | None:
    """The installed distribution's version or, with ``imported``, that of the module ``import``
    gives (where two builds are installed, e.g. onnxruntime-gpu on PYTHONPATH ahead of the image's
    onnxruntime, the one that runs; not for torch, whose import would weigh on peak RSS)."""
    if imported:
        try:
            return str(__import__(module).__version__)
        except (ImportError, AttributeError):
            pass
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    ort = _version("onnxruntime", imported=True)
    return {"python": sys.version.split()[0], "numpy": _version("numpy"), "onnxruntime": ort,
            "torch": _version("torch"), "tensorrt": _version("tensorrt"),
            "mmsep": _version("mmsep"), "commit": git_commit()}


def git_commit() -> str | None:
    """The checkout's HEAD (with "+changes" when the tree differs from it), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        def git(*args):
            return subprocess.run(["git", "-C", root, *args], check=True, text=True,
                                  capture_output=True, timeout=10).stdout.strip()

        head = git("rev-parse", "HEAD")
        return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no")
                       else "") if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * _PAGE


class PeakRss:
    """Samples this process's resident set size every ``interval`` seconds on a daemon thread;
    ``window()`` yields a dict whose "peak_mb" is the highest sample seen inside it."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    @contextlib.contextmanager
    def window(self):
        result = {"peak_mb": None}
        self._peak = rss_bytes()
        try:
            yield result
        finally:
            result["peak_mb"] = max(self._peak, rss_bytes()) / 2**20

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class GpuMemory:
    """Peak GPU memory of a run: torch's allocator peak for torch code, or the device-wide used
    memory sampled with nvidia-smi for other runtimes (ONNX Runtime, TensorRT).

    ``window(kind)`` yields a dict with "peak_mb" (None without a GPU or a probe) and "how".
    """

    def __init__(self):
        import torch

        self.torch = torch
        self.available = torch.cuda.is_available()
        self.smi = self.available and _nvidia_smi("memory.used") is not None

    @contextlib.contextmanager
    def window(self, kind: str):
        result = {"peak_mb": None, "how": None}
        if not self.available:
            result["how"] = "no GPU"
            yield result
            return
        torch = self.torch
        if kind == "torch":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            yield result
            torch.cuda.synchronize()
            result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            result["how"] = "torch.cuda.max_memory_allocated"
            return
        if not self.smi:
            result["how"] = "nvidia-smi not found: no device-wide memory probe"
            yield result
            return
        torch.cuda.empty_cache()  # the baseline's cached blocks would count as ours
        peak = [0.0]
        stop = threading.Event()

        def sample():
            while True:
                used = _nvidia_smi("memory.used")
                if used:
                    peak[0] = max(peak[0], float(used[0]))
                if stop.wait(0.05):
                    return

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield result
        finally:
            stop.set()
            thread.join()
            result["peak_mb"] = peak[0]  # nvidia-smi's "MiB"
            result["how"] = ("nvidia-smi memory.used, device-wide (includes other processes "
                             "and torch's live tensors)")


def matrix_tflops(device: str, dtype_name: str, *, size: int | None = None,
                  repeats: int = 7) -> float:
    """Measured dense matrix throughput: median TFLOP/s of a square GEMM on ``device``."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = size or (8192 if device == "cuda" else 2048)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            sync()
            started = time.perf_counter()
            torch.mm(a, b)
            sync()
            if i >= 2:  # the first calls pick kernels and warm caches
                times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e12
