"""atomic_files: files that name each other written under their final names, committed together;
remove_stale_partials: what a killed writer left behind."""

import os
import subprocess
import sys
import threading
import time

import pytest

from mmsep.runtime.atomic import (MACHINE, atomic_files, atomic_output, remove_stale_partials,
                                  replace_directory)


def temporary(directory, name: str, pid: int, digit: str, kind: str = "partial",
              suffix: str = "", machine: str = MACHINE):
    """The path ``temporary_name`` gives process ``pid`` of ``machine`` (fixed random part)."""
    return directory / f".{name}.{kind}-{machine}-{pid}-{digit * 12}{suffix}"


def test_files_are_committed_in_order_and_the_scratch_goes(tmp_path, monkeypatch):
    committed = []
    real_replace = os.replace

    def record(src, dst):
        committed.append(os.path.basename(str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", record)
    with atomic_files(tmp_path, ["g.onnx.data", "g.onnx"]) as scratch:
        (scratch / "g.onnx.data").write_bytes(b"weights")
        (scratch / "g.onnx").write_bytes(b"graph")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]
    assert (tmp_path / "g.onnx").read_bytes() == b"graph"
    assert [name for name in committed if not name.startswith(".")] == ["g.onnx.data", "g.onnx"]


def test_a_name_not_written_is_removed(tmp_path):
    (tmp_path / "g.onnx.data").write_bytes(b"stale weights")
    with atomic_files(tmp_path, ["g.onnx.data", "g.onnx"]) as scratch:
        (scratch / "g.onnx").write_bytes(b"small graph")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]


def test_an_error_leaves_the_directory_as_it_was(tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"old graph")
    with pytest.raises(KeyboardInterrupt):
        with atomic_files(tmp_path, ["g.onnx.data", "g.onnx"]) as scratch:
            (scratch / "g.onnx.data").write_bytes(b"new weights")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]
    assert (tmp_path / "g.onnx").read_bytes() == b"old graph"


def test_a_killed_writers_temporaries_are_removed_and_a_live_ones_kept(tmp_path):
    target = tmp_path / "out.wav"
    with atomic_output(target) as live:  # this process's temporary, in use
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()  # a process id that no longer runs
        killed = temporary(tmp_path, "out", gone.pid, "0", suffix=".wav")
        killed.write_bytes(b"half an output")
        export = temporary(tmp_path, "tiny", gone.pid, "1")  # a killed mmsep-export's
        (export / "sub").mkdir(parents=True)
        (export / "sub" / "vae_decoder.onnx").write_bytes(b"half a graph")
        running = temporary(tmp_path, "small", os.getpid(), "2")  # a running export's
        running.mkdir()
        other = tmp_path / ".notes.partial-draft.txt"  # not a name atomic_output makes
        other.write_bytes(b"x")
        remove_stale_partials(tmp_path)
        assert live.name.startswith(f".out.partial-{MACHINE}-{os.getpid()}-")
        assert live.exists() and other.exists() and running.exists()
        assert not killed.exists() and not export.exists()
    assert target.exists() and not live.exists()


def test_another_machines_temporaries_are_left_to_it(tmp_path):
    """On a shared file system a process id names a process only on the machine (or in the
    container) that wrote it: here it may be free while the writer there is still running."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    elsewhere = "0123abcd" if MACHINE != "0123abcd" else "0123abce"
    writing = temporary(tmp_path, "out", gone.pid, "0", suffix=".wav", machine=elsewhere)
    writing.write_bytes(b"being written over there")
    swapping = temporary(tmp_path, "m", gone.pid, "1", "old", machine=elsewhere)
    swapping.mkdir()
    _model(swapping / "m", "old")
    ours = temporary(tmp_path, "out", gone.pid, "2", suffix=".wav")
    ours.write_bytes(b"half an output")
    started = time.monotonic()
    remove_stale_partials(tmp_path, wait_s=30.0)
    assert time.monotonic() - started < 5.0  # not waited for either
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([writing.name, swapping.name])


def test_a_stopping_writers_temporary_is_waited_for(tmp_path):
    """wait_s: a process being stopped (a Ray actor after ray.shutdown) still runs for a
    moment; its temporary goes once it has ended, within the wait."""
    stopping = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    partial = temporary(tmp_path, "out", stopping.pid, "0", suffix=".wav")
    partial.write_bytes(b"half an output")
    remove_stale_partials(tmp_path)
    assert partial.exists()
    threading.Thread(target=stopping.wait, daemon=True).start()  # reaps it, as its parent would
    remove_stale_partials(tmp_path, wait_s=30.0)
    assert not partial.exists() and stopping.poll() is not None


def _model(directory, text: str):
    directory.mkdir()
    (directory / "manifest.json").write_text(text)
    return directory


def test_a_directory_replaced_by_an_interrupted_swap_stays_the_old_one(tmp_path, monkeypatch):
    out = _model(tmp_path / "m", "old")
    new = _model(tmp_path / ".m.partial", "new")
    real_replace, calls = os.replace, []

    def interrupted_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # between moving the old one aside and moving the new one in
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        replace_directory(new, out)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.partial", "m"]
    replace_directory(new, out)
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_directory_a_killed_swap_left_aside_goes_back(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    holder = temporary(tmp_path, "m", gone.pid, "3", "old")  # killed between the two renames
    holder.mkdir()
    _model(holder / "m", "old")
    other = temporary(tmp_path, "n", gone.pid, "4", "old")  # killed after them: n is the new one
    other.mkdir()
    _model(other / "n", "older")
    _model(tmp_path / "n", "new")
    running = temporary(tmp_path, "r", os.getpid(), "5", "old")  # a swap still running
    running.mkdir()
    remove_stale_partials(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "m", "n"]
    assert [(tmp_path / d / "manifest.json").read_text() for d in "mn"] == ["old", "new"]
