"""Separator with video: frames resized by the device graph (run here on ORT CPU) give the PIL
path's result; the producer thread's timings and its shutdown on errors."""

import threading

import pytest

from mmsep.runtime import Separator
from tests.helpers import rel_l2

STEPS = 2


def test_device_resize_gives_the_host_path_result(model_dir, media):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from mmsep.runtime.resize import FrameResizer

    with Separator(model_dir, backend="ort-cpu") as sep:
        assert sep._resizer is None  # on the CPU, PIL resizes (faster there)
        host = sep.process(video=media["pcm"], steps=STEPS, seed=3)
        info = sep.info
        sep._resizer = FrameResizer(ort, "cpu", 0, info.clip_image_size, info.sync_image_size)
        device = sep.process(video=media["pcm"], steps=STEPS, seed=3)
    assert device.windows == host.windows == 1
    # same grey levels; only float32 rounding of the value scaling differs
    assert rel_l2(device.audio, host.audio) < 1e-4


def test_timings_split_hidden_decoding(separator, media):
    result = separator.process(video=media["av"], steps=STEPS)
    t = result.timings
    assert t["wall"] > 0 and t["decode"] > 0
    assert 0 <= t["decode_wait"] and 0 <= t["decode_hidden"] <= t["decode"]
    text_only = separator.process(text="a dog", steps=STEPS).timings
    assert text_only["decode_wait"] == text_only["decode_hidden"] == 0.0


def test_producer_thread_stops_when_the_request_fails(separator, media):
    def failing_sink(k, samples):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        separator.process(video=media["av"], steps=STEPS, sink=failing_sink)
    assert [t for t in threading.enumerate() if t.name.startswith("mmsep-video")] == []


def _video_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name.startswith(("mmsep-video", "mmsep-resize"))]


@pytest.mark.parametrize("error", [RuntimeError("device lost"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
@pytest.mark.parametrize("many", [False, True], ids=["process", "process_many"])
def test_an_error_mid_request_closes_the_video_threads(separator, media, monkeypatch, error,
                                                       many):
    def failing_sample(*args, **kwargs):
        assert _video_threads(), "the video's threads run while the batch samples"
        raise error

    monkeypatch.setattr(separator.backend, "sample", failing_sample)
    request = {"video": media["av"], "text": "a dog", "steps": STEPS}
    with pytest.raises(type(error)):
        if many:  # an Exception comes back in the request's place, an interrupt is raised
            [result] = separator.process_many([request])
            raise result
        separator.process(**request)
    assert _video_threads() == []
