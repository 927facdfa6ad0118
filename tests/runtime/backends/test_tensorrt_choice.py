"""Which TensorRT engines load, on the CPU stand-in (fake_gpu.py): the backend chosen by
``auto`` and ``trt`` for the GPU at hand, and the engine files checked against the manifest."""

import shutil
import warnings

import pytest

from mmsep.runtime import Separator
from mmsep.runtime.errors import BackendUnavailable, ModelDirError
from tests.helpers import damaged_copy


def test_engines_for_another_gpu_are_refused_and_auto_falls_back(make_gpu, trt_dir):
    make_gpu(gpu="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    with pytest.raises(BackendUnavailable, match="engines were built for NVIDIA H100 80GB HBM3"):
        Separator(trt_dir, "trt")
    with pytest.warns(RuntimeWarning, match="not using the TensorRT engines: .*rebuild them"):
        sep = Separator(trt_dir, "auto")
    assert sep.backend_name == "ort-cpu"


def test_auto_prefers_matching_engines(gpu, trt_dir):
    assert Separator(trt_dir, "auto").backend_name == "trt"


def test_auto_passes_over_the_engines_quietly_where_the_driver_sees_no_gpu(make_gpu, trt_dir):
    """As for ort-cuda: TensorRT installed on a machine without a GPU is no reason to warn on
    every run; --backend trt still says why it cannot run."""
    make_gpu(devices=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Separator(trt_dir, "auto").backend_name == "ort-cpu"
    with pytest.raises(BackendUnavailable, match="no CUDA device 0"):
        Separator(trt_dir, "trt")


def test_without_tensorrt_trt_is_a_clear_error(monkeypatch, trt_dir, model_dir):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        Separator(trt_dir, "trt")
    assert Separator(trt_dir, "auto").backend_name == "ort-cpu"


def test_model_without_engines_is_refused(gpu, model_dir):
    with pytest.raises(BackendUnavailable, match="no TensorRT engines .*--engines-only"):
        Separator(model_dir, "trt")


def test_tampered_engine_is_refused(gpu, trt_dir, tmp_path):
    bad = damaged_copy(trt_dir, tmp_path / "bad", "vocoder.fp16.engine", offset=200)
    with pytest.raises(ModelDirError, match="vocoder.fp16.engine: SHA-256 does not match"):
        Separator(bad, "trt")


def test_no_verify_skips_hashing_the_engines_and_still_checks_their_sizes(gpu, trt_dir, tmp_path,
                                                                          monkeypatch):
    """--no-verify (verify=False) hashes no engine at load, as for the graphs; an engine whose
    size is not the manifest's is still refused, naming it."""
    import mmsep.runtime.backends.tensorrt as tensorrt_module
    import mmsep.runtime.model_dir as model_dir_module

    hashed = []

    def spy(hash_file):
        def recording(path, *args, **kwargs):
            hashed.append(str(path))
            return hash_file(path, *args, **kwargs)
        return recording

    for module in (tensorrt_module, model_dir_module):
        monkeypatch.setattr(module, "sha256_file", spy(module.sha256_file))
    with Separator(trt_dir, "trt", verify=False) as sep:
        assert sep.backend_name == "trt"
    assert not [p for p in hashed if p.endswith(".engine")]
    with Separator(trt_dir, "trt"):  # and verify=True does hash them
        assert [p for p in hashed if p.endswith(".engine")]

    longer = tmp_path / "longer"
    shutil.copytree(trt_dir, longer)
    with open(longer / "vocoder.fp16.engine", "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(ModelDirError, match=r"vocoder.fp16.engine: \d+ bytes, the manifest says"):
        Separator(longer, "trt", verify=False)
