"""CUDA graphs of the TensorRT step loop, through cuda-python's runtime API.

The caller sets every input shape and runs one plain enqueue at those shapes before asking for a
capture: TensorRT cannot capture the first enqueue after a shape change, and shape work inside a
capture invalidates it. The capture itself only binds addresses and enqueues. A failed capture
leaves CUDA's last error set, which TensorRT's next enqueue would report as its own failure, so it
is read and cleared here before the caller falls back to plain enqueues.

cuda-python 12.x and 13.x take ``cudaGraphInstantiate(graph, flags)`` and return (err, exec);
11.x takes ``(graph, log_buffer, buffer_size)`` and returns (err, exec, error_node). Both work.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

from ..errors import BackendError

CACHE_SIZE = 8  # captured loops kept per backend, least recently used dropped first


def import_cudart():
    """cuda-python's runtime API, or None."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            return None
    return runtime


class StepGraphs:
    """Captured step loops keyed by everything they bake in (batch, steps, addresses)."""

    def __init__(self, cudart, stage: str):
        self._rt = cudart
        self._stage = stage
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.enabled = cudart is not None

    def __contains__(self, key: tuple) -> bool:
        return key in self._graphs

    def launch(self, key: tuple, stream_handle, capture: Callable[[], None]) -> bool:
        """Replay the graph for ``key``, capturing ``capture()``'s work first if needed; False
        when graphs are off or the capture failed (graphs are then turned off, with a warning)."""
        if not self.enabled:
            return False
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(stream_handle, capture)
            except (BackendError, RuntimeError, TypeError, ValueError) as exc:
                self._rt.cudaGetLastError()  # the failure must not surface in the next enqueue
                warnings.warn(f"CUDA graph capture of the {self._stage} loop failed ({exc}); "
                              "running the steps one by one", RuntimeWarning, stacklevel=4)
                self.enabled = False
                return False
            self._graphs[key] = entry
            while len(self._graphs) > CACHE_SIZE:
                self._drop(next(iter(self._graphs)))
        self._graphs.move_to_end(key)
        self._check(self._rt.cudaGraphLaunch(entry[1], stream_handle), "launch the graph")
        return True

    def _capture(self, stream_handle, capture: Callable[[], None]) -> tuple:
        rt = self._rt
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check(rt.cudaStreamBeginCapture(stream_handle, mode), "begin a capture")
        ended = None
        try:
            try:
                capture()
            finally:
                ended = rt.cudaStreamEndCapture(stream_handle)
            self._check(ended, "end the capture")
            try:
                result = rt.cudaGraphInstantiate(ended[1], 0)
            except TypeError:  # cuda-python 11.x
                result = rt.cudaGraphInstantiate(ended[1], b"", 0)
            self._check(result, "instantiate the graph")
        except BaseException:
            if ended is not None and ended[0] == rt.cudaError_t.cudaSuccess:
                rt.cudaGraphDestroy(ended[1])  # captured, but not to be used
            raise
        return ended[1], result[1]

    def _check(self, result: tuple, what: str) -> None:
        err = result[0]
        if err != self._rt.cudaError_t.cudaSuccess:
            raise BackendError(self._stage, f"CUDA could not {what} ({err!r})")

    def _drop(self, key: tuple) -> None:
        graph, executable = self._graphs.pop(key)
        self._rt.cudaGraphExecDestroy(executable)
        self._rt.cudaGraphDestroy(graph)

    def close(self) -> None:
        for key in list(self._graphs):
            self._drop(key)
