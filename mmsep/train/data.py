"""The clip list (JSONL) and the training mixtures.

One JSON object per line: ``video`` and/or ``audio`` (paths, relative to the JSONL's folder or
absolute), ``text`` (the label a user would query with; optional when there is a video) and an
optional ``class``. The source audio is ``audio`` when given, else the video's audio track.

Training sources are scaled to a peak of ``SOURCE_PEAK`` over the whole file before resampling,
and a silent one is refused, as the authors' feature extraction does for its training split
(``normalize_audio``; validation clips keep their level). A clip shorter than a window is padded
with silence (the authors skip it).

Mixtures follow the authors' training data (mmaudiosep/data/extracted_audio_sep.py): an
interfering clip is scaled so that the target-to-interferer power ratio is an SNR drawn
uniformly from [-15, 15] dB, added, and when the mixture's peak exceeds 1 both the target and the
mixture are divided by that peak. The target is a clip's first window; an interferer is a window
of another clip at a random start (``draw_window_starts``), of another class when clips have
classes (the authors' VGGSound set draws until the label differs; their audio-only set takes any
other clip). The feature cache keeps a clip's first ``INTERFERER_SPAN_WINDOWS`` windows of audio,
within which its interferer windows are taken (the authors: anywhere in the clip; VGGSound's
clips are 10 s, within two 8 s windows).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

SNR_RANGE_DB = (-15.0, 15.0)
SOURCE_PEAK = 0.95  # every training source's peak (the authors' normalize_audio; not validation's)
INTERFERER_SPAN_WINDOWS = 2  # windows of each clip's audio kept for drawing interferers from
_EPS = 1e-6  # as the authors: in the power ratio and the peak


class DataError(ValueError):
    """A clip list or a clip that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Clip:
    audio: Path | None
    video: Path | None
    text: str | None
    label: str | None  # the "class" field

    @property
    def source(self) -> Path:
        """The file the target audio is read from."""
        return self.audio if self.audio is not None else self.video

    def key(self) -> dict:
        """What the feature cache knows the clip by: its files (``file_identity``) and text."""
        return {"audio": file_identity(self.audio), "video": file_identity(self.video),
                "text": self.text}


def file_identity(path: Path | None) -> list | None:
    """A file's absolute path, size and modification time (ns): the same name in another folder,
    or a file rewritten in place, is another file (as ``make`` decides, without reading it)."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def read_clips(path: str | os.PathLike) -> list[Clip]:
    """Parse and check a clip list; every problem is a DataError naming ``path:line``."""
    path = Path(path)
    try:
        # only "\n" ends a line: splitlines() would also cut at U+2028, U+0085, ..., which
        # JSON writers leave unescaped inside strings
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the clip list ({exc})") from None
    clips = [_clip(path, n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if len(clips) < 2:
        raise DataError(f"{path}: needs at least 2 clips (a target and an interferer), "
                        f"found {len(clips)}")
    labels = {c.label for c in clips}
    if None not in labels and len(labels) < 2:
        raise DataError(f"{path}: every clip has class {labels.pop()!r}; interferers come from "
                        "other classes, so at least 2 classes are needed")
    return clips


def _clip(path: Path, line_no: int, line: str) -> Clip:
    where = f"{path}:{line_no}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    unknown = sorted(set(item) - {"audio", "video", "text", "class"})
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(unknown)} "
                        "(expected video, audio, text, class)")
    files = {}
    for field in ("audio", "video"):
        value = item.get(field)
        if value is None:
            files[field] = None
            continue
        if not isinstance(value, str) or not value:
            raise DataError(f"{where}: {field} must be a path string")
        file = Path(value) if Path(value).is_absolute() else path.parent / value
        if not file.is_file():
            raise DataError(f"{where}: {field} file {file} not found")
        files[field] = file
    if files["audio"] is None and files["video"] is None:
        raise DataError(f"{where}: a clip needs a video and/or an audio file")
    text, label = item.get("text"), item.get("class")
    for field, value in (("text", text), ("class", label)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DataError(f"{where}: {field} must be a non-empty string")
    if text is None and files["video"] is None:
        raise DataError(f"{where}: a clip without a video needs a text label (its query)")
    return Clip(files["audio"], files["video"], text, label)


def class_ids(clips: list[Clip]) -> torch.Tensor:
    """(K,) int64: a class index per clip; clips without a class each get their own index."""
    names: dict[str, int] = {}
    ids = []
    for i, clip in enumerate(clips):
        key = clip.label if clip.label is not None else f"\0{i}"
        ids.append(names.setdefault(key, len(names)))
    return torch.tensor(ids, dtype=torch.int64)


def draw_interferers(targets: torch.Tensor, classes: torch.Tensor,
                     gen: torch.Generator) -> torch.Tensor:
    """For each target index, a random clip index of another class, (B,) int64."""
    other = classes[None, :] != classes[targets][:, None]  # (B, K)
    weights = other.to(torch.float64)
    return torch.multinomial(weights, 1, generator=gen).squeeze(1)


def draw_window_starts(lengths: torch.Tensor, window: int,
                       gen: torch.Generator) -> torch.Tensor:
    """(B,) int64: for clips of ``lengths`` samples, a start drawn uniformly from 0 to
    ``length - window`` inclusive (0 for a clip no longer than the window)."""
    room = (lengths - window).clamp(min=0) + 1
    return (torch.rand(lengths.shape, generator=gen, dtype=torch.float64) * room).long()


def mix_at_snr(target: torch.Tensor, interferer: torch.Tensor,
               snr_db: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, mixture), each (B, L): ``target + g * interferer`` at ``snr_db`` (B,), both
    divided by the mixture's peak when it exceeds 1 (the target stays the mixture's part)."""
    power_t = target.pow(2).mean(dim=1)
    power_i = interferer.pow(2).mean(dim=1)
    gain = torch.sqrt(power_t / (10.0 ** (snr_db / 10.0) * (power_i + _EPS)))
    mixture = target + gain[:, None] * interferer
    peak = (mixture.abs() + _EPS).amax(dim=1)
    coeff = torch.where(peak > 1.0, 1.0 / peak, torch.ones_like(peak))[:, None]
    return target * coeff, mixture * coeff


def draw_snr(batch: int, gen: torch.Generator) -> torch.Tensor:
    low, high = SNR_RANGE_DB
    return low + (high - low) * torch.rand(batch, generator=gen, dtype=torch.float64).float()
