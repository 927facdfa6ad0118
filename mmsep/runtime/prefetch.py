"""Video windows made one window ahead of the model, on a producer thread."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

from ..closing import Closing
from .video import WindowFrames


class PrefetchedWindows(Closing):
    """``WindowFrames`` run one window ahead on a producer thread.

    While the caller works on window ``w``, the thread decodes and resizes window ``w + 1``; it
    starts on a window only when the previous one has been taken, and the caller makes the float
    inputs from the uint8 images, so at most one window of float inputs and one of resized images
    exist at a time. ``work_s`` is the producer's own time, ``wait_s`` the time callers
    spent blocked in ``next_window``: ``work_s - wait_s`` was hidden behind the caller's work.
    Use as a context manager (or call ``close``): the thread is stopped and joined on every exit
    path, including errors.
    """

    def __init__(self, frames: WindowFrames):
        self._frames = frames
        self._remaining = len(frames.starts)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mmsep-video")
        self._pending: Future | None = None
        # the producer thread adds to one, the caller to the other: no update is lost
        self._produce_s = self._finish_s = self.wait_s = 0.0
        self._schedule()

    @property
    def work_s(self) -> float:
        return self._produce_s + self._finish_s

    def _produce(self):
        started = time.perf_counter()
        try:
            return self._frames.next_images()
        finally:
            self._produce_s += time.perf_counter() - started

    def _schedule(self) -> None:
        self._pending = None
        if self._remaining:
            self._remaining -= 1
            self._pending = self._thread.submit(self._produce)

    def next_window(self) -> tuple:
        if self._pending is None:
            raise IndexError("all windows have been produced")
        started = time.perf_counter()
        try:
            images = self._pending.result()
        finally:
            self.wait_s += time.perf_counter() - started
        self._schedule()
        started = time.perf_counter()
        window = self._frames.finish(images)  # the float inputs: one window's at a time
        spent = time.perf_counter() - started
        self._finish_s += spent
        self.wait_s += spent
        return window

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._remaining = 0
        self._thread.shutdown(wait=True)  # a window being produced is finished, then dropped
        self._pending = None
        self._frames.close()
