"""Writing the stages' graphs: each stage's fp32 trace and its reduced-precision copies, in this
process or in forked worker processes, one stage at a time per worker (``mmsep-export --jobs``).

Tracing (torch.export plus the ONNX optimiser) and the precision conversion run on the CPU and
mostly on one core: on a multi-core machine the stages' graphs are written side by side while the
exporting process checks each finished one against PyTorch. Workers are forked when the writer
starts, before the parent uses a GPU, and inherit the stage modules without copying them (copy on
write); they write into the export's temporary directory and send back only small summaries. They
never touch CUDA. Any failure stops every worker (``close``) before the directory is removed.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..stages import StageSpec
from .errors import UsageError
from .mixed_precision import convert_graph
from .onnx_graph import check_graph, export_onnx


@dataclass(frozen=True)
class GraphWork:
    """What one stage needs written into ``directory``: its fp32 graph (unless it was reused) and
    the reduced-precision copies in ``precisions``."""

    name: str
    trace: bool
    precisions: tuple[str, ...]


@dataclass
class GraphsWritten:
    export_seconds: float | None = None
    graph: dict | None = None  # check_graph's summary of a new fp32 graph
    conversions: dict[str, dict] = field(default_factory=dict)  # precision -> convert_graph's


def write_graphs(work: GraphWork, module, spec: StageSpec, directory: Path) -> GraphsWritten:
    written = GraphsWritten()
    path = directory / f"{work.name}.onnx"
    if work.trace:
        started = time.perf_counter()
        export_onnx(module, spec, path)
        written.export_seconds = time.perf_counter() - started
        written.graph = check_graph(path, spec)
    for precision in work.precisions:
        copy = directory / f"{work.name}.{precision}.onnx"
        written.conversions[precision] = convert_graph(path, copy, spec, precision)
    return written


_INHERITED: dict = {}  # what forked workers find in their copy of the parent (modules, specs, dir)


def _write_in_worker(work: GraphWork) -> GraphsWritten:
    import torch

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # one core each: the workers run side by side
    modules, specs, directory = (_INHERITED[k] for k in ("modules", "specs", "directory"))
    return write_graphs(work, modules[work.name], specs[work.name], directory)


def _worker_signals() -> None:
    """A worker leaves interrupts to the exporting process, which stops it (``close``): Ctrl-C
    reaches the whole process group and is ignored here; SIGTERM, which ``close`` sends, ends
    the worker at once instead of running the handler it inherited (mmsep.console's)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


class GraphWriter:
    """``start(works)`` then ``result(name)`` per stage, in any order; ``jobs`` > 1 writes the
    stages in that many forked processes, 1 in this process (when its result is asked for)."""

    def __init__(self, modules: dict, specs: dict[str, StageSpec], directory: Path, jobs: int = 1):
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        if jobs > 1 and "fork" not in multiprocessing.get_all_start_methods():
            raise UsageError("--jobs above 1 needs processes started by fork (Linux); this "
                             "platform has none")
        self.modules, self.specs, self.directory, self.jobs = modules, specs, directory, jobs
        self._works: dict[str, GraphWork] = {}
        self._pending: dict = {}
        self._pool = None

    def start(self, works: list[GraphWork]) -> None:
        self._works = {work.name: work for work in works}
        workers = min(self.jobs, len(works))
        if workers <= 1:
            return
        # fork: the workers inherit the modules (kept in _INHERITED until close, for a worker
        # the pool replaces); they are started here, all at once
        _INHERITED.update(modules=self.modules, specs=self.specs, directory=self.directory)
        self._pool = multiprocessing.get_context("fork").Pool(workers,
                                                              initializer=_worker_signals)
        self._pending = {work.name: self._pool.apply_async(_write_in_worker, (work,))
                         for work in works}

    def result(self, name: str) -> GraphsWritten | None:
        """The stage's written graphs (None when it had nothing to write); a worker's exception
        is raised here."""
        work = self._works.get(name)
        if work is None:
            return None
        if self._pool is None:
            return write_graphs(work, self.modules[name], self.specs[name], self.directory)
        return self._pending[name].get()

    def close(self) -> None:
        """Stop every worker (those still writing are terminated)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        _INHERITED.clear()

    def __enter__(self) -> GraphWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
