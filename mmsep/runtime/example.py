"""A synthetic example clip for trying mmsep-run without media of your own.

    python -m mmsep.runtime.example --out example

writes ``example/clip.mp4``: a moving test pattern with a stereo audio track (a 330 Hz tone on
the left, a 550 Hz tone on the right, each with faint white noise), and ``example/mix.wav``: both
tones and another noise draw, mono.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import click
import numpy as np

from ..console import FiniteRange
from .atomic import atomic_output


def pattern_frame(i: int, height: int, width: int) -> np.ndarray:
    """A moving test pattern (gradients, a bar and a disc that move with ``i``), uint8 RGB."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 100 * np.sin((x + 7 * i) / 13.0) * np.cos(y / 17.0)
    g = 255 * ((x + 3 * i) % width) / width
    b = 255 * (y / height)
    bar = (np.abs(x - (5 * i) % width) < width / 20)
    disc = (x - width / 2 - 40 * np.cos(i / 5)) ** 2 + (y - height / 2) ** 2 < (height / 6) ** 2
    frame = np.stack([r, g, b], axis=-1)
    frame[bar] = (255, 255, 255)
    frame[disc] = (20, 200, 40)
    return np.clip(frame, 0, 255).astype(np.uint8)


def tones(seconds: float, sample_rate: int, *, freqs=(220.0, 660.0), noise: float = 0.05,
          seed: int = 0) -> np.ndarray:
    """A mixture of sine tones and white noise, mono float32 in [-1, 1]."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    rng = np.random.default_rng(seed)
    mix = sum(0.25 * np.sin(2 * np.pi * f * t) for f in freqs) + noise * rng.standard_normal(t.size)
    return np.clip(mix, -1, 1).astype(np.float32)


def make_video(path: Path, seconds: float, *, fps: int = 25, size=(96, 128),
               audio: str | None = "aac", sample_rate: int = 44100,
               codec: str = "libx264") -> Path:
    """Write an MP4 (or MKV for PCM audio) with a moving pattern and an optional stereo tone
    track. ``size`` is (height, width)."""
    height, width = size
    frames = int(round(seconds * fps))
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=fps)
        video.width, video.height = width, height
        video.pix_fmt = "yuv420p"
        video.options = {"g": "12", "bf": "2"} if codec == "libx264" else {}
        stream = None
        if audio:
            stream = out.add_stream(audio, rate=sample_rate)
            stream.layout = "stereo"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, height, width), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            _encode(out, video, frame)
        _encode(out, video, None)
        if stream is not None:
            left = tones(seconds, sample_rate, freqs=(330.0,), seed=1)
            right = tones(seconds, sample_rate, freqs=(550.0,), seed=2)
            samples = np.stack([left, right])
            fmt = "fltp" if audio == "aac" else "s16p"
            data = samples if fmt == "fltp" else (samples * 32767).astype(np.int16)
            step = 4096
            for start in range(0, data.shape[1], step):
                chunk = np.ascontiguousarray(data[:, start:start + step])
                frame = av.AudioFrame.from_ndarray(chunk, format=fmt, layout="stereo")
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, sample_rate)
                _encode(out, stream, frame)
            _encode(out, stream, None)
    return path


def _encode(container, stream, frame) -> None:
    """Encode ``frame`` (None: flush the encoder) and write its packets."""
    for packet in stream.encode(frame):
        container.mux(packet)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("example"),
              show_default=True, help="Directory to write clip.mp4 and mix.wav into.")
@click.option("--seconds", type=FiniteRange(1.0, 600.0), default=10.0, show_default=True,
              help="Length of the example clip.")
def main(out: Path, seconds: float) -> None:
    """Write a synthetic example video (with a mixture audio track) and a mixture wav."""
    import soundfile

    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "clip.mp4") as tmp:
        make_video(tmp, seconds, fps=25, size=(192, 256))
    with atomic_output(out / "mix.wav") as tmp:
        soundfile.write(tmp, tones(seconds, 44100, freqs=(330.0, 550.0), seed=3), 44100,
                        format="WAV", subtype="PCM_16")
    click.echo(f"wrote {out / 'clip.mp4'} and {out / 'mix.wav'}")


if __name__ == "__main__":
    main()
