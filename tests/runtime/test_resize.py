"""Frame resizing as matrix products (mmsep.runtime.resize) against today's PIL path, and its
ONNX graph on ONNX Runtime (CPU) against the numpy evaluation."""

import numpy as np
import pytest

from mmsep.runtime.example import pattern_frame
from mmsep.runtime.pixels import YuvFrames, rgb, yuv_frame
from mmsep.runtime.resize import (FrameResizer, bicubic_weights, clip_plan, resize_frames,
                                  sync_plan)
from mmsep.runtime.resize_graph import band, weight_parts
from mmsep.runtime.video import VideoSource, WindowFrames, clip_image, sync_image
from tests.runtime.media import decode_rgb
from tests.runtime.test_video import geometry

CLIP, SYNC = 384, 224


def pil_inputs(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Today's path: PIL per frame, uint8 out, then the stages' value scaling."""
    clip = np.stack([clip_image(f, CLIP) for f in frames]).transpose(0, 3, 1, 2) / 255
    sync = np.stack([sync_image(f, SYNC) for f in frames]).transpose(0, 3, 1, 2) * (2 / 255) - 1
    return clip, sync


def grey_levels(a: np.ndarray, b: np.ndarray, span: float) -> np.ndarray:
    """a - b in grey levels, for values that span ``span`` over 255 levels."""
    return (a.astype(np.float64) - b.astype(np.float64)) * (255 / span)


def check_fidelity(name: str, frames: np.ndarray) -> None:
    h, w = frames.shape[1:3]
    pil_clip, pil_sync = pil_inputs(frames)
    for kind, plan, pil, span in (("clip", clip_plan(h, w, CLIP), pil_clip, 1.0),
                                  ("sync", sync_plan(h, w, SYNC), pil_sync, 2.0)):
        diff = grey_levels(resize_frames(frames, plan), pil, span)
        worst, mean = np.abs(diff).max(), diff.mean()
        off = (np.abs(diff) > 0.5).mean()
        print(f"{name} {w}x{h} {kind}: max |diff| {worst:.4f} grey levels, mean {mean:+.2e}, "
              f"{off:.1e} of values one level apart")
        # the issue asks for at most one grey level and no shift; float64 passes give PIL's
        # grey levels exactly (what is left is float32 rounding of the value scaling)
        assert worst < 1e-3 and abs(mean) < 1e-5 and off == 0


@pytest.mark.parametrize("height,width", [(241, 321), (321, 241), (224, 300), (100, 100)])
def test_synthetic_frames_match_pil(height, width):
    rng = np.random.default_rng(height * width)
    noise = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)  # worst case: overshoot
    pattern = np.stack([pattern_frame(i, height, width) for i in (0, 7)])
    check_fidelity("noise", noise)
    check_fidelity("pattern", pattern)


def test_decoded_clips_match_pil(media, clip_720p):
    for name, path in (("example", media["av"]), ("h264-720p", clip_720p)):
        frames, _ = decode_rgb(path)
        check_fidelity(name, frames[:4])


def test_fast_rgb_conversion_gives_the_default_pixels(clip_720p, media):
    import av
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    for path in (clip_720p, media["av"]):
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                assert frame.format.name == "yuv420p"
                np.testing.assert_array_equal(rgb(frame, reformatter),
                                              frame.to_ndarray(format="rgb24"))


def test_weights_are_pils():
    # rows sum to one; an unchanged size is the identity; a 2x downscale spans 8 input pixels
    for n_in, n_out in ((321, 384), (1280, 398), (241, 224)):
        np.testing.assert_allclose(bicubic_weights(n_in, n_out).sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(bicubic_weights(50, 50), np.eye(50))
    assert (bicubic_weights(100, 50)[25] != 0).sum() == 8


@pytest.mark.parametrize("height,width", [(241, 321), (720, 1280), (480, 270)])
def test_graph_on_ort_cpu_matches_numpy(height, width):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (5, height, width, 3), dtype=np.uint8)
    clip_index = np.array([0, 0, 1, 2, 3, 4, 4])
    sync_index = np.array([[0, 1, 2], [2, 3, 4]])
    resizer = FrameResizer(ort, "cpu", 0, CLIP, SYNC)
    clip, segments = (v.numpy() for v in resizer.run(frames, clip_index, sync_index))
    want_clip = resize_frames(frames, clip_plan(height, width, CLIP))[clip_index]
    want_sync = resize_frames(frames, sync_plan(height, width, SYNC))[sync_index]
    assert clip.shape == (7, 3, CLIP, CLIP) and clip.dtype == np.float32
    assert segments.shape == (2, 3, 3, SYNC, SYNC) and segments.dtype == np.float32
    for got, want in ((clip, want_clip), (segments, want_sync)):
        np.testing.assert_array_equal(got, want)
    assert len(resizer._sessions) == 1
    resizer.run(frames[:2], clip_index[:1], sync_index[:1, :1])
    assert len(resizer._sessions) == 1  # one graph per input resolution, reused


@pytest.mark.parametrize("n_in,n_out", [(1280, 384), (720, 384), (1280, 224), (321, 384),
                                        (50, 50), (100, 33)])
def test_banded_weights_give_the_dense_product(n_in, n_out):
    """The graph's blocks hold every weight of the dense matrix and read only a band of inputs
    (a 1280 -> 384 pass multiplies a tenth of what the dense product does, 1280 -> 224 a
    sixth)."""
    dense = bicubic_weights(n_in, n_out)
    index, weights = band(dense)
    x = np.random.default_rng(n_in).integers(0, 256, (3, n_in)).astype(np.float64)
    banded = np.einsum("bks,ksj->bkj", x[:, index], weights).reshape(3, -1)[:, :n_out]
    np.testing.assert_array_equal(banded, x @ dense.T)
    assert index.min() >= 0 and index.max() < n_in
    if n_in >= 4 * n_out:
        assert weights.size < dense.size / 4


def test_weight_parts_are_small_exact_integers():
    """Three parts that give back PIL's fixed-point coefficients, each with at most 8 significant
    bits (so that TF32 or float16 multipliers hold them exactly)."""
    _, weights = band(bicubic_weights(1280, 384))
    parts = weight_parts(weights, axis=2).astype(np.int64)
    high, middle, low = np.split(parts, 3, axis=2)
    np.testing.assert_array_equal((high * 2**14 + middle * 2**7 + low) / 2**22, weights)
    assert np.abs(high).max() <= 256 and 0 <= middle.min() and middle.max() < 128
    assert 0 <= low.min() and low.max() < 128 and high.min() < 0  # negative lobes kept


@pytest.mark.parametrize("fps", [5, 30])
def test_window_frames_resized_by_the_graph_match_pil(fps):
    """The device path (distinct frames uploaded once, indices into them) gives the host path's
    windows; at 5 fps most targets repeat a frame."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    frames = np.stack([pattern_frame(i, 90, 120) for i in range(int(2.6 * fps))])
    starts, g = [0.0, 0.55], geometry()
    host = WindowFrames(VideoSource.from_array(frames, fps), starts, g)
    device = WindowFrames(VideoSource.from_array(frames, fps), starts, g,
                          resizer=FrameResizer(ort, "cpu", 0, CLIP, SYNC))
    for _ in starts:
        (clip, segments), (d_clip, d_segments) = host.next_window(), device.next_window()
        assert np.abs(grey_levels(d_clip.numpy(), clip, 1.0)).max() < 1e-3
        assert np.abs(grey_levels(d_segments.numpy(), segments, 2.0)).max() < 1e-3
    host.close()
    device.close()


@pytest.mark.parametrize("yuv", [False, True])
def test_window_resized_in_parts_equals_one_call(yuv):
    """A window with more pixels than a call takes is resized in several calls writing their rows
    in place: the same values as one call, including a part whose frames only Synchformer uses
    and a last part shorter than the others."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    rng = np.random.default_rng(3)
    height, width = 90, 124
    colour = rng.integers(0, 256, (11, height, width, 3), dtype=np.uint8)
    frames = colour
    if yuv:
        av = pytest.importorskip("av")
        frames = YuvFrames.stack([
            yuv_frame(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p"))
            for f in colour])
    clip_index = np.array([0, 0, 1, 2, 2, 9, 10])
    sync_index = np.array([[0, 1, 3, 4], [3, 4, 5, 6], [5, 6, 7, 10]])
    whole = FrameResizer(ort, "cpu", 0, CLIP, SYNC)
    parts = FrameResizer(ort, "cpu", 0, CLIP, SYNC, pixels_per_call=3 * height * width)
    want = [v.numpy() for v in whole.run(frames, clip_index, sync_index)]
    got = [v.numpy() for v in parts.run(frames, clip_index, sync_index)]
    assert parts._gather is not None and whole._gather is None  # the parts path ran
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_parts_bound_the_picks_per_call():
    """Frame ranges hold at most the budget's picks (clip rows and distinct Synchformer frames
    together); a frame picked more often than that is a range of its own."""
    from mmsep.runtime.resize import _parts

    assert _parts(np.array([0, 0, 1, 2]), np.array([1, 2, 3]), 4, 3) == [(0, 1), (1, 2), (2, 4)]
    assert _parts(np.array([0, 0, 0]), np.array([0, 1]), 2, 2) == [(0, 1), (1, 2)]
    assert _parts(np.array([0, 1]), np.array([0, 1]), 2, 100) == [(0, 2)]


def test_sessions_kept_for_the_last_resolutions_and_released_on_close(monkeypatch):
    """A service sees many resolutions: only the most recently used MAX_SESSIONS sessions are
    kept (each holds its own device memory), a resolution seen again after eviction still
    resizes correctly, and close releases them all."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from mmsep.runtime import resize

    monkeypatch.setattr(resize, "MAX_SESSIONS", 2)
    resizer = FrameResizer(ort, "cpu", 0, CLIP, SYNC)
    rng = np.random.default_rng(4)
    one, index = np.zeros(1, np.int64), np.zeros((1, 1), np.int64)
    sizes = [(40, 60), (50, 60), (40, 60), (60, 60), (50, 60)]
    for height, width in sizes:
        frames = rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)
        clip, _ = resizer.run(frames, one, index)
        want = resize_frames(frames, clip_plan(height, width, CLIP))
        np.testing.assert_array_equal(clip.numpy(), want)
    # (40, 60) was used again before (60, 60) came, so (50, 60) went and came back
    assert [key[:2] for key in resizer._sessions] == [(60, 60), (50, 60)]
    resizer.close()
    assert not resizer._sessions
