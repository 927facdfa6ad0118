"""Error types of the runtime; the CLI maps them to exit codes (2: bad input, 1: internal)."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    # FFmpeg errors carry the errno and path in str(); their strerror is the readable part
    text = " ".join(str(getattr(exc, "strerror", None) or exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class InputError(ValueError):
    """Something the user gave is unusable: a missing or corrupt file, an empty text, an option
    out of range. The message is one line and names the file or option."""


class OutputError(InputError):
    """An output cannot be written (disk full, file size limit, I/O error, no permission). The
    message names the output; nothing partial is left behind."""


class ModelDirError(InputError):
    """The model directory is missing, incomplete, tampered with or of another format."""


class BackendUnavailable(InputError):
    """The requested backend cannot run on this machine or in this build."""


class BackendError(RuntimeError):
    """A stage graph failed to load or run; the message names the stage."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"stage {stage!r}: {message}")
        self.stage = stage
