"""The frame-resize engine at export: built with its resolution profile on the fake TensorRT,
reused while its key holds, and checked against the host's resize (the engine run by ONNX
Runtime here: the graph TensorRT would build from)."""

import onnxruntime as ort
import pytest
import torch

from mmsep.export import tensorrt_build as tb, tensorrt_parity, tensorrt_resize
from mmsep.export.errors import ParityError
from mmsep.runtime.resize_engine import OUTPUT_NAME, engine_profile
from tests.export.fake_tensorrt_builder import fake_tensorrt

INFO = {"version": "10.13.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"}


def graph_runner(offset: float = 0.0):
    """run_graph_engine's stand-in: the engine's ONNX graph on ONNX Runtime (plus ``offset``)."""
    calls = []

    def run(engine_path, name, inputs, outputs, *, check=None):
        session = ort.InferenceSession(str(engine_path.with_suffix(".onnx")),
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0] + offset
        calls.append((name, next(iter(inputs.values())).shape))  # the frames or luma planes
        assert outputs == {OUTPUT_NAME: torch.float32}
        return {OUTPUT_NAME: torch.from_numpy(got)}

    return run, calls


def test_built_with_its_profile_checked_and_reused(monkeypatch, tmp_path):
    trt, state = fake_tensorrt()
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    runner, calls = graph_runner()
    monkeypatch.setattr(tensorrt_parity, "run_graph_engine", runner)
    cache = tmp_path / "timing.cache"
    record, built = tensorrt_resize.build_frame_resize_engine(tmp_path, INFO, timing_cache=cache)
    assert built and state["shapes"] == engine_profile()
    assert (tmp_path / "frame_resize.engine").read_bytes() == b"ENGINE"
    assert record["onnx"] == "frame_resize.onnx" and (tmp_path / "frame_resize.onnx").is_file()
    assert record["parity"] == {"max_grey_levels": 0.0, "tolerance": 0.01, "passed": True,
                                "checked": [[8, 241, 321], [2, 1080, 1920]]}
    assert [shape for _, shape in calls] == [(8, 241, 321, 3)] * 2 + [(2, 1080, 1920, 3)] * 2
    previous = {"tensorrt": {"frame_resize": record}, "_dir": str(tmp_path)}
    again, built = tensorrt_resize.build_frame_resize_engine(tmp_path, INFO, timing_cache=cache,
                                                             previous=previous)
    assert not built and again["reused"] and again["key"] == record["key"]
    other_gpu = {**INFO, "gpu": "NVIDIA H200"}
    moved, built = tensorrt_resize.build_frame_resize_engine(tmp_path, other_gpu,
                                                             timing_cache=cache,
                                                             previous=previous)
    assert built and moved["key"] != record["key"]


def test_an_engine_a_grey_level_off_is_refused(monkeypatch, tmp_path):
    (tmp_path / "frame_resize_yuv.onnx").write_bytes(tensorrt_resize.engine_graph(True))
    runner, _ = graph_runner()
    monkeypatch.setattr(tensorrt_parity, "run_graph_engine", runner)
    engine = tmp_path / "frame_resize_yuv.engine"
    assert tensorrt_resize.check_frame_resize_engine(engine, yuv=True)["max_grey_levels"] == 0
    monkeypatch.setattr(tensorrt_parity, "run_graph_engine", graph_runner(offset=1 / 255)[0])
    with pytest.raises(ParityError, match=r"frame_resize_yuv: .* differ from the host's resize "
                                          r"by 1 grey levels > 0.01"):
        tensorrt_resize.check_frame_resize_engine(engine, yuv=True)


def test_both_engines_are_built_then_reused(monkeypatch, tmp_path):
    trt, _ = fake_tensorrt()
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_parity, "run_graph_engine", graph_runner()[0])
    cache = tmp_path / "timing.cache"
    records, built = tensorrt_resize.build_frame_resize_engines(tmp_path, INFO, timing_cache=cache)
    assert built == list(records) == ["frame_resize", "frame_resize_yuv"]
    assert records["frame_resize"]["key"] != records["frame_resize_yuv"]["key"]
    previous = {"tensorrt": records, "_dir": str(tmp_path)}
    _, built = tensorrt_resize.build_frame_resize_engines(tmp_path, INFO, timing_cache=cache,
                                                          previous=previous)
    assert built == []


def test_a_changed_graph_changes_the_key():
    graph = tensorrt_resize.engine_graph()
    assert tensorrt_resize.engine_key(graph, INFO) == tensorrt_resize.engine_key(graph, INFO)
    assert tensorrt_resize.engine_key(graph + b"x", INFO) != \
        tensorrt_resize.engine_key(graph, INFO)


def test_gpu_check_reports_the_resize_engine_in_its_own_row(monkeypatch, tmp_path, capsys):
    from mmsep.export import gpu_check

    trt, _ = fake_tensorrt()
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_parity, "run_graph_engine", graph_runner()[0])
    row = gpu_check._check_frame_resize(tmp_path, INFO, False)
    assert row["passed"] and row["grey_levels"] == 0.0 and row["grey_bound"] == 0.01
    gpu_check._print_row(row)
    assert capsys.readouterr().out.startswith("frame_resize engine 0 grey levels from the host")
    monkeypatch.setattr(tensorrt_parity, "run_graph_engine", graph_runner(offset=0.5)[0])
    (tmp_path / "again").mkdir()
    failed = gpu_check._check_frame_resize(tmp_path / "again", INFO, True)
    assert not failed["passed"] and failed["error"].startswith("ParityError: frame_resize_yuv")
