"""Progress reporting for the command-line tools (torch-free).

On a terminal: a tqdm bar on stderr, with log lines printed above it. Elsewhere (a CI log, a
file, a pipe) redraws make no sense and interleave with log lines, so progress becomes one plain
line per update, at most one every ``interval`` seconds, plus a closing line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from .closing import Closing

DEFAULT_INTERVAL_S = 10.0


class Progress(Closing):
    """``update(done)`` with the absolute count; ``log(message)`` prints a line (above the bar
    on a terminal); ``close()`` ends it. ``enabled=False`` makes it silent."""

    def __init__(self, total: int, desc: str, unit: str, *, enabled: bool = True,
                 stream: TextIO | None = None, interval: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._clock = clock
        self._started = clock()
        self._last_line: float | None = None
        self._printed = 0
        self.done = 0
        self.detail: str | None = None
        self._bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                             file=self.stream, leave=False)

    def update(self, done: int, detail: str | None = None) -> None:
        """``done``: the absolute count; ``detail``: a short status shown after it."""
        self.done = done
        self.detail = detail
        if not self.enabled:
            return
        if self._bar is not None:
            if detail is not None:
                self._bar.set_postfix_str(detail, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        now = self._clock()
        if self._last_line is None or now - self._last_line >= self.interval:
            self._last_line = now
            self._line()

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._last_line is not None and self.done != self._printed:
            self._line()

    def _line(self) -> None:
        self._printed = self.done
        elapsed = self._clock() - self._started
        detail = f", {self.detail}" if self.detail else ""
        print(f"{self.desc}: {self.done}/{self.total} {_plural(self.unit)}, {elapsed:.1f} s"
              f"{detail}", file=self.stream, flush=True)


def track(items: Iterable, total: int, desc: str, unit: str, *, enabled: bool = True,
          stream: TextIO | None = None) -> Iterator:
    """Iterate ``items`` with a Progress counting each one."""
    with Progress(total, desc, unit, enabled=enabled, stream=stream) as progress:
        for i, item in enumerate(items, start=1):
            yield item
            progress.update(i)


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
