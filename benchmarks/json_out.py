"""The --json option of the benchmark scripts: the file is checked before any measuring (a run
is not lost to a typo at its end) and written atomically (``write_json``), so an interrupted run
leaves the previous file whole."""

from __future__ import annotations

from pathlib import Path

import click

from mmsep.runtime.atomic import check_writable
from mmsep.runtime.atomic import write_json_atomically as write_json  # noqa: F401
from mmsep.runtime.errors import OutputError


def _checked(ctx, param, path: Path | None) -> Path | None:
    if path is not None:
        try:
            check_writable(path)
        except OutputError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return path


def json_option(help_text: str):
    """A script's ``--json FILE`` option (``json_path``), checked up front."""
    return click.option("--json", "json_path", callback=_checked, help=help_text,
                        type=click.Path(dir_okay=False, path_type=Path))
