"""TensorRT engines: real builds on a GPU (marked gpu), the control flow on a fake TensorRT."""

import importlib.util
import json
import shutil
import re

import pytest
import torch

from mmsep.export import tensorrt_build as tb, tensorrt_parity
from mmsep.export.wrappers import stage_modules, stage_specs
from mmsep.models import build_components
from tests.export.fake_tensorrt_builder import fake_tensorrt
from tests.helpers import TINY_SEED, TINY_WINDOW_SECONDS


def _tiny():
    """The components of tests/conftest.py's tiny_model_dir."""
    return build_components("tiny", duration=TINY_WINDOW_SECONDS, seed=TINY_SEED)


# ---- without TensorRT ------------------------------------------------------------------------

def test_unavailable_reason_is_a_clear_sentence():
    reason = tb.unavailable_reason()
    if importlib.util.find_spec("tensorrt") is None:
        assert reason.startswith("TensorRT is not installed (import tensorrt failed")
    else:
        assert reason is None or "CUDA" in reason or "TensorRT" in reason


def test_build_engines_skips_with_the_reason(tmp_path):
    reason = tb.unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the gpu tests build real engines")
    section = tb.build_engines(tmp_path, {"stage_order": [], "stages": {}}, {})
    assert section == {"status": "skipped", "reason": reason}
    assert not list(tmp_path.iterdir())


# ---- a fake TensorRT (fake_tensorrt_builder.py): the calls, flags and error handling of
# build_engine

@pytest.fixture(scope="module")
def vocoder_spec():
    return stage_specs(_tiny())["vocoder"]


def test_build_engine_strongly_typed_with_profile_and_cache(monkeypatch, tmp_path, vocoder_spec,
                                                           tiny_model_dir):
    trt, calls = fake_tensorrt()
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    cache = tmp_path / "cache" / "timing.cache"
    record = tb.build_engine(tiny_model_dir / "vocoder.onnx", vocoder_spec,
                             tmp_path / "vocoder.fp32.engine", timing_cache=cache,
                             workspace_bytes=1 << 30)
    assert calls["flags"] == 2  # 1 << STRONGLY_TYPED (1 in TensorRT 10)
    assert calls["pool"] == ("ws", 1 << 30)
    assert calls["cleared"] == ["tf32"]  # an fp32 graph is built without TF32
    spec = vocoder_spec
    assert calls["shapes"] == {"mel": tuple(spec.inputs[0].concrete(b) for b in
                                            (spec.min_batch, spec.opt_batch, spec.max_batch))}
    assert (tmp_path / "vocoder.fp32.engine").read_bytes() == b"ENGINE"
    assert record["file"] == "vocoder.fp32.engine" and record["bytes"] == 6
    assert record["timing_cache"] == "new" and cache.read_bytes() == b"cache:10.13.0|"
    # the second build loads the saved cache
    record = tb.build_engine(tiny_model_dir / "vocoder.onnx", spec, tmp_path / "v.engine",
                             timing_cache=cache)
    assert record["timing_cache"] == "loaded" and calls["cache_in"] == b"cache:10.13.0|"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "v.engine",
                                                          "vocoder.fp32.engine"]


def test_build_engine_without_the_flag_and_with_a_bad_cache(monkeypatch, tmp_path, vocoder_spec,
                                                            tiny_model_dir):
    trt, calls = fake_tensorrt(strongly_typed_flag=False, version="12.0.0")
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"garbage from another version")
    with pytest.warns(RuntimeWarning, match="unreadable .TensorRT returned no cache"):
        record = tb.build_engine(tiny_model_dir / "vocoder.onnx", vocoder_spec,
                                 tmp_path / "e.engine", timing_cache=cache)
    assert calls["flags"] == 0  # strongly typed is the only mode there
    assert record["timing_cache"] == "replaced (unreadable)"
    assert cache.read_bytes() == b"cache:12.0.0|"


def test_a_timing_cache_that_cannot_be_read_means_a_fresh_one(monkeypatch, tmp_path,
                                                              vocoder_spec, tiny_model_dir):
    trt, _ = fake_tensorrt(corrupt_cache="raise")
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"\x00\x01 truncated")
    with pytest.warns(RuntimeWarning, match=f"timing cache {cache} is unreadable .*magicTagRead"):
        record = tb.build_engine(tiny_model_dir / "vocoder.onnx", vocoder_spec,
                                 tmp_path / "e.engine", timing_cache=cache)
    assert record["timing_cache"] == "replaced (unreadable)"
    assert cache.read_bytes() == b"cache:10.13.0|"


def test_a_timing_cache_of_another_tensorrt_is_replaced(monkeypatch, tmp_path, vocoder_spec,
                                                        tiny_model_dir):
    trt, _ = fake_tensorrt()
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"cache:10.9.0|")
    record = tb.build_engine(tiny_model_dir / "vocoder.onnx", vocoder_spec, tmp_path / "e.engine",
                             timing_cache=cache)
    assert record["timing_cache"] == "replaced (did not match this GPU / TensorRT)"
    assert cache.read_bytes() == b"cache:10.13.0|"


def test_a_failed_build_after_a_replaced_cache_names_only_its_own_error(
        monkeypatch, tmp_path, vocoder_spec, tiny_model_dir):
    trt, _ = fake_tensorrt(build_ok=False)
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"cache:10.9.0|")  # TensorRT logs an error about it, then it is replaced
    with pytest.raises(tb.EngineBuildError) as info:
        tb.build_engine(tiny_model_dir / "vocoder.onnx", vocoder_spec, tmp_path / "e.engine",
                        timing_cache=cache)
    assert str(info.value) == "stage vocoder: TensorRT could not build the engine: out of " \
                              "workspace"


def test_shapes_the_profile_refuses_are_a_build_error(monkeypatch, tmp_path, vocoder_spec,
                                                      tiny_model_dir):
    trt, _ = fake_tensorrt()
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    mel = vocoder_spec.inputs[0]
    low, high = mel.concrete(4), mel.concrete(2)  # min above max
    with pytest.raises(tb.EngineBuildError, match=re.escape(
            f"stage vocoder: TensorRT refused the shapes {list(low)} / {list(high)} / "
            f"{list(high)} of input {mel.name!r} (Shape provided for min is inconsistent")):
        tb.build_graph_engine(tiny_model_dir / "vocoder.onnx", "vocoder",
                              {mel.name: (low, high, high)}, list(vocoder_spec.output_names),
                              tmp_path / "e.engine", timing_cache=tmp_path / "c")
    assert not (tmp_path / "e.engine").exists()


def test_parser_errors_are_all_reported_with_the_stage(monkeypatch, tmp_path, vocoder_spec,
                                                       tiny_model_dir):
    trt, _ = fake_tensorrt(parse_ok=False)
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    with pytest.raises(tb.EngineBuildError) as info:
        tb.build_engine(tiny_model_dir / "vocoder.onnx", vocoder_spec, tmp_path / "e.engine",
                        timing_cache=tmp_path / "c")
    message = str(info.value)
    assert message.startswith(
        "stage vocoder: TensorRT's ONNX parser rejected vocoder.onnx (2 error")
    assert "node 0 'node_0' (Conv): unsupported thing 0" in message
    assert "node 1 'node_1' (Conv): unsupported thing 1" in message
    assert not list(tmp_path.iterdir())


def test_failed_build_raises_and_writes_nothing(monkeypatch, tmp_path, vocoder_spec,
                                                tiny_model_dir):
    trt, _ = fake_tensorrt(build_ok=False)
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    expected = "stage vocoder: TensorRT could not build the engine: out of workspace"
    with pytest.raises(tb.EngineBuildError, match=expected):
        tb.build_engine(tiny_model_dir / "vocoder.onnx", vocoder_spec, tmp_path / "e.engine",
                        timing_cache=tmp_path / "c")
    assert not list(tmp_path.iterdir())


def test_old_tensorrt_is_refused(monkeypatch):
    trt, _ = fake_tensorrt(version="8.6.1")
    monkeypatch.setattr(tb, "_tensorrt", lambda: trt)
    assert tb.unavailable_reason() == ("TensorRT 8.6.1 is too old: strongly typed builds need "
                                       "10.0 or newer")


def test_engine_key_covers_graph_precision_and_machine():
    info = {"version": "10.13.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    base = tb.engine_key({"key": "abc"}, "fp16", info)
    assert base == tb.engine_key({"key": "abc"}, "fp16", dict(info))
    for changed in (tb.engine_key({"key": "abd"}, "fp16", info),
                    tb.engine_key({"key": "abc"}, "bf16", info),
                    tb.engine_key({"key": "abc"}, "fp16", {**info, "version": "11.1.0"}),
                    tb.engine_key({"key": "abc"}, "fp16", {**info, "gpu": "NVIDIA H200"}),
                    tb.engine_key({"key": "abc"}, "fp16", {**info, "compute_capability": "8.0"})):
        assert changed != base


# ---- real engines ----------------------------------------------------------------------------

@pytest.mark.gpu
def test_tiny_engines_build_and_match_pytorch(request, tmp_path):
    reason = tb.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    tiny_model_dir = request.getfixturevalue("tiny_model_dir")  # exported only when needed
    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    modules = stage_modules(_tiny())
    messages = []
    section = tb.build_engines(model_dir, manifest, modules, precision="fp16",
                               timing_cache=tmp_path / "timing.cache", progress=messages.append)
    assert section["status"] == "built", section
    assert section["compute_capability"] == "{}.{}".format(*torch.cuda.get_device_capability())
    assert set(section["engines"]) == set(manifest["stage_order"])
    resizers = {"frame_resize", "frame_resize_yuv"}
    assert set(section["rebuilt"]) == {*manifest["stage_order"], *resizers}
    for name in resizers:
        resize = section[name]
        assert resize["parity"]["passed"] and (model_dir / resize["file"]).is_file(), resize
    for name, engine in section["engines"].items():
        assert engine["parity"]["passed"], (name, engine["parity"])
        assert engine["parity"]["tolerance"] == 1e-2 and (model_dir / engine["file"]).is_file()
        assert (model_dir / f"{name}.fp16.onnx").is_file()
    # a second run with the first as "previous" reuses every engine
    again = tb.build_engines(model_dir, manifest, modules, precision="fp16",
                             timing_cache=tmp_path / "timing.cache",
                             previous={"tensorrt": section, "_dir": str(model_dir)})
    assert again["rebuilt"] == [] and all(e["reused"] for e in again["engines"].values())


@pytest.mark.gpu
def test_tiny_fp32_engine_is_tight(request, tmp_path):
    reason = tb.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    tiny_model_dir = request.getfixturevalue("tiny_model_dir")
    components = _tiny()
    specs, modules = stage_specs(components), stage_modules(components)
    for name in ("denoiser", "vocoder"):
        engine = tmp_path / f"{name}.fp32.engine"
        tb.build_engine(tiny_model_dir / f"{name}.onnx", specs[name], engine,
                        timing_cache=tmp_path / "timing.cache")
        result = tensorrt_parity.check_engine(modules[name], specs[name], engine,
                                              tolerance=tb.FP32_ENGINE_TOLERANCE)
        assert result.passed, (name, result.errors)
