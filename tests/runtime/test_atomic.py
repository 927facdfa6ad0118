"""atomic_files: files that name each other written under their final names, committed together;
remove_stale_partials: what a killed writer left behind."""

import os
import subprocess
import sys

import pytest

from mmsep.runtime.atomic import atomic_files, atomic_output, remove_stale_partials


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
        killed = tmp_path / f".out.partial-{gone.pid}-{'0' * 12}.wav"
        killed.write_bytes(b"half an output")
        export = tmp_path / f".tiny.partial-{gone.pid}-{'1' * 12}"  # a killed mmsep-export's
        (export / "sub").mkdir(parents=True)
        (export / "sub" / "vae_decoder.onnx").write_bytes(b"half a graph")
        running = tmp_path / f".small.partial-{os.getpid()}-{'2' * 12}"  # a running export's
        running.mkdir()
        other = tmp_path / ".notes.partial-draft.txt"  # not a name atomic_output makes
        other.write_bytes(b"x")
        remove_stale_partials(tmp_path)
        assert live.name.startswith(f".out.partial-{os.getpid()}-")
        assert live.exists() and other.exists() and running.exists()
        assert not killed.exists() and not export.exists()
    assert target.exists() and not live.exists()
