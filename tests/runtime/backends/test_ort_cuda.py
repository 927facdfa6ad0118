"""ONNX Runtime CUDA (GPU machines only): the fp16 graphs by default, the denoiser loop replayed
as CUDA graphs against the plain loop, and a capture that survives frame resizing on another
thread."""

import threading
import warnings

import numpy as np
import pytest

from mmsep.runtime.backends import OrtBackend
from mmsep.runtime.backends.ort import cuda_refusal, preload_cuda_libraries
from mmsep.runtime.model_dir import ModelDir
from mmsep.runtime.resize import FrameResizer

from tests.helpers import rel_l2 as relative_l2

from .test_ort_graphs import request

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ort_cuda():
    pytest.importorskip("onnxruntime")
    refusal = cuda_refusal()
    if refusal is not None:
        pytest.skip(refusal)
    preload_cuda_libraries()


@pytest.fixture(scope="module")
def model(ort_cuda, model_dir):  # skipped before the test model is exported
    return ModelDir(model_dir)


@pytest.mark.parametrize("precision,bound", [("fp16", 1e-2), ("fp32", 1e-4)])
def test_graphs_replay_the_plain_loop(model, precision, bound):
    """Two requests per batch size: the first captures (graph ids 1 and 2 on their third run),
    the second replays only and must give the first's result bit for bit; both agree with the
    step-by-step loop of the dynamic-batch session."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
        with OrtBackend(model, "cuda", precision=precision) as graphs, \
                OrtBackend(model, "cuda", precision=precision, cuda_graphs=False) as plain:
            assert graphs.precision == precision and graphs.cuda_graphs
            for batch in (2, 1, 2):
                x0, mix, conditioning = request(model, batch, seed=batch)
                first = graphs.sample(x0, mix, conditioning, 25, 4.5)
                again = graphs.sample(x0, mix, conditioning, 25, 4.5)
                want = plain.to_host(plain.sample(x0, mix, conditioning, 25, 4.5))
                np.testing.assert_array_equal(again, first)
                assert relative_l2(first, want) < bound
            assert graphs.cuda_graphs


def test_capture_survives_resizing_on_another_thread(model):
    """The next window's frames are uploaded and resized on the producer thread while the
    denoiser captures: the backend's lock keeps them apart."""
    frames = np.random.default_rng(0).integers(0, 256, (48, 360, 640, 3), np.uint8)
    clip_index = np.arange(16) * 3
    sync_index = np.arange(32).reshape(2, 16)
    stop = threading.Event()
    errors = []

    with OrtBackend(model, "cuda") as backend:
        resizer = backend.frame_resizer(model.info.clip_image_size, model.info.sync_image_size)
        assert isinstance(resizer, FrameResizer)

        def resize_until_stopped():
            try:
                while not stop.is_set():
                    resizer.run(frames, clip_index, sync_index)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        worker = threading.Thread(target=resize_until_stopped)
        worker.start()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                for seed in range(3):
                    backend.sample(*request(model, 2, seed), 25, 4.5)
        finally:
            stop.set()
            worker.join()
        assert not errors and backend.cuda_graphs
        assert resizer._sessions  # kept while the backend is open
    assert not resizer._sessions  # closing the backend released them (and their GPU memory)
