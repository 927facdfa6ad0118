"""The base of every object that holds resources (sessions, engines, threads, files)."""

from __future__ import annotations


class Closing:
    """A context manager that calls ``close`` when its block ends, normally or by an exception.
    Subclasses define ``close``; calling it twice must be harmless."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError
