"""Torch-free video preprocessing against the PyTorch reference (mmsep.models.video_reference)."""

import threading
import warnings

import av
import numpy as np
import pytest

from mmsep.runtime.errors import InputError
from mmsep.runtime.prefetch import PrefetchedWindows
from mmsep.runtime.video import VideoSource, WindowFrames, sync_image
from mmsep.stages import Geometry
from tests.runtime.media import decode_rgb

reference = pytest.importorskip("mmsep.models.video_reference")

WINDOW = 2.0


def geometry(window: float = WINDOW) -> Geometry:
    """A model geometry with the video facts of MMAudio (8 and 25 fps) and tiny audio facts."""
    segments = (int(window * 25) - 16) // 8 + 1
    return Geometry(sample_rate=16000, window_samples=int(window * 16000), window_seconds=window,
                    latent_len=1, latent_dim=1, n_mels=1, mel_frames=1, clip_len=int(window * 8),
                    clip_dim=1, clip_image_size=384, sync_fps=25.0, sync_segments=segments,
                    sync_tokens_per_segment=8, sync_frames_per_segment=16, sync_segment_stride=8,
                    sync_dim=1, sync_image_size=224, text_len=77, text_dim=1, separation=False,
                    conditioning=())


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> np.ndarray:
    """Per-frame PSNR in dB (inf where identical) of (T, ...) arrays."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(peak ** 2 / mse)


def reference_window(frames, times, start, g: Geometry):
    clip = reference.clip_frames(frames, times, WINDOW, start=start).numpy()
    sync = reference.sync_frames(frames, times, WINDOW, start=start).numpy()[:g.sync_frames]
    index = np.arange(g.sync_segments)[:, None] * 8 + np.arange(16)[None, :]
    return clip, sync[index]


@pytest.mark.parametrize("name,starts", [("av", [0.0, 1.0, 1.98, 2.5]),
                                         ("pcm", [0.0, 0.5, 2.5])])
def test_matches_reference_psnr(media, name, starts):
    """Per-frame PSNR of the runtime's CLIP and Synchformer inputs against the reference."""
    path = media[name]
    frames, times = decode_rgb(path)
    g = geometry()
    windows = WindowFrames(VideoSource(path), starts, g)
    worst = np.inf
    for start in starts:
        clip, segments = windows.next_window()
        ref_clip, ref_segments = reference_window(frames, times, start, g)
        assert clip.shape == ref_clip.shape == (16, 3, 384, 384) and clip.dtype == np.float32
        assert clip.flags.c_contiguous and segments.flags.c_contiguous  # no backend copy
        assert segments.shape == ref_segments.shape == (5, 16, 3, 224, 224)
        assert 0.0 <= clip.min() and clip.max() <= 1.0
        assert -1.0 <= segments.min() and segments.max() <= 1.0
        clip_psnr = psnr(clip, ref_clip, 1.0)
        sync_psnr = psnr(segments.reshape(-1, 3, 224, 224), ref_segments.reshape(-1, 3, 224, 224),
                         2.0)
        worst = min(worst, clip_psnr.min(), sync_psnr.min())
        # PIL and torch's uint8 bicubic round differently on a few pixels (one or two grey
        # levels); a wrong frame or a misplaced crop would differ by far more
        assert np.abs(clip - ref_clip).max() <= 2.5 / 255
        assert np.abs(segments - ref_segments).max() <= 5.0 / 255
    print(f"{name}: worst per-frame PSNR vs reference {worst:.1f} dB")
    assert worst >= 35.0


def test_decodes_each_frame_once_and_only_as_far_as_needed(media):
    path = media["av"]  # 3.5 s at 30 fps = 105 frames
    windows = WindowFrames(VideoSource(path), [0.0, 1.0, 2.0], geometry())
    windows.next_window()
    # window 0 needs frames up to its last sync target (47 / 25 s): ~57 frames, not 105
    assert 55 <= windows.decoded <= 62
    assert windows._clip.slots[0] is None and windows._sync.slots[0] is None
    windows.next_window()
    windows.next_window()
    assert windows.decoded == 105
    with pytest.raises(IndexError):
        windows.next_window()


def test_array_input_equals_file_input(media):
    frames, times = decode_rgb(media["av"])
    np.testing.assert_allclose(times, np.arange(len(times)) / 30, atol=1e-4)
    a = WindowFrames(VideoSource.from_array(frames, 30), [0.0, 1.2], geometry())
    b = WindowFrames(VideoSource(media["av"]), [0.0, 1.2], geometry())
    for _ in range(2):
        for x, y in zip(a.next_window(), b.next_window()):
            np.testing.assert_array_equal(x, y)


def test_a_last_frame_held_well_past_the_video_is_reported():
    one_second = np.zeros((10, 8, 8, 3), np.uint8)  # 10 fps: the last frame ends at 1.0 s
    with pytest.warns(RuntimeWarning, match=r"^video array: its frames end at 1\.00 s but the "
                      r"output needs frames up to 1\.88 s; the last frame stands in"):
        WindowFrames(VideoSource.from_array(one_second, 10), [0.0], geometry()).next_window()
    almost = np.zeros((14, 8, 8, 3), np.uint8)  # the last frame (1.3-1.4 s) held 0.48 s more
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WindowFrames(VideoSource.from_array(almost, 10), [0.0], geometry()).next_window()
        # an output of 1 s: the window's frames past it are padding
        WindowFrames(VideoSource.from_array(one_second, 10), [0.0], geometry(),
                     end=1.0).next_window()


def test_portrait_crop_matches_reference_offsets():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (301, 200, 3), dtype=np.uint8)
    out = sync_image(image, 224)
    h, w = reference.short_side_size(301, 200)
    top, left = reference.centre_crop_offsets(h, w)
    torch = pytest.importorskip("torch")
    ref = reference.resize_uint8(torch.from_numpy(image).permute(2, 0, 1)[None], (h, w))[0]
    ref = ref.permute(1, 2, 0).numpy()[top:top + 224, left:left + 224]
    assert out.shape == (224, 224, 3)
    assert np.abs(out.astype(int) - ref).max() <= 1


def test_bad_videos(tmp_path, media):
    with pytest.raises(InputError, match="file not found"):
        VideoSource(tmp_path / "nope.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video at all" * 50)
    with pytest.raises(InputError, match="junk.mp4: unreadable video"):
        VideoSource(junk)
    from mmsep.runtime.example import tones
    import soundfile as sf

    wav = tmp_path / "audio.wav"
    sf.write(wav, tones(0.5, 8000), 8000)
    with pytest.raises(InputError, match="audio.wav: has no video stream"):
        VideoSource(wav)
    with pytest.raises(InputError, match="uint8 RGB"):
        VideoSource.from_array(np.zeros((3, 8, 8), np.uint8), 25)
    with pytest.raises(InputError, match="frame rate"):
        VideoSource.from_array(np.zeros((3, 8, 8, 3), np.uint8), None)
    banner = tmp_path / "banner.mkv"  # 12:1: its short side at 224 would be 2688 wide
    with av.open(str(banner), "w") as out:
        stream = out.add_stream("ffv1", rate=5)
        stream.width, stream.height, stream.pix_fmt = 96, 8, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((8, 96, 3), np.uint8), format="rgb24")
        out.mux(stream.encode(frame.reformat(format="yuv420p")))
        out.mux(stream.encode(None))
    with pytest.raises(InputError, match="banner.mkv: frames of 96x8 are more elongated than 8:1"):
        VideoSource(banner)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(media["av"].read_bytes()[:3000])
    with pytest.raises(InputError, match="truncated.mp4"):
        source = VideoSource(truncated)
        WindowFrames(source, [0.0], geometry()).next_window()


def _write_stream(out, codec: str, size: int, frames: int, rate: int, pix_fmt: str):
    stream = out.add_stream(codec, rate=rate)
    stream.width = stream.height = size
    stream.pix_fmt = pix_fmt
    return stream, [av.VideoFrame.from_ndarray(np.full((size, size, 3), 25 * i, np.uint8),
                                               format="rgb24").reformat(format=pix_fmt)
                    for i in range(frames)]


def test_a_cover_image_is_not_the_video(tmp_path):
    """MP3/M4A files and some MP4s carry a cover image as a one-picture video stream."""
    from av.stream import Disposition

    with_cover = tmp_path / "with_cover.mp4"
    with av.open(str(with_cover), "w") as out:
        cover, pictures = _write_stream(out, "mjpeg", 32, 1, 1, "yuvj420p")
        cover.disposition = Disposition.attached_pic
        video, frames = _write_stream(out, "mpeg4", 48, 10, 5, "yuv420p")
        for stream, items in ((cover, pictures), (video, frames)):
            for item in items:
                out.mux(stream.encode(item))
            out.mux(stream.encode(None))
    source = VideoSource(with_cover)
    assert source.duration == pytest.approx(2.0) and len(list(source.frames())) == 10
    only_cover = tmp_path / "song.m4a"
    with av.open(str(only_cover), "w", format="mp4") as out:
        cover, pictures = _write_stream(out, "mjpeg", 32, 1, 1, "yuvj420p")
        cover.disposition = Disposition.attached_pic
        out.mux(cover.encode(pictures[0]))
        out.mux(cover.encode(None))
    with pytest.raises(InputError, match="song.m4a: has no video stream"):
        VideoSource(only_cover)


def test_a_video_codec_ffmpeg_cannot_decode_is_refused(tmp_path, media):
    from mmsep.runtime.example import make_video

    path = make_video(tmp_path / "clip.mkv", 1.0, size=(48, 64), audio=None)
    data = path.read_bytes()
    assert data.count(b"V_MPEG4/ISO/AVC") == 1  # Matroska's codec id of H.264
    path.write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_MPEG4/ISO/XYZ"))
    with pytest.raises(InputError, match="clip.mkv: unsupported video codec"):
        VideoSource(path)


def producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mmsep-video")]


def test_prefetch_gives_the_same_windows_one_window_ahead(media):
    starts = [0.0, 1.0, 2.0]
    plain = WindowFrames(VideoSource(media["av"]), starts, geometry())
    inner = WindowFrames(VideoSource(media["av"]), starts, geometry())
    with PrefetchedWindows(inner) as ahead:
        for w in range(len(starts)):
            for x, y in zip(plain.next_window(), ahead.next_window()):
                np.testing.assert_array_equal(x, y)
            if w == 0:
                ahead._pending.result()  # the producer has made window 1, and stops there
                assert inner._window == 2 and inner.decoded < 105
        with pytest.raises(IndexError):
            ahead.next_window()
        assert ahead.work_s > 0 and ahead.wait_s >= 0
    assert producer_threads() == []
    plain.close()


def test_prefetch_stops_its_thread_on_early_exit_and_errors(tmp_path, media):
    with PrefetchedWindows(WindowFrames(VideoSource(media["av"]), [0.0, 1.0, 2.0],
                                        geometry())) as ahead:
        ahead.next_window()  # then leave with two windows not taken
    assert producer_threads() == []
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(media["av"].read_bytes()[:3000])
    with pytest.raises(InputError, match="truncated.mp4"):
        with PrefetchedWindows(WindowFrames(VideoSource(truncated), [0.0],
                                            geometry())) as ahead:
            ahead.next_window()  # the producer's error, raised here
    assert producer_threads() == []
