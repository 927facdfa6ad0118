"""A synthetic labelled corpus for trying (and testing) fine-tuning without real data.

    python -m mmsep.train.synthetic --out corpus --clips-per-class 16 --val-per-class 4

writes ``corpus/train.jsonl`` and ``corpus/val.jsonl`` and, under ``corpus/clips/``, one wav
(the source) and one silent mp4 (a moving pattern) per clip. Four classes, each with its text
label: steady sine tones, noise bursts, click trains and rising chirps. A class's video pattern
(colour, shape, motion) depends on the class, so the video alone tells which source to extract.
Every clip is a deterministic function of (seed, split, index).
"""

from __future__ import annotations

import json
import sys
import zlib
from fractions import Fraction
from pathlib import Path

import av
import click
import numpy as np

from mmsep.console import SEED, FiniteRange
from mmsep.runtime.atomic import atomic_output

SAMPLE_RATE = 44100
FPS = 25
FRAME_SIZE = (48, 64)  # (height, width)
CLASSES = {
    "tone": "a steady sine tone",
    "noise": "bursts of white noise",
    "clicks": "a train of clicks",
    "chirp": "a rising chirp",
}
# per class: background RGB and the moving square's RGB and speed (pixels per frame)
_PATTERNS = {
    "tone": ((30, 30, 120), (250, 220, 40), 1.0),
    "noise": ((120, 30, 30), (240, 240, 240), 3.0),
    "clicks": ((30, 110, 30), (250, 60, 200), -2.0),
    "chirp": ((90, 90, 90), (40, 230, 230), 5.0),
}


def source_audio(name: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """One clip of class ``name``: mono float32, peak about 0.5."""
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    if name == "tone":
        x = np.sin(2 * np.pi * rng.uniform(300, 900) * t + rng.uniform(0, 2 * np.pi))
    elif name == "noise":
        rate = rng.uniform(1.5, 4.0)  # bursts per second, 50 % duty cycle
        gate = (np.floor(t * rate * 2 + rng.uniform(0, 2)) % 2) == 0
        x = rng.standard_normal(n) * gate * 0.5
    elif name == "clicks":
        period = int(SAMPLE_RATE / rng.uniform(4, 12))
        x = np.zeros(n)
        for start in range(int(rng.integers(0, period)), n, period):
            x[start:start + 64] = np.hanning(128)[64:] * rng.choice([-1.0, 1.0])
    elif name == "chirp":
        f0, f1 = rng.uniform(200, 500), rng.uniform(2000, 5000)
        x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds)))
    else:
        raise ValueError(f"unknown class {name!r}; expected one of {', '.join(CLASSES)}")
    return (0.5 * x / max(np.abs(x).max(), 1e-6)).astype(np.float32)


def pattern_frame(name: str, i: int, offset: float) -> np.ndarray:
    """Frame ``i`` of class ``name``'s video: a square moving over a class colour, uint8 RGB."""
    height, width = FRAME_SIZE
    background, colour, speed = _PATTERNS[name]
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = background
    x = int(offset + speed * i) % (width - 12)
    y = int(height / 2 + height / 4 * np.sin(i / 6.0 + offset))
    frame[max(0, y - 6):y + 6, x:x + 12] = colour
    return frame


def write_video(path: Path, name: str, seconds: float, offset: float) -> None:
    """A silent H.264 mp4 of class ``name``'s pattern."""
    height, width = FRAME_SIZE
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(round(seconds * FPS))):
            frame = av.VideoFrame.from_ndarray(pattern_frame(name, i, offset), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_split(root: Path, split: str, per_class: int, seconds: float, seed: int) -> Path:
    """Write ``per_class`` clips of every class and ``<split>.jsonl``; returns the JSONL path."""
    import soundfile

    clips = root / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    records = []
    for k, (name, label) in enumerate(CLASSES.items()):
        for j in range(per_class):
            rng = np.random.default_rng([seed, zlib.crc32(split.encode()), k, j])
            stem = f"{split}-{name}-{j:04d}"
            with atomic_output(clips / f"{stem}.wav") as tmp:
                soundfile.write(tmp, source_audio(name, seconds, rng), SAMPLE_RATE,
                                subtype="FLOAT")
            with atomic_output(clips / f"{stem}.mp4") as tmp:
                write_video(tmp, name, seconds, offset=float(rng.uniform(0, 40)))
            records.append({"audio": f"clips/{stem}.wav", "video": f"clips/{stem}.mp4",
                            "text": label, "class": name})
    path = root / f"{split}.jsonl"
    with atomic_output(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write train.jsonl, val.jsonl and clips/ into.")
@click.option("--clips-per-class", type=click.IntRange(1, 10000), default=16, show_default=True,
              help="Training clips per class.")
@click.option("--val-per-class", type=click.IntRange(1, 10000), default=4, show_default=True,
              help="Validation clips per class.")
@click.option("--seconds", type=FiniteRange(2.0, 60.0), default=2.0, show_default=True,
              help="Length of every clip (at least the training window).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Corpus seed.")
def main(out: Path, clips_per_class: int, val_per_class: int, seconds: float, seed: int) -> None:
    """Write a synthetic labelled corpus (4 classes, audio + class-dependent video + text)."""
    try:
        train = write_split(out, "train", clips_per_class, seconds, seed)
        val = write_split(out, "val", val_per_class, seconds, seed)
    except OSError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {train} and {val}")


if __name__ == "__main__":
    main()
