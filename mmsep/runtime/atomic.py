"""The one way mmsep writes a file: beside the target, flushed to disk, renamed into place.

Used by the runtime (audio, mux, demo media) and the exporter (manifest, mixed-precision graphs,
TensorRT engines, timing cache). Torch-free.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a new, empty temporary file in ``path``'s directory; on success it replaces ``path``.

    - The temporary name is unique (``.<stem>.partial-<machine>-<pid>-<random><suffix>``,
      created exclusively), so concurrent writers of one ``path`` never share a file: each
      renames a complete file into place and the last one to finish wins. The suffix is kept for
      writers that pick a container from the extension (soundfile, PyAV); the writer's machine
      and process id let ``remove_stale_partials`` tell a killed writer's leftovers from a live
      one's (``temporary_name``).
    - ``durable``: the file's data is fsynced before the rename and the directory after it, so
      a crash or power loss leaves the old file or the new one, never a truncated one.
    - On any exception, KeyboardInterrupt included, the temporary file is removed and ``path``
      is left as it was.
    - The file is created with the usual permissions (0666 minus the umask).
    """
    path = Path(path)
    tmp = _create_unique(path)
    try:
        yield tmp
        if durable:
            _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
            _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike, names: Sequence[str]) -> Iterator[Path]:
    """Yield a private scratch directory inside ``directory`` in which the caller writes files
    under their final ``names``: for files that name each other, such as an ONNX graph and its
    external data file, which cannot be written under temporary names. On success each name is
    committed into ``directory`` through ``atomic_output``, in the order given (put the file
    that refers to the others last), and a name that was not written is removed from
    ``directory``, so no stale companion is left. On any exception ``directory`` is left as it
    was. The scratch directory is removed either way.
    """
    directory = Path(directory)
    with tempfile.TemporaryDirectory(dir=directory, prefix=f".{names[-1]}.scratch-") as scratch:
        yield Path(scratch)
        for name in names:
            written = Path(scratch) / name
            if written.exists():
                with atomic_output(directory / name) as tmp:
                    os.replace(written, tmp)
            else:
                (directory / name).unlink(missing_ok=True)


def write_bytes_atomically(path: str | os.PathLike, data) -> Path:
    """Write ``data`` (bytes or a buffer) to ``path`` through ``atomic_output``."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return path


def write_json_atomically(path: str | os.PathLike, value) -> Path:
    """``value`` as indented JSON at ``path``, written atomically."""
    import json

    return write_bytes_atomically(path, (json.dumps(value, indent=2) + "\n").encode())


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush every file of ``directory`` and the directory itself to disk (before a directory
    made of them is renamed into place)."""
    directory = Path(directory)
    for path in directory.iterdir():
        if path.is_file() and not path.is_symlink():
            _fsync(path, os.O_RDONLY)
    with contextlib.suppress(OSError):
        _fsync(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def check_writable(path: str | os.PathLike, label: str | None = None) -> None:
    """Create and remove a temporary beside ``path``, as ``atomic_output`` would, before any
    work: OutputError ``<label or path>: cannot write (<reason>)`` when its directory takes no
    new file (no permission, a read-only filesystem) or ``path`` is a device or pipe, which no
    file can be renamed onto."""
    from .errors import OutputError

    path = Path(path)
    check_not_special(path, label)
    try:
        _create_unique(path).unlink()
    except OSError as exc:
        raise OutputError(f"{label or path}: cannot write ({exc.strerror or exc})") from None


def check_not_special(path: str | os.PathLike, label: str | None = None) -> None:
    """OutputError when ``path`` is a device or pipe (``/dev/null``, a FIFO): no output file can
    be renamed onto it. Regular files, directories and missing paths pass."""
    from .errors import OutputError

    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise OutputError(f"{label or path}: cannot write (not a regular file; outputs are "
                          "written whole and renamed into place)")


def _create_unique(path: Path) -> Path:
    while True:
        tmp = path.with_name(temporary_name(path.stem, suffix=path.suffix))
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _machine_tag() -> str:
    """Eight hex digits naming this machine and its process-id namespace (a container has its
    own): a process id in a temporary's name means something only there."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha1(f"{socket.gethostname()}:{namespace}".encode()).hexdigest()[:8]


MACHINE = _machine_tag()


def temporary_name(name: str, kind: str = "partial", suffix: str = "") -> str:
    """``.<name>.<kind>-<machine>-<pid>-<random><suffix>``: the name of a temporary this process
    owns (a file or directory being written, "partial"; a directory moved aside, "old"). On a
    shared file system only the machine that made it judges whether its writer still runs."""
    return f".{name}.{kind}-{MACHINE}-{os.getpid()}-{secrets.token_hex(6)}{suffix}"


_OWNER = r"([0-9a-f]{8})-(\d+)-[0-9a-f]{12}"  # temporary_name's machine, pid and random part
_PARTIAL = re.compile(rf"^\..+\.partial-{_OWNER}(\.[^.]+)?$")
_HOLDER = re.compile(rf"^\.(.+)\.old-{_OWNER}$")


def replace_directory(tmp: Path, out: Path) -> None:
    """Rename the complete directory ``tmp`` to ``out`` and delete what ``out`` held. The old
    directory is first moved into a holder beside it (``temporary_name(name, "old")``): an
    interrupt between the two renames puts it back, and where the process was killed there
    (SIGKILL, power loss) ``remove_stale_partials`` does."""
    holder = out.parent / temporary_name(out.name, "old")
    holder.mkdir()
    old = holder / out.name
    try:
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def remove_stale_partials(directory: str | os.PathLike, wait_s: float = 0.0) -> None:
    """Remove the temporaries ``atomic_output`` (and the exporter's model directories, named
    alike) left in ``directory`` when their process on this machine was killed (SIGKILL, power
    loss); those of running processes are kept, or, with ``wait_s``, waited for that long to end
    (processes being stopped), and those another machine or container made are left to it. A
    directory that ``replace_directory`` had moved aside when it was killed goes back to its
    name when nothing took that name since."""
    deadline = time.monotonic() + wait_s
    while _remove_stale_once(Path(directory)) and time.monotonic() < deadline:
        time.sleep(0.1)


def remove_stale_partials_of(paths: Iterable[str | os.PathLike]) -> None:
    """Remove the temporaries that killed writers of these very files left on this machine
    (their names carry the file's stem and suffix), and no others."""
    for path in map(Path, paths):
        for candidate in path.parent.glob(glob.escape(f".{path.stem}.partial-") + "*"):
            if candidate.name.endswith(path.suffix) and candidate.is_file():
                _remove_dead_partial(candidate)


def _remove_stale_once(directory: Path) -> bool:
    """One pass of remove_stale_partials; whether temporaries of running processes remain."""
    live = False
    for path in directory.iterdir():
        held = _HOLDER.match(path.name)
        if held and path.is_dir() and _dead(*held.group(2, 3)):
            kept, name = path / held.group(1), Path(directory) / held.group(1)
            if kept.is_dir() and not name.exists():
                os.replace(kept, name)
            shutil.rmtree(path, ignore_errors=True)
            continue
        live = _remove_dead_partial(path) or live
    return live


def _remove_dead_partial(path: Path) -> bool:
    """Remove ``path`` if it is a temporary of ``_create_unique`` whose process on this machine
    no longer runs; whether it is one of a running process here."""
    match = _PARTIAL.match(path.name)
    if match is None or match.group(1) != MACHINE:
        return False
    if _alive(int(match.group(2))):
        return True
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
    return False


def _dead(machine: str, pid: str) -> bool:
    """Whether the process that named a temporary (``temporary_name``) is known to have ended:
    only this machine's can be."""
    return machine == MACHINE and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; not a process id
        return True
    return True
