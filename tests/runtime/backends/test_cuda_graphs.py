"""StepGraphs (cuda_graphs.py) on a minimal cuda-python runtime stand-in: a graph that was
captured but cannot be used is destroyed, and graphs are turned off with a warning."""

import enum
import types

import pytest

from mmsep.runtime.backends.cuda_graphs import StepGraphs


class Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1


def runtime(calls: list, *, instantiate_error=Err.cudaSuccess):
    def instantiate(graph, flags):
        calls.append(("instantiate", graph))
        return (instantiate_error, "exec")

    return types.SimpleNamespace(
        cudaError_t=Err,
        cudaStreamCaptureMode=types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1),
        cudaStreamBeginCapture=lambda handle, mode: (Err.cudaSuccess,),
        cudaStreamEndCapture=lambda handle: (Err.cudaSuccess, "graph"),
        cudaGraphInstantiate=instantiate,
        cudaGraphLaunch=lambda executable, handle: calls.append(("launch", executable))
        or (Err.cudaSuccess,),
        cudaGraphDestroy=lambda graph: calls.append(("destroy", graph)) or (Err.cudaSuccess,),
        cudaGraphExecDestroy=lambda ex: calls.append(("destroy exec", ex)) or (Err.cudaSuccess,),
        cudaGetLastError=lambda: (Err.cudaSuccess,))


@pytest.mark.parametrize("failure", ["instantiate", "capture"])
def test_a_graph_captured_but_unusable_is_destroyed(failure):
    calls = []
    bad = Err.cudaErrorInvalidValue if failure == "instantiate" else Err.cudaSuccess
    graphs = StepGraphs(runtime(calls, instantiate_error=bad), "denoiser")

    def capture():
        if failure == "capture":
            raise RuntimeError("an enqueue failed inside the capture")

    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the denoiser loop failed"):
        assert graphs.launch(("key",), 7, capture) is False
    assert not graphs.enabled
    assert calls[-1] == ("destroy", "graph")


def test_a_usable_graph_is_kept_and_replayed():
    calls = []
    graphs = StepGraphs(runtime(calls), "denoiser")
    assert graphs.launch(("key",), 7, lambda: None) and graphs.launch(("key",), 7, lambda: None)
    assert calls == [("instantiate", "graph"), ("launch", "exec"), ("launch", "exec")]
    graphs.close()
    assert calls[-2:] == [("destroy exec", "exec"), ("destroy", "graph")]
