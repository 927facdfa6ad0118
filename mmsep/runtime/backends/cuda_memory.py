"""Device memory and host<->device copies of the TensorRT backend, on one pycuda stream.

Device allocations come from cudaMalloc (256-byte aligned) and are kept until ``release``. Host
data crosses through page-locked staging buffers, allocated once per key and reused: copies from
pageable memory are synchronous in effect and cannot overlap anything. A staging buffer is
rewritten only after the stream was synchronised, which every backend call does before it returns.
Every method needs the backend's CUDA context to be current.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ALIGNMENT = 256  # bytes; IExecutionContext::setTensorAddress refuses less aligned addresses


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of ALIGNMENT."""
    return -(-int(nbytes) // ALIGNMENT) * ALIGNMENT


def in_context(method):
    """Run ``method`` with its object's CUDA context (``self._context``) current on this thread,
    popped after."""

    @functools.wraps(method)
    def active(self, *args, **kwargs):
        self._context.push()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._context.pop()

    return active


@dataclass(frozen=True)
class DeviceArray:
    """A tensor in GPU memory at ``ptr`` (owned by the backend)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class CudaMemory:
    def __init__(self, cuda):
        self._cuda = cuda
        self.stream = cuda.Stream()
        self._allocations: list = []
        self._buffers: dict[Any, tuple[int, int]] = {}  # key -> (address, bytes)
        self._staging: dict[Any, np.ndarray] = {}

    def alloc(self, nbytes: int) -> int:
        """The address of a new device allocation of ``nbytes`` (kept until ``release``)."""
        allocation = self._cuda.mem_alloc(max(int(nbytes), 1))
        self._allocations.append(allocation)
        return int(allocation)

    def buffer(self, key, nbytes: int, reserve: int = 0) -> int:
        """The address of the device buffer of ``key``, at least ``nbytes``: allocated with
        ``max(nbytes, reserve)`` bytes when ``key`` has none or a smaller one, else reused."""
        ptr, size = self._buffers.get(key, (0, -1))
        if size < nbytes:
            size = max(int(nbytes), int(reserve))
            ptr = self.alloc(size)
            self._buffers[key] = (ptr, size)
        return ptr

    def _pinned(self, key, nbytes: int) -> np.ndarray:
        buf = self._staging.get(key)
        if buf is None or buf.size < nbytes:
            buf = self._staging[key] = self._cuda.pagelocked_empty(max(nbytes, 1), np.uint8)
        return buf[:nbytes]

    def put(self, ptr: int, array: np.ndarray, key=None) -> None:
        """Enqueue a copy of ``array`` to device address ``ptr`` through the staging buffer of
        ``key`` (by default the address itself)."""
        array = np.ascontiguousarray(array)
        staged = self._pinned(("put", ptr if key is None else key), array.nbytes)
        staged[:] = array.reshape(-1).view(np.uint8)
        self._cuda.memcpy_htod_async(ptr, staged, self.stream)

    def put_rows(self, ptr: int, rows: Sequence[np.ndarray], key) -> None:
        """Enqueue a copy of the equally shaped arrays ``rows``, stacked, to ``ptr``: each is
        copied straight into the staging buffer of ``key``."""
        first = rows[0]
        staged = self._pinned(("put", key), len(rows) * first.nbytes)
        stacked = staged.view(first.dtype).reshape(len(rows), *first.shape)
        for target, row in zip(stacked, rows):
            target[...] = row
        self._cuda.memcpy_htod_async(ptr, staged, self.stream)

    def copy(self, dest: int, src: int, nbytes: int) -> None:
        """Enqueue a device-to-device copy of ``nbytes``."""
        self._cuda.memcpy_dtod_async(dest, src, nbytes, self.stream)

    def fetch(self, values: Mapping[str, DeviceArray]) -> dict[str, np.ndarray]:
        """Host copies of ``values`` (the stream is synchronised)."""
        staged = {}
        for name, value in values.items():
            staged[name] = self._pinned(("fetch", name), value.nbytes).view(value.dtype) \
                .reshape(value.shape)
            self._cuda.memcpy_dtoh_async(staged[name], value.ptr, self.stream)
        self.stream.synchronize()
        return {name: array.copy() for name, array in staged.items()}

    def release(self) -> None:
        self._buffers.clear()
        self._allocations.clear()
        self._staging.clear()
