"""Media whose streams do not start at 0 (cut from a broadcast or a longer file, or an audio track
that starts after its video): frames are picked on the output's time line and --mux puts the
separated audio where the mixture was."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import av
import numpy as np
import pytest

from mmsep.runtime.media_tracks import audio_track_start
from mmsep.runtime.video import VideoSource, WindowFrames
from tests.runtime.media import decode_rgb
from tests.runtime.test_video import geometry

FPS, RATE, SECONDS = 25, 44100, 3.0


def write_clip(path, *, video_start: float, audio_start: float | None):
    """Lossless H.264 (64x48, frame i grey at level 3 i) from ``video_start`` s and, unless
    None, AAC (a 440 Hz tone) from ``audio_start`` s, both ``SECONDS`` long, in the file's own
    time."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.options = {"qp": "0"}
        video.time_base = video.codec_context.time_base = Fraction(1, 90000)
        audio = None
        if audio_start is not None:
            audio = out.add_stream("aac", rate=RATE)
            audio.layout = "mono"
        for i in range(int(SECONDS * FPS)):
            image = np.full((48, 64, 3), 3 * i, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts = round((video_start + i / FPS) * 90000)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if audio is not None:
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(SECONDS * RATE)) / RATE))
            for s in range(0, tone.size, 1024):
                frame = av.AudioFrame.from_ndarray(tone[None, s:s + 1024].astype(np.float32),
                                                   format="fltp", layout="mono")
                frame.sample_rate, frame.time_base = RATE, Fraction(1, RATE)
                frame.pts = s + round(audio_start * RATE)
                out.mux(audio.encode(frame))
            out.mux(audio.encode(None))
    return path


def red_levels(path, origin: float, starts: list[float]) -> list[np.ndarray]:
    """The grey level / 3 (the frame index) of each CLIP frame ``WindowFrames`` picks."""
    g = dataclasses.replace(geometry(1.0), clip_image_size=16, sync_image_size=16)
    with WindowFrames(VideoSource(path), starts, g, origin=origin) as windows:
        return [np.rint(windows.next_window()[0][:, 0].mean(axis=(1, 2)) * 255 / 3).astype(int)
                for _ in starts]


@pytest.mark.parametrize("video_start, audio_start", [(5.0, 5.0), (0.0, 2.0), (1.4, 1.4)])
def test_frames_are_picked_on_the_audio_tracks_time_line(tmp_path, video_start, audio_start):
    path = write_clip(tmp_path / "cut.mp4", video_start=video_start, audio_start=audio_start)
    origin = audio_track_start(path)
    assert origin == pytest.approx(audio_start, abs=1100 / RATE)  # AAC priming: one frame
    _, times = decode_rgb(path)
    assert times[0] == pytest.approx(video_start)
    # output time t shows the frame at origin + t of the file: frame (origin + t - start) * FPS
    picked = red_levels(path, origin, [0.0, 0.5])
    for start, levels in zip([0.0, 0.5], picked):
        targets = origin + start + np.arange(len(levels)) / 8 - video_start
        want = np.clip(np.ceil(targets * FPS - 1e-6), 0, SECONDS * FPS - 1).astype(int)
        np.testing.assert_array_equal(levels, want)


def test_a_video_without_a_time_offset_is_read_as_before(tmp_path):
    path = write_clip(tmp_path / "plain.mp4", video_start=0.0, audio_start=0.0)
    assert audio_track_start(path) == 0.0 and VideoSource(path).start == 0.0
    np.testing.assert_array_equal(red_levels(path, 0.0, [0.0])[0],
                                  np.ceil(np.arange(8) * FPS / 8).astype(int))


def stream_starts(path) -> dict[str, float]:
    """Each stream's first decoded timestamp (s)."""
    starts = {}
    with av.open(str(path)) as container:
        for kind in ("video", "audio"):
            frame = next(container.decode(**{kind: 0}))
            starts[kind] = float(frame.time)
            container.seek(0)
    return starts


@pytest.mark.parametrize("own_audio", [True, False])
def test_mux_puts_the_separated_audio_where_the_mixture_was(model_dir, tmp_path, capsys,
                                                           own_audio):
    from tests.runtime.test_cli import run_cli

    clip = write_clip(tmp_path / "cut.mp4", video_start=5.0, audio_start=6.0)
    mix = ["--mix", str(tmp_path / "mix.wav")] if not own_audio else []
    if mix:
        import soundfile as sf

        sf.write(mix[1], 0.3 * np.sin(np.arange(2 * RATE) / 7.0), RATE)
    out, muxed = tmp_path / "sep.wav", tmp_path / "sep.mp4"
    code, _, err = run_cli(["--model", model_dir, "--video", clip, *mix, "--text", "a tone",
                            "--steps", 1, "-o", out, "--mux", muxed, "-q"], capsys)
    assert code == 0, err
    got, source = stream_starts(muxed), stream_starts(clip)
    assert got["video"] == pytest.approx(source["video"])
    # the file's own audio track: where it was; a separate mixture: from the video's start
    want = source["audio"] if own_audio else source["video"]
    assert got["audio"] == pytest.approx(want, abs=1100 / RATE)


def write_raw_h264(path):
    """2 s of H.264 as an elementary stream: no container times, no durations."""
    with av.open(str(path), "w", format="h264") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for i in range(2 * FPS):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i, np.uint8), format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame.reformat(format="yuv420p")))
        out.mux(video.encode(None))
    return path


def test_a_raw_stream_without_timestamps_has_its_frame_count_as_length(tmp_path):
    assert VideoSource(write_raw_h264(tmp_path / "clip.h264")).duration == pytest.approx(2.0)


def test_mux_refuses_a_raw_stream_before_any_work(model_dir, tmp_path, capsys):
    import soundfile as sf

    from tests.runtime.test_cli import run_cli

    raw = write_raw_h264(tmp_path / "clip.h264")
    sf.write(tmp_path / "mix.wav", 0.3 * np.sin(np.arange(2 * RATE) / 7.0), RATE)
    code, _, err = run_cli(["--model", model_dir, "--video", raw, "--mix", tmp_path / "mix.wav",
                            "--text", "a tone", "--steps", 1, "-o", tmp_path / "sep.wav",
                            "--mux", tmp_path / "sep.mp4"], capsys)
    assert code == 2
    assert err.strip() == (f"mmsep-run: error: --mux {tmp_path / 'sep.mp4'}: {raw} has no "
                           "timestamps to copy (a raw h264 stream?); put it in a container first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.h264", "mix.wav"]


def test_a_rotated_video_reaches_the_model_upright(tmp_path):
    """A display matrix of 90 degrees (a phone's portrait video stored landscape): the frames
    are turned as a player shows them."""
    import struct

    path = tmp_path / "stored.mp4"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.options = {"qp": "0"}
        image = np.zeros((48, 64, 3), np.uint8)
        image[:16, :16] = 255  # a white block at the stored frame's top left
        for i in range(FPS):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    data = bytearray(path.read_bytes())
    matrix = data.index(b"tkhd") + 44  # version 0: the matrix follows 40 bytes of fields
    assert struct.unpack(">9i", data[matrix:matrix + 36])[::4] == (1 << 16, 1 << 16, 1 << 30)
    data[matrix:matrix + 36] = struct.pack(">9i", 0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30)
    rotated = tmp_path / "rotated.mp4"
    rotated.write_bytes(bytes(data))
    g = dataclasses.replace(geometry(1.0), clip_image_size=48, sync_image_size=16)
    with WindowFrames(VideoSource(rotated), [0.0], g) as windows:
        clip = windows.next_window()[0][0].mean(axis=0)  # (48, 48): the frame squeezed square
    # turned clockwise, as the display matrix says: the block is at the top right
    assert clip[:8, -8:].min() > 0.9 and clip[:8, :8].max() < 0.1 and clip[-8:].max() < 0.1
