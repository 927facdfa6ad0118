"""How every mmsep console program ends (torch-free): one line per error, never a traceback,
and the exit codes of ``exit_codes``; SIGTERM (kill, a job scheduler) and SIGHUP (a closed
terminal) unwind like Ctrl-C, so that temporary outputs are removed on the way out."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import warnings

import click

from .exit_codes import EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE


# a seed option of the torch programs: what torch's generators take (larger ones failed with
# "Overflow when unpacking long long")
SEED = click.IntRange(0, 2**63 - 1)


class FiniteRange(click.FloatRange):
    """A FloatRange of finite numbers: click's own lets NaN through every bound, and infinity
    through an open end."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def quiet_option(help_text: str):
    """The ``--quiet``/``-q`` flag every console program spells the same way."""
    return click.option("--quiet", "-q", is_flag=True, help=help_text)


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM, and SIGHUP (the terminal closed) unless it is ignored (nohup), raise
    KeyboardInterrupt in the main thread while the block runs."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hangup = getattr(signal, "SIGHUP", None)
    caught = [signal.SIGTERM] + ([hangup] if hangup is not None and
                                 signal.getsignal(hangup) is not signal.SIG_IGN else [])
    previous = {signum: signal.signal(signum, interrupt) for signum in caught}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_held(prog: str):
    """Ctrl-C, SIGTERM and SIGHUP (unless ignored) wait until the block ends, for a step that
    must not stop half-way (renaming a request's outputs into place: all or none); one that came
    is then reported and the program goes on to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    signums = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
               if s is not None and signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        click.echo(f"{prog}: interrupted while the outputs were being put in place; they were "
                   "all written", err=True)


def _during_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while an interrupt unwound (a second Ctrl-C cut a clean-up
    short, and the clean-up failed): it is reported as the interrupt, not as a bug."""
    seen = exc.__context__
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


def console_main(command, prog: str, args=None, *, interrupted: str | None,
                 interrupted_code: int = EXIT_INTERRUPTED) -> None:
    """Run a click ``command`` as a console program: exit 0 (or the int the command returns),
    2 bad usage or input, 1 internal failure, ``interrupted_code`` on Ctrl-C, SIGTERM or SIGHUP
    (saying ``interrupted`` unless the command said it itself). A command may end with its own
    ``sys.exit`` after printing its own line. Warnings are one line each
    (``_warnings_as_lines``)."""
    from .runtime.errors import BackendError, InputError

    args = sys.argv[1:] if args is None else list(args)
    _warnings_as_lines(prog, quiet="--quiet" in args or "-q" in args)
    try:
        with terminate_as_interrupt():
            code = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _exit_interrupted(prog, interrupted, interrupted_code)
    except click.ClickException as exc:  # bad usage: unknown option, value out of range, ...
        click.echo(f"{prog}: error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(EXIT_USAGE)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if _during_interrupt(exc):  # a clean-up that failed while an interrupt unwound
            _exit_interrupted(prog, interrupted, interrupted_code)
        if isinstance(exc, InputError):
            click.echo(f"{prog}: error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        if isinstance(exc, BackendError):
            click.echo(f"{prog}: internal error: {exc}", err=True)
            sys.exit(EXIT_INTERNAL)
        click.echo(f"{prog}: internal error: {type(exc).__name__}: "
                   f"{' '.join(str(exc).split())}", err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def echo_result(text: str) -> None:
    """Print a program's result on standard output. A reader that went away (``| head``) ends
    the program quietly with EXIT_BROKEN_PIPE, as other tools; a failed write (a full disk
    behind a redirection) is an OutputError that says so."""
    from .runtime.errors import OutputError, one_line

    try:
        click.echo(text)
        sys.stdout.flush()
    except OSError as exc:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        os.close(devnull)
        if isinstance(exc, BrokenPipeError):
            sys.exit(EXIT_BROKEN_PIPE)
        raise OutputError(f"standard output: cannot write ({one_line(exc)})") from None


def _warnings_as_lines(prog: str, quiet: bool) -> None:
    """Show Python warnings as ``<prog>: warning: <message>`` lines on stderr (not Python's
    source-file format), or not at all with ``--quiet``."""
    def show(message, category, filename, lineno, file=None, line=None):
        if not quiet:
            click.echo(f"{prog}: warning: {message}", err=True)

    warnings.showwarning = show


def _launch(prog: str, target: str) -> None:
    """Import ``module:function`` and run it; Ctrl-C, SIGTERM or SIGHUP while the program's
    modules import (torch takes seconds) exit 130 with one line, as later."""
    import importlib

    module, function = target.split(":")
    try:
        with terminate_as_interrupt():
            entry = getattr(importlib.import_module(module), function)
    except KeyboardInterrupt:
        _exit_interrupted(prog, "interrupted; nothing was written", EXIT_INTERRUPTED)
    entry()


# the console scripts (setup.py's entry points)
def export_main() -> None:
    _launch("mmsep-export", "mmsep.export.cli:console")


def run_main() -> None:
    _launch("mmsep-run", "mmsep.runtime.cli:main")


def batch_main() -> None:
    _launch("mmsep-batch", "mmsep.scale.batch:main")


def serve_main() -> None:
    _launch("mmsep-serve", "mmsep.scale.serve_cli:main")


def finetune_main() -> None:
    _launch("mmsep-finetune", "mmsep.train.cli:console")


def _exit_interrupted(prog: str, message: str | None, code: int) -> None:
    if message:
        click.echo(f"{prog}: {message}", err=True)
    sys.exit(code)
