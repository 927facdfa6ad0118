"""Refuse outputs that would replace an input (torch-free; for mmsep-run, -batch, -serve, -export).

Paths are compared by what they name, not how they are spelled: two paths clash when they are
the same file (``os.path.samefile``: relative and absolute spellings, symbolic links and hard
links all count) or, for a path that does not exist yet, when they resolve to the same place
(``os.path.realpath``). Call these before anything is read or written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .errors import InputError

PathLike = str | os.PathLike


def check_outputs(outputs: Mapping[str, PathLike], inputs: Mapping[str, PathLike], *,
                  others: Mapping[tuple, tuple[str, PathLike]] | None = None) -> None:
    """Raise InputError if an output is the same file as an input or as another output.

    ``outputs`` and ``inputs`` map a label (how the user named it, e.g. ``"--output"``,
    ``"--mix"``, ``"model file"``) to a path. The message is one line naming both, e.g.
    ``--output clip.mp4 is the same file as --video ./clip.mp4; choose another path``.
    ``others``: more inputs, as ``identities`` gives them (built once for many requests).
    """
    seen = identities(inputs)
    others = others or {}
    for label, path in outputs.items():
        key = _identity(path)
        clash = seen.get(key) or others.get(key)
        if clash is not None:
            other_label, other = clash
            raise InputError(f"{label} {path} is the same file as {other_label} {other}; "
                             "choose another path")
        seen[key] = (label, path)


def identities(paths: Mapping[str, PathLike]) -> dict[tuple, tuple[str, PathLike]]:
    """Each file's identity (``check_outputs``'s sense of "the same file") -> its first (label,
    path) in ``paths``."""
    seen: dict[tuple, tuple[str, PathLike]] = {}
    for label, path in paths.items():
        seen.setdefault(_identity(path), (label, path))
    return seen


def check_output_dir(out: PathLike, inputs: Mapping[str, PathLike], *, label: str = "--out"
                     ) -> None:
    """Raise InputError if directory ``out`` is an input, holds an input, or lies inside an
    input directory: writing or replacing ``out`` must never touch what it is made from."""
    out_real = Path(os.path.realpath(out))
    for name, path in inputs.items():
        real = Path(os.path.realpath(path))
        if _identity(out) == _identity(path) or real == out_real:
            raise InputError(f"{label} {out} is {name} {path}; choose another output directory")
        if out_real in real.parents:
            raise InputError(f"{label} {out} contains {name} {path}, which writing it would "
                             "destroy; choose another output directory")
        if real in out_real.parents:
            raise InputError(f"{label} {out} lies inside {name} {path}; choose an output "
                             "directory outside it")


def check_directory_path(path: PathLike, label: str) -> None:
    """Raise InputError unless directory ``path`` exists or can be made: its nearest existing
    ancestor (or itself) must be a directory."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is" if candidate == path else f"lies under {candidate}, which is"
                raise InputError(f"{label} {path} {where} not a directory")
            return


def check_directory_writable(path: PathLike, label: str) -> None:
    """``check_directory_path``, and the directory (or its nearest existing ancestor, where it
    will be made) takes a new file: OutputError before any work otherwise (no permission, a
    read-only or pseudo file system)."""
    from .atomic import check_writable

    path = Path(path)
    check_directory_path(path, label)
    existing = next(c for c in (path, *path.parents) if c.exists())
    check_writable(existing / "probe", label=f"{label} {path}")


def model_files(model_dir: PathLike) -> dict[str, Path]:
    """The files of a model directory, labelled for ``check_outputs`` (empty if it is none)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return {}
    return {f"the model's {p.name}": p for p in sorted(model_dir.iterdir()) if p.is_file()}


def _identity(path: PathLike) -> tuple:
    """(device, inode) of an existing file, else its resolved absolute path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))
