"""How every mmsep console program ends (torch-free): one line per error, never a traceback,
and the exit codes of ``exit_codes``; SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so
that temporary outputs are removed on the way out."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import click

from .exit_codes import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread while the block runs."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def console_main(command, prog: str, args, *, interrupted: str | None,
                 interrupted_code: int = EXIT_INTERRUPTED) -> None:
    """Run a click ``command`` as a console program: exit 0 (or the int the command returns),
    2 bad usage or input, 1 internal failure, ``interrupted_code`` on Ctrl-C or SIGTERM (saying
    ``interrupted`` unless the command said it itself). A command may end with its own
    ``sys.exit`` after printing its own line."""
    from .runtime.errors import BackendError, InputError

    try:
        with terminate_as_interrupt():
            code = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        if interrupted:
            click.echo(f"{prog}: {interrupted}", err=True)
        sys.exit(interrupted_code)
    except click.ClickException as exc:  # bad usage: unknown option, value out of range, ...
        click.echo(f"{prog}: error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(EXIT_USAGE)
    except InputError as exc:
        click.echo(f"{prog}: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except BackendError as exc:
        click.echo(f"{prog}: internal error: {exc}", err=True)
        sys.exit(EXIT_INTERNAL)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 1
        click.echo(f"{prog}: internal error: {type(exc).__name__}: "
                   f"{' '.join(str(exc).split())}", err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
