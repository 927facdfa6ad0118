"""Fixtures of the backend tests: the CPU stand-in for TensorRT/pycuda/cuda-python (fake_gpu.py)
and copies of the test model with stand-in "engines"."""

import pytest

from tests.runtime.backends.fake_gpu import FakeGpu, with_engines


@pytest.fixture(scope="module")
def trt_dir(model_dir, tmp_path_factory):
    return with_engines(model_dir, tmp_path_factory.mktemp("trt") / "tiny")


@pytest.fixture
def make_gpu(monkeypatch):
    """Installs a FakeGpu; at the end of the test, every thread's CUDA context stack must be
    empty (pycuda aborts the process at exit otherwise)."""
    made = []

    def make(**options):
        fake = FakeGpu(**options)
        fake.install(monkeypatch)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        assert fake.leftover_contexts() == 0, "a CUDA context was left pushed"


@pytest.fixture
def gpu(make_gpu):
    return make_gpu()
