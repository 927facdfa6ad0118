"""Audio out: mono wav/flac/ogg files written piece by piece, atomically when asked.

The output format follows the file name's suffix (``output_format``); ``AudioWriter`` appends
samples as they are produced and reports a failed write (disk full, size limit, I/O error) as
one OutputError naming the output.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np

from ..closing import Closing
from .atomic import atomic_output
from .errors import InputError, OutputError, one_line

FORMATS = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG"}  # output formats; the suffix picks one
SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")  # of wav and flac; the first is the default
OGG_SUBTYPE = "VORBIS"


def output_format(path: str | os.PathLike) -> str | None:
    """The audio format a file name asks for ("wav", "flac", "ogg"), None for other suffixes."""
    name = Path(path).suffix.lower().lstrip(".")
    return name if name in FORMATS else None


def check_format(format: str, subtype: str | None) -> tuple[str, str]:
    """libsndfile's names of ``format`` and ``subtype`` (None: the format's default), checked."""
    fmt = FORMATS.get(format.lower())
    if fmt is None:
        raise InputError(f"unknown output format {format!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "OGG":
        if subtype not in (None, OGG_SUBTYPE):
            raise InputError(f"OGG output is Vorbis-encoded; the sample format {subtype} "
                             "applies to wav and flac only")
        return fmt, OGG_SUBTYPE
    subtype = subtype or SUBTYPES[0]
    if subtype not in SUBTYPES:
        raise InputError(f"unknown sample format {subtype!r}; choose one of {', '.join(SUBTYPES)}")
    if fmt == "FLAC" and subtype == "FLOAT":
        raise InputError("FLAC cannot store FLOAT samples; use --subtype PCM_16 or PCM_24")
    return fmt, subtype


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int, *,
                format: str = "wav", subtype: str | None = None, atomic: bool = True) -> Path:
    """Write mono ``audio`` (L,); PCM and Vorbis output is clipped to [-1, 1] first.

    ``atomic``: write a temporary file beside ``path`` and rename it into place when complete
    (False when the caller manages the temporary file itself)."""
    path = Path(path)
    check_format(format, subtype)  # a bad option is reported before any file exists
    with (atomic_output(path) if atomic else contextlib.nullcontext(path)) as target, \
            AudioWriter(target, sample_rate, format=format, subtype=subtype, name=str(path)) as out:
        out.write(audio)
    return path


def open_audio_outputs(stack: contextlib.ExitStack, paths: list[Path], sample_rate: int,
                       fmt: str, subtype: str | None, names: list[str] | None = None) -> list:
    """One ``AudioWriter`` per output path, on its ``atomic_output`` temporary file, both closed
    with ``stack`` (on success the files are renamed into place). ``names`` are what errors
    call the files (default: the paths)."""
    writers = []
    for path, name in zip(paths, names or [str(p) for p in paths]):
        tmp = stack.enter_context(atomic_output(path))
        writers.append(stack.enter_context(
            AudioWriter(tmp, sample_rate, format=fmt, subtype=subtype, name=name)))
    return writers


class AudioWriter(Closing):
    """A mono wav/flac/ogg file written piece by piece (``write``); PCM and Vorbis are clipped,
    with one warning on close saying how many samples were.

    Not atomic by itself: open it on ``atomic_output``'s temporary path and close it before
    that renames the file. ``frames`` counts the samples written so far. A failed write (disk
    full, file size limit, I/O error) raises OutputError naming ``name`` and the system's
    reason: libsndfile writes through a Python file object here so that reason is not lost.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int, *, format: str = "wav",
                 subtype: str | None = None, name: str | os.PathLike | None = None):
        import soundfile as sf

        self.path = Path(path)
        self.name = name or self.path
        fmt, subtype = check_format(format, subtype)
        self._clip = subtype != "FLOAT"
        self.frames = self.clipped = 0
        try:
            self._sink = _CheckedFile(open_output_file(self.path))
        except OSError as exc:
            raise OutputError(f"{self.name}: cannot write ({one_line(exc)})") from None
        try:
            self._file = sf.SoundFile(self._sink, "w", samplerate=sample_rate, channels=1,
                                      subtype=subtype, format=fmt)
        except Exception as exc:  # noqa: BLE001 - libsndfile's and the file's errors alike
            self._sink.close()
            raise self._failure(exc) from None

    def write(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32)
        if self._clip:
            self.clipped += int(np.count_nonzero(np.abs(samples) > 1.0))
            samples = np.clip(samples, -1.0, 1.0)
        try:
            self._file.write(samples)
        except Exception as exc:  # noqa: BLE001
            raise self._failure(exc) from None
        self.frames += samples.size

    def close(self) -> None:
        if self._sink.closed:
            return
        try:
            self._file.close()  # writes the rest and the final header
        except Exception as exc:  # noqa: BLE001
            raise self._failure(exc) from None
        finally:
            self._sink.close()
        if self._sink.error is not None:
            raise self._failure(self._sink.error)
        if self.clipped:
            warnings.warn(f"{self.name}: {self.clipped} output samples outside [-1, 1] were "
                          "clipped (the FLOAT subtype keeps them)", stacklevel=2)

    def __exit__(self, exc_type, exc, tb) -> None:
        """On an exception only release the file: what failed is already being raised (a
        failed write raising again here would replace it, and end a whole batch job)."""
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):
            self._file.close()
        self._sink.close()

    def _failure(self, exc: BaseException) -> BaseException:
        if isinstance(self._sink.error, KeyboardInterrupt):
            return self._sink.error  # the interrupt, not a write error
        reason = one_line(self._sink.error or exc) or type(exc).__name__
        return OutputError(f"{self.name}: cannot write ({reason})")


def open_output_file(path: Path):
    """The unbuffered file an AudioWriter writes (a write error surfaces at that write)."""
    return open(path, "w+b", buffering=0)


class _CheckedFile:
    """The file libsndfile writes through. libsndfile swallows the reason of a failed write
    (and an exception escaping its callback would only be printed), so a failure is recorded
    in ``error`` and reported to libsndfile as a short write, which makes it fail the call. A
    Ctrl-C or SIGTERM that lands in the callback is recorded the same way and raised again by
    the writer, so that it is not taken for a write error."""

    def __init__(self, raw):
        self._raw = raw
        self.error: OSError | KeyboardInterrupt | None = None

    def write(self, data) -> int:
        if self.error is not None:
            return 0
        view, done = memoryview(data), 0
        try:
            while done < len(view):  # a short write is retried: the next one says why
                written = self._raw.write(view[done:])
                if not written:
                    break
                done += written
        except (OSError, KeyboardInterrupt) as exc:
            self.error = exc
        return done

    def read(self, size: int = -1) -> bytes:
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def close(self) -> None:
        self._raw.close()
