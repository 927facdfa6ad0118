"""atomic_files: files that name each other written under their final names, committed together."""

import os

import pytest

from mmsep.runtime.atomic import atomic_files


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
