"""The TensorRT backend's logic on a CPU stand-in for TensorRT/pycuda/cuda-python (fake_gpu.py).

Real TensorRT needs an NVIDIA GPU; these tests check everything around the engines: selection and
refusal from the manifest, tamper checks, buffer reuse and pointer arithmetic, the double-buffered
step loop and its CUDA graph capture/replay, against the ONNX Runtime CPU backend on the same
graphs. `pytest -m gpu` runs the real thing where TensorRT and a GPU exist.
"""

import json
import shutil

import numpy as np
import pytest

from mmsep.runtime import Separator
from mmsep.runtime.errors import BackendError, BackendUnavailable, InputError, ModelDirError
from mmsep.runtime.example import tones
from mmsep.model_files import sha256_file
from mmsep.runtime.tensorrt_backend import engine_refusal
from tests.runtime.fake_gpu import FakeGpu

SR = 44100
HERE = {"version": "10.13.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def with_engines(model_dir, out, **section):
    """A copy of ``model_dir`` whose manifest lists one "engine" per stage (for the fake: the
    stage's fp32 ONNX graph)."""
    shutil.copytree(model_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    engines = {}
    for stage, record in manifest["stages"].items():
        engine = out / f"{stage}.fp16.engine"
        shutil.copyfile(out / record["onnx"], engine)
        engines[stage] = {"file": engine.name, "sha256": sha256_file(engine),
                          "bytes": engine.stat().st_size}
    manifest["tensorrt"] = {"status": "built", **HERE, "precision": "fp16", "engines": engines,
                            **section}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def trt_dir(model_dir, tmp_path_factory):
    return with_engines(model_dir, tmp_path_factory.mktemp("trt") / "tiny")


@pytest.fixture
def gpu(monkeypatch):
    fake = FakeGpu()
    fake.install(monkeypatch)
    return fake


@pytest.fixture(scope="module")
def reference(model_dir):
    """ORT CPU results of the requests below: the fake engines run the same graphs."""
    with Separator(model_dir, "ort-cpu", max_batch=4) as sep:
        return {name: sep.process(**request, keep_latents=True)
                for name, request in REQUESTS.items()}


REQUESTS = {
    # 3 windows x 2 texts = 6 items: batches of 4 and 2 (two graph shapes)
    "multi": dict(mix=tones(3.5, SR, seed=3), text=["a dog barking", "rain"], steps=3,
                  cfg=4.5, seed=7, negative_text="speech"),
    "generation": dict(text="thunder", steps=2, cfg=3.0, seed=3),
}


def check_same(result, want):
    np.testing.assert_allclose(result.latents, want.latents, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.audio, want.audio, rtol=1e-4, atol=1e-5)


def test_refusal_reasons():
    assert engine_refusal({"status": "built", **HERE}, HERE) is None
    assert "no TensorRT engines (TensorRT is not installed)" in engine_refusal(
        {"status": "skipped", "reason": "TensorRT is not installed"}, HERE)
    assert "no TensorRT engines" in engine_refusal(None, HERE)
    assert "built with TensorRT 10.9.0 and this machine has TensorRT 10.13.0" in engine_refusal(
        {"status": "built", **HERE, "version": "10.9.0"}, HERE)
    other = engine_refusal({"status": "built", **HERE, "gpu": "NVIDIA A100-SXM4-80GB",
                            "compute_capability": "8.0"}, HERE)
    assert "built for NVIDIA A100-SXM4-80GB (compute capability 8.0)" in other
    assert "this GPU is NVIDIA H100 80GB HBM3 (compute capability 9.0)" in other


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_matches_onnxruntime_with_cuda_graphs(gpu, trt_dir, reference, request_name):
    with Separator(trt_dir, "trt", max_batch=4) as sep:
        assert sep.backend_name == "trt" and sep.backend.cuda_graphs
        first = sep.process(**REQUESTS[request_name], keep_latents=True)
        check_same(first, reference[request_name])
        captures = gpu.counts["captures"]
        assert captures == first.batches if request_name == "multi" else captures == 1
        again = sep.process(**REQUESTS[request_name], keep_latents=True)
        assert gpu.counts["captures"] == captures  # replayed, not captured again
        assert gpu.counts["graph_launches"] == 2 * first.batches
        np.testing.assert_array_equal(again.latents, first.latents)


def test_without_cuda_python_the_steps_are_enqueued_one_by_one(monkeypatch, trt_dir, reference):
    gpu = FakeGpu(with_cudart=False)
    gpu.install(monkeypatch)
    with Separator(trt_dir, "trt", max_batch=4) as sep:
        assert not sep.backend.cuda_graphs
        check_same(sep.process(**REQUESTS["multi"], keep_latents=True), reference["multi"])
    assert gpu.counts["captures"] == gpu.counts["graph_launches"] == 0


def test_a_refused_capture_falls_back_with_a_warning(monkeypatch, trt_dir, reference):
    FakeGpu(capture_fails=True).install(monkeypatch)
    with Separator(trt_dir, "trt", max_batch=4) as sep:
        with pytest.warns(RuntimeWarning, match="CUDA graph capture of the denoiser loop failed"):
            result = sep.process(**REQUESTS["generation"], keep_latents=True)
        check_same(result, reference["generation"])
        assert not sep.backend.cuda_graphs


def test_engines_for_another_gpu_are_refused_and_auto_falls_back(monkeypatch, trt_dir):
    FakeGpu(gpu="NVIDIA A100-SXM4-80GB", capability=(8, 0)).install(monkeypatch)
    with pytest.raises(BackendUnavailable, match="engines were built for NVIDIA H100 80GB HBM3"):
        Separator(trt_dir, "trt")
    with pytest.warns(RuntimeWarning, match="not using the TensorRT engines: .*rebuild them"):
        sep = Separator(trt_dir, "auto")
    assert sep.backend_name == "ort-cpu"


def test_auto_prefers_matching_engines(gpu, trt_dir):
    assert Separator(trt_dir, "auto").backend_name == "trt"


def test_without_tensorrt_trt_is_a_clear_error(monkeypatch, trt_dir, model_dir):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        Separator(trt_dir, "trt")
    assert Separator(trt_dir, "auto").backend_name == "ort-cpu"


def test_model_without_engines_is_refused(gpu, model_dir):
    with pytest.raises(BackendUnavailable, match="no TensorRT engines .*--engines-only"):
        Separator(model_dir, "trt")


def test_tampered_engine_is_refused(gpu, trt_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(trt_dir, bad)
    with open(bad / "vocoder.fp16.engine", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(ModelDirError, match="vocoder.fp16.engine: SHA-256 does not match"):
        Separator(bad, "trt")


def test_batch_beyond_the_profile_is_a_clear_error(gpu, trt_dir):
    with pytest.raises(InputError, match="max batch 5 exceeds what the trt engines were built "
                                         r"for \(4\)"):
        Separator(trt_dir, "trt", max_batch=5)
    with Separator(trt_dir, "trt") as sep:
        spec = sep.model.specs["vae_decoder"]
        latent = np.zeros(spec.tensor("latent").concrete(spec.max_batch + 1), np.float32)
        with pytest.raises(BackendError, match="batch 5 exceeds the engine's optimisation "
                                               r"profile \(max 4\)"):
            sep.backend.run("vae_decoder", {"latent": latent})
