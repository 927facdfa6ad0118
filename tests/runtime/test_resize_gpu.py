"""The frame-resize graph on ONNX Runtime's CUDA provider (GPU machines only): every node on the
GPU, PIL's grey levels bit for bit from the decoder's yuv420p planes of a 720p H.264 clip, in one
call and in several writing in place."""

import numpy as np
import pytest

from mmsep.runtime.backends.ort import cuda_refusal
from mmsep.runtime.pixels import YuvFrames, rgb, yuv_frame
from mmsep.runtime.resize import FrameResizer, clip_plan, resize_frames, sync_plan
from tests.runtime.test_resize import CLIP, SYNC

pytestmark = pytest.mark.gpu


@pytest.fixture
def ort_cuda():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    refusal = cuda_refusal()
    if refusal is not None:
        pytest.skip(refusal)
    from mmsep.runtime.backends.ort import preload_cuda_libraries

    preload_cuda_libraries()
    return ort


class StrictCudaResizer(FrameResizer):
    """A FrameResizer whose sessions refuse to place any node on the CPU (ONNX Runtime then
    wants the CUDA provider alone)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._providers = self._providers[:1]

    def _session_options(self):
        options = super()._session_options()
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return options


def test_yuv_frames_resize_on_the_gpu_as_pil(ort_cuda, clip_720p):
    import av
    from av.video.reformatter import VideoReformatter

    with av.open(str(clip_720p)) as container:
        frames = [frame for _, frame in zip(range(4), container.decode(video=0))]
    planes = YuvFrames.stack([yuv_frame(frame) for frame in frames])
    reformatter = VideoReformatter()
    colour = np.stack([rgb(frame, reformatter) for frame in frames])
    clip_index, sync_index = np.array([0, 1, 2, 3]), np.array([[0, 1], [2, 3]])
    whole = StrictCudaResizer(ort_cuda, "cuda", 0, CLIP, SYNC)
    in_parts = StrictCudaResizer(ort_cuda, "cuda", 0, CLIP, SYNC, pixels_per_call=3 * 720 * 1280)
    want_clip = resize_frames(colour, clip_plan(720, 1280, CLIP))[clip_index]
    want_sync = resize_frames(colour, sync_plan(720, 1280, SYNC))[sync_index]
    for resizer in (whole, in_parts):
        for upload in (planes, colour):
            clip, segments = resizer.run(upload, clip_index, sync_index)
            assert clip.device_name() == segments.device_name() == "cuda"
            np.testing.assert_array_equal(clip.numpy(), want_clip)
            np.testing.assert_array_equal(segments.numpy(), want_sync)
    assert in_parts._gather is not None  # written in place over several calls
