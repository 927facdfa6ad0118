"""The decoder's yuv420p planes with swscale's measured conversion (mmsep.runtime.pixels), and the
device path that uploads them, against swscale's own RGB (the host path)."""

import av
import numpy as np
import pytest
from av.video.reformatter import VideoReformatter

from mmsep.runtime import pixels
from mmsep.runtime.errors import InputError
from mmsep.runtime.pixels import YuvFrame, YuvFrames, conversion_for, rgb, yuv_frame
from mmsep.runtime.video import VideoSource, WindowFrames
from tests.runtime.test_resize import CLIP, SYNC
from tests.runtime.test_video import geometry

UNSPECIFIED, BT709, BT470BG = 2, 1, 5  # AVColorSpace
MPEG, JPEG = 1, 2  # AVColorRange: limited, full


def decoded(path):
    with av.open(str(path)) as container:
        yield from container.decode(video=0)


def test_planes_convert_to_swscales_rgb(media, clip_720p):
    reformatter = VideoReformatter()
    for path in (media["av"], media["pcm"], clip_720p):  # H.264 and MPEG-4 Part 2
        for frame in decoded(path):
            planes = yuv_frame(frame)
            assert isinstance(planes, YuvFrame)
            np.testing.assert_array_equal(planes.rgb(), rgb(frame, reformatter))
            assert planes.luma.dtype == np.uint8 and planes.cb.shape == (frame.height // 2,
                                                                          frame.width // 2)


@pytest.mark.parametrize("colorspace,color_range", [(BT709, MPEG), (UNSPECIFIED, JPEG),
                                                    (BT470BG, MPEG)])
def test_colour_tags_are_measured(media, colorspace, color_range):
    """swscale reads the frame's colour space and range; so do the measured tables."""
    default = conversion_for(UNSPECIFIED, 0, 96, 128)
    tagged = conversion_for(colorspace, color_range, 96, 128)
    assert tagged is not None
    if colorspace != BT470BG:  # BT.470BG is BT.601, swscale's default
        assert not np.array_equal(tagged.red, default.red)
    reformatter = VideoReformatter()
    for frame in decoded(media["av"]):
        frame.colorspace, frame.color_range = colorspace, color_range
        planes = yuv_frame(frame)
        assert planes.conversion is tagged
        np.testing.assert_array_equal(planes.rgb(), rgb(frame, reformatter))


def test_odd_height_keeps_the_rgb_path():
    """swscale converts odd heights another way, which the check at the frame's size finds."""
    assert conversion_for(UNSPECIFIED, 0, 240, 321) is not None
    assert conversion_for(UNSPECIFIED, 0, 241, 320) is None
    frame = av.VideoFrame(320, 241, "yuv420p")
    assert yuv_frame(frame) is None
    assert yuv_frame(np.zeros((4, 4, 3), np.uint8)) is None
    assert yuv_frame(av.VideoFrame(64, 48, "yuv444p")) is None


@pytest.mark.parametrize("with_resizer", [False, True], ids=["host", "device"])
def test_a_frame_swscale_cannot_convert_is_bad_input(media, recorder, with_resizer):
    frames = list(decoded(media["av"]))[:10]
    frames[4].colorspace = 3  # reserved: swscale refuses it
    assert conversion_for(3, 0, 96, 128) is None  # refused, not raised
    source = DecodedFrames(frames, 30.0)
    with WindowFrames(source, [0.0], geometry(1.0),
                      resizer=recorder if with_resizer else None) as windows, \
            pytest.raises(InputError, match="decoded frames: cannot convert a frame to RGB"):
        windows.next_window()


def test_a_conversion_that_is_not_additive_is_refused(monkeypatch):
    """Rounding a float BT.601 conversion is not a sum of per-plane integer tables."""
    def rounded_bt601(planes, colorspace, color_range):
        luma, cb, cr = (p.astype(np.float64) for p in planes)
        cb, cr = (np.repeat(np.repeat(c, 2, 0), 2, 1) - 128 for c in (cb, cr))
        y = 1.164 * (luma - 16)
        out = np.stack([y + 1.596 * cr, y - 0.391 * cb - 0.813 * cr, y + 2.018 * cb], -1)
        return np.clip(np.round(out), 0, 255).astype(np.uint8)

    monkeypatch.setattr(pixels, "_swscale", rounded_bt601)
    pixels.measure_conversion.cache_clear()
    try:
        assert pixels.measure_conversion(UNSPECIFIED, 0) is None
    finally:
        pixels.measure_conversion.cache_clear()


def test_yuv_graph_equals_the_rgb_graph(clip_720p):
    """On the device the planes are converted by table lookups; the resized model inputs equal
    those of swscale's RGB, bit for bit."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from mmsep.runtime.resize import FrameResizer

    frames = list(decoded(clip_720p))[:3]
    planes = YuvFrames.stack([yuv_frame(f) for f in frames])
    reformatter = VideoReformatter()
    colour = np.stack([rgb(f, reformatter) for f in frames])
    clip_index, sync_index = np.array([0, 1, 1, 2]), np.array([[0, 1], [1, 2]])
    resizer = FrameResizer(ort, "cpu", 0, CLIP, SYNC)
    inputs = resizer.graph_inputs(planes, clip_index, sync_index)
    pixel_bytes = sum(inputs[name].nbytes for name in ("luma", "cb", "cr"))
    assert pixel_bytes == colour.nbytes // 2  # 4:2:0 planes: half the bytes of RGB
    assert all(inputs[name].dtype == np.uint8 for name in ("luma", "cb", "cr"))
    from_planes = [v.numpy() for v in resizer.run(planes, clip_index, sync_index)]
    from_rgb = [v.numpy() for v in resizer.run(colour, clip_index, sync_index)]
    for got, want in zip(from_planes, from_rgb):
        np.testing.assert_array_equal(got, want)
    assert len(resizer._sessions) == 2  # one graph per (resolution, pixel format)


class RecordingResizer:
    """A FrameResizer that notes what each window uploads."""

    def __init__(self, resizer):
        self.resizer, self.uploads = resizer, []
        self.takes_yuv, self.accepts = resizer.takes_yuv, resizer.accepts
        self.open_lane, self.close_lane = resizer.open_lane, resizer.close_lane

    def run(self, frames, clip_index, sync_index, lane):
        self.uploads.append(type(frames).__name__)
        return self.resizer.run(frames, clip_index, sync_index, lane)


class DecodedFrames:
    """A video source over already decoded PyAV frames (``VideoSource``'s interface)."""

    def __init__(self, frames, fps: float):
        self._frames, self._fps = frames, fps
        self.path, self.name = None, "decoded frames"
        self.frame_seconds = 1 / fps

    def frames(self):
        for index, frame in enumerate(self._frames):
            yield index / self._fps, frame


def assert_same_windows(host_source, device_source, recorder, starts=(0.0, 0.3)):
    g = geometry(1.0)
    with WindowFrames(host_source, starts, g) as host, \
            WindowFrames(device_source, starts, g, resizer=recorder) as device:
        for _ in starts:
            (clip_in, segments), (d_clip, d_segments) = host.next_window(), device.next_window()
            np.testing.assert_array_equal(d_clip.numpy(), clip_in)
            # [-1, 1]: the graph scales by 2/255 - 1, the host by /255 - 0.5 / 0.5 (float32)
            np.testing.assert_allclose(d_segments.numpy(), segments, rtol=0, atol=1e-6)


@pytest.fixture
def recorder():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from mmsep.runtime.resize import FrameResizer

    return RecordingResizer(FrameResizer(ort, "cpu", 0, CLIP, SYNC))


@pytest.mark.parametrize("clip", ["av", "pcm"])
def test_window_frames_upload_planes_and_match_the_host_path(media, clip, recorder):
    assert_same_windows(VideoSource(media[clip]), VideoSource(media[clip]), recorder)
    assert recorder.uploads == ["YuvFrames"] * 2


def test_a_window_of_mixed_conversions_is_uploaded_as_rgb(media, recorder):
    """Frames whose colour tags change inside a window cannot share one conversion: the window
    goes up as RGB (each frame converted with its own tables), still the host path's pixels."""
    frames = list(decoded(media["av"]))[:40]
    for frame in frames[::3]:
        frame.colorspace = BT709
    source = DecodedFrames(frames, 30.0)
    assert_same_windows(source, source, recorder)
    assert recorder.uploads == ["list"] * 2  # of RGB frames, stacked by the resizer



def test_a_window_whose_resolution_changes_is_resized_on_the_host_once_per_frame(recorder,
                                                                                monkeypatch):
    """A 5 fps source whose frames change size inside the window: the device path falls back to
    the host resize, still the host path's pixels, resizing each distinct held frame once (the
    25 fps Synchformer targets hold each frame five times)."""
    from mmsep.runtime import video

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (96, 128, 3) if i < 4 else (130, 90, 3), dtype=np.uint8)
              for i in range(10)]
    source, g = DecodedFrames(frames, 5.0), geometry(1.0)
    with WindowFrames(source, [0.0], g) as host:
        want = host.next_window()
    resized = []
    host_sync_image = video.sync_image
    monkeypatch.setattr(video, "sync_image", lambda image, size: resized.append(id(image))
                        or host_sync_image(image, size))
    with WindowFrames(source, [0.0], g, resizer=recorder) as device:
        got = device.next_window()
    assert recorder.uploads == []  # nothing went to the device resize
    for got_input, want_input in zip(got, want):
        np.testing.assert_array_equal(got_input, want_input)
    held = {min(int(np.ceil(k / g.sync_fps * 5 - 1e-6)), 9) for k in range(g.sync_frames)}
    assert len(resized) == len(set(resized)) == len(held) == 6  # of 24 targets
