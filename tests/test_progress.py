"""mmsep.progress: a bar on a terminal, periodic plain lines elsewhere."""

import io

from mmsep.progress import Progress, track


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_are_periodic_and_closed_once():
    out, clock = io.StringIO(), _Clock()
    with Progress(10, "mmsep-run", "batch", stream=out, interval=10.0, clock=clock) as p:
        for done in range(1, 11):
            clock.now += 3.0
            p.update(done)
            if done == 4:
                p.log("a log line")
    lines = out.getvalue().splitlines()
    # first update at 3 s prints; then one at >= 13 s (done 5), >= 27 s (done 9); close: 10
    assert lines == ["mmsep-run: 1/10 batches, 3.0 s", "a log line",
                     "mmsep-run: 5/10 batches, 15.0 s", "mmsep-run: 9/10 batches, 27.0 s",
                     "mmsep-run: 10/10 batches, 30.0 s"]
    assert "\r" not in out.getvalue()


def test_no_duplicate_closing_line():
    out, clock = io.StringIO(), _Clock()
    with Progress(2, "x", "item", stream=out, clock=clock) as p:
        p.update(1)
        p.update(2)  # within the interval: not printed yet
    assert out.getvalue().splitlines() == ["x: 1/2 items, 0.0 s", "x: 2/2 items, 0.0 s"]


def test_terminal_gets_a_bar():
    out = _Terminal()
    assert list(track(range(3), 3, "export", "stage", stream=out)) == [0, 1, 2]
    assert "\r" in out.getvalue()


def test_disabled_is_silent():
    out = io.StringIO()
    with Progress(3, "x", "item", enabled=False, stream=out) as p:
        p.update(3)
        p.log("hidden")
    assert out.getvalue() == ""
