"""Writing torch files atomically, with the OSError of a failed write kept."""

from __future__ import annotations

from pathlib import Path

import torch

from mmsep.runtime.atomic import atomic_output


def save_atomically(obj, path: Path) -> None:
    """``torch.save`` through ``atomic_output``. A write that fails (a full disk, a size limit)
    raises its OSError, naming ``path``: torch's zip writer would report it as a bare
    RuntimeError."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        writer = _WriteErrors(fh)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise OSError(writer.error.errno, writer.error.strerror, str(path)) from None
            raise


class _WriteErrors:
    """A file's ``write`` and ``flush`` that keep the OSError a write raised."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()
