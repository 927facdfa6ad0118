"""How every console program ends (mmsep.console): signals as interrupts, one line per error."""

import os
import signal

import click
import pytest

from mmsep.console import console_main
from mmsep.runtime.errors import OutputError


def run(body, capsys):
    """console_main of a command running ``body``: (exit code, stderr lines)."""
    command = click.Command("prog", callback=body)
    with pytest.raises(SystemExit) as done:
        console_main(command, "prog", [], interrupted="interrupted")
    return done.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_termination_signals_are_interrupts(signum, capsys):
    def body():
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not interrupt")

    before = signal.getsignal(signum)
    assert run(body, capsys) == (130, ["prog: interrupted"])
    assert signal.getsignal(signum) == before  # restored


def test_an_ignored_hangup_stays_ignored(capsys):
    """Under nohup SIGHUP is ignored, and mmsep leaves it so."""
    seen = []
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert run(lambda: seen.append(signal.getsignal(signal.SIGHUP)), capsys) == (0, [])
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert seen == [signal.SIG_IGN]


@pytest.mark.parametrize("broken", [ValueError("generator already executing"),
                                    OutputError("o.wav: cannot write (short write)")])
def test_a_clean_up_cut_short_by_an_interrupt_is_the_interrupt(capsys, broken):
    def body():
        try:
            raise KeyboardInterrupt  # the first Ctrl-C
        finally:
            raise broken  # a clean-up it broke, a bad input error included

    assert run(body, capsys) == (130, ["prog: interrupted"])


def test_other_failures_are_one_line_exit_1(capsys):
    def body():
        raise ValueError("two\nlines")

    assert run(body, capsys) == (1, ["prog: internal error: ValueError: two lines"])


@pytest.mark.parametrize("module, name", [("mmsep.export.cli", "main"),
                                          ("mmsep.train.cli", "main"),
                                          ("mmsep.runtime.cli", "cli"),
                                          ("mmsep.scale.batch", "cli")])
def test_every_program_with_progress_takes_q(module, name):
    import importlib

    command = getattr(importlib.import_module(module), name)
    quiet = [p for p in command.params if p.name == "quiet"]
    assert len(quiet) == 1 and quiet[0].opts == ["--quiet", "-q"], module


def test_an_interrupt_while_a_program_imports_is_one_line(capsys, monkeypatch):
    import importlib

    from mmsep import console

    def interrupted(name):
        raise KeyboardInterrupt  # Ctrl-C while torch imports

    monkeypatch.setattr(importlib, "import_module", interrupted)
    with pytest.raises(SystemExit) as done:
        console.export_main()
    assert done.value.code == 130
    assert capsys.readouterr().err == "mmsep-export: interrupted; nothing was written\n"


def test_every_console_script_is_launched_through_mmsep_console():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")
               if e.name.startswith("mmsep-")}
    assert scripts == {f"mmsep-{name}": f"mmsep.console:{name}_main"
                       for name in ("export", "run", "batch", "serve", "finetune")}


def test_interrupts_wait_for_a_step_that_must_not_stop_half_way(capsys):
    from mmsep.console import interrupts_held

    finished = []

    def body():
        with interrupts_held("prog"):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            finished.append(True)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    code, err = run(body, capsys)
    assert (code, finished) == (0, [True])
    assert err == ["prog: interrupted while the outputs were being put in place; they were all "
                   "written"]
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("module, name", [
    ("mmsep.export.cli", "main"), ("mmsep.train.cli", "main"), ("mmsep.runtime.cli", "cli"),
    ("mmsep.scale.batch", "cli"), ("mmsep.scale.serve_cli", "cli"),
    ("mmsep.runtime.example", "main"), ("mmsep.train.synthetic", "main")])
def test_every_number_option_refuses_nan_and_infinity(module, name):
    """click's FloatRange lets NaN through every bound (a NaN --cfg wrote NaN audio, a NaN --lr
    trained until it diverged); every program's number options are finite ranges."""
    import importlib

    command = getattr(importlib.import_module(module), name)
    numbers = [p for p in command.params if isinstance(p.type, click.FloatRange)]
    for param in numbers:
        for text in ("nan", "inf", "-inf"):
            with pytest.raises(click.BadParameter, match="is not a finite number|not in the"):
                param.type.convert(text, param, None)
    assert numbers, f"{module}: no number options"
