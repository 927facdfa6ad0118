"""ONNX Runtime's graph precision and the pinned, bound denoiser loop that CUDA graphs replay,
checked on the CPU (where it runs uncaptured) against the plain step-by-step loop."""

import shutil
import threading
import warnings

import numpy as np
import pytest

from mmsep.runtime.backends import OrtBackend, create_backend
from mmsep.runtime.backends import ort_graphs
from mmsep.runtime.backends.ort import graph_precision
from mmsep.runtime.errors import BackendUnavailable, ModelDirError
from mmsep.runtime.model_dir import ModelDir
from mmsep.stages import Stage
from tests.helpers import rel_l2 as relative_l2
from tests.helpers import without_fp16_copies

from .test_ort import random_inputs


@pytest.fixture(scope="module")
def model(model_dir):
    return ModelDir(model_dir)


@pytest.fixture(scope="module")
def fp32_only(model_dir, tmp_path_factory):
    """The tiny model as exported with --precision fp32: no fp16 copies in its manifest."""
    return ModelDir(without_fp16_copies(model_dir, tmp_path_factory.mktemp("fp32only") / "tiny"))


def request(model, batch, seed=0):
    """x0, the mixture latent and both branches' conditioning of a random request."""
    spec = model.specs[Stage.DENOISER]
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(spec.tensor("x").concrete(batch), np.float32)
    mix = rng.standard_normal(x0.shape, np.float32)
    conditioning = {t.name: rng.standard_normal(t.concrete(batch), np.float32)
                    for t in spec.inputs if t.name.startswith("cond_")}
    return x0, mix, conditioning


def plain_loop(model, x0, mix, conditioning, steps, cfg, precision="fp32"):
    with OrtBackend(model, "cpu", precision=precision, cuda_graphs=False) as backend:
        return backend.to_host(backend.sample(x0, mix, conditioning, steps, cfg))


def test_precision_choice(model, fp32_only):
    assert model.has_precision("fp16") and not fp32_only.has_precision("fp16")
    assert graph_precision(model, "cpu") == "fp32"
    assert graph_precision(model, "cuda") == "fp16"
    assert graph_precision(model, "cuda", "fp32") == "fp32"
    assert graph_precision(model, "cpu", "fp16") == "fp16"
    with pytest.warns(RuntimeWarning, match="has no fp16 graphs .* running the fp32 graphs"):
        assert graph_precision(fp32_only, "cuda") == "fp32"
    with pytest.raises(BackendUnavailable, match="has no fp16 graphs .* re-export it with "
                                                 "mmsep-export --precision fp16"):
        graph_precision(fp32_only, "cpu", "fp16")
    with pytest.raises(ValueError, match="precision must be one of auto, fp16, fp32"):
        graph_precision(model, "cpu", "int8")
    with create_backend(model, "ort-cpu", precision="fp16") as backend:
        assert backend.precision == "fp16"


def test_fp16_graphs_run_within_their_bound(model):
    """Each stage's fp16 copy, run by the backend, against its fp32 graph (fp32 I/O)."""
    with OrtBackend(model, "cpu") as fp32, OrtBackend(model, "cpu", precision="fp16") as fp16:
        for stage in ("conditioner", "denoiser", "vae_decoder", "clip_text"):
            assert fp16._session(stage)._model_path.endswith(f"{stage}.fp16.onnx")
            inputs = random_inputs(model.specs[stage], 2, seed=3)
            want, got = fp32.run(stage, inputs), fp16.run(stage, inputs)
            for name, value in want.items():
                assert got[name].dtype == np.float32
                assert 0 < relative_l2(got[name], value) < 1e-2, (stage, name)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_pinned_loop_equals_the_plain_loop(model, precision):
    """Batches 1, 3, 2, 1 through one backend: the first SESSIONS batch sizes get a pinned
    session each and keep it, the others run the plain loop (no session is loaded and dropped
    over and over), and every result equals the plain loop's: bit for bit in fp32; in fp16
    within the reduced-precision bound (ONNX Runtime's CPU optimiser treats the fp16 graph's
    Casts differently once shapes are fixed, so the roundings differ)."""
    with OrtBackend(model, "cpu", precision=precision, cuda_graphs=True) as backend:
        for seed, batch in enumerate((1, 3, 2, 1)):
            x0, mix, conditioning = request(model, batch, seed)
            got = backend.sample(x0, mix, conditioning, 5, 4.5)
            want = plain_loop(model, x0, mix, conditioning, 5, 4.5, precision)
            if precision == "fp32":
                np.testing.assert_array_equal(got, want)
            else:
                print(f"fp16 batch {batch}: pinned vs plain rel L2 {relative_l2(got, want):.1e}")
                assert relative_l2(got, want) < 1e-2
            assert not np.allclose(got, x0)
        pinned = backend._graphs._pinned
        assert ort_graphs.SESSIONS == 2 and list(pinned) == [1, 3]
        for batch, denoiser in pinned.items():
            assert [i.shape[0] for i in denoiser.session.get_inputs()] == [
                t.concrete(batch)[0] for t in model.specs[Stage.DENOISER].inputs]
        assert backend._graphs.enabled and "denoiser" in backend._sessions  # batch 2's loop


def test_each_graph_id_always_binds_the_same_buffers(model):
    """The contract CUDA capture relies on: graph 1 always reads buffer A and writes B, graph 2
    the reverse, whatever the number of steps; the result is the last written buffer."""
    spec = model.specs[Stage.DENOISER]
    with OrtBackend(model, "cpu") as backend:
        options = backend._session_options()
    pinned = ort_graphs.PinnedDenoiser(
        __import__("onnxruntime"), model.onnx_path(Stage.DENOISER), spec, 2, options=options,
        providers=["CPUExecutionProvider"], device="cpu", device_id=0, capture=True)
    runs = []

    class Recording:
        def __init__(self, session):
            self.session = session

        def run_with_iobinding(self, binding, run_options):
            runs.append((pinned._bindings.index(binding),
                         run_options.get_run_config_entry("gpu_graph_id")))
            self.session.run_with_iobinding(binding, run_options)

    pinned.session = Recording(pinned.session)
    x0, mix, conditioning = request(model, 2)
    for steps in (5, 2):
        runs.clear()
        got = pinned.sample(x0, {**conditioning, "mix_latent": mix}, [i / steps for i in
                            range(steps)], 1 / steps, 3.0, threading.Lock())
        assert runs == [(k % 2, str(k % 2 + 1)) for k in range(steps)]
        np.testing.assert_array_equal(got, plain_loop(model, x0, mix, conditioning, steps, 3.0))


def test_a_failed_session_or_capture_falls_back_to_the_plain_loop(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("This session cannot use the graph capture feature")

    x0, mix, conditioning = request(model, 2, seed=4)
    want = plain_loop(model, x0, mix, conditioning, 3, 4.5)
    with OrtBackend(model, "cpu", cuda_graphs=True) as backend:
        monkeypatch.setattr(ort_graphs.PinnedDenoiser, "sample", refuse)
        with pytest.warns(RuntimeWarning, match="CUDA graphs of the denoiser loop are off for "
                                                "this backend .*cannot use the graph capture"):
            got = backend.to_host(backend.sample(x0, mix, conditioning, 3, 4.5))
        np.testing.assert_array_equal(got, want)
        assert not backend._graphs.enabled and not backend._graphs._pinned
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            got = backend.to_host(backend.sample(x0, mix, conditioning, 3, 4.5))
        np.testing.assert_array_equal(got, want)


def test_a_replaced_model_directory_is_not_read(model_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    x0, mix, conditioning = request(ModelDir(copy), 1)
    with OrtBackend(ModelDir(copy), "cpu", cuda_graphs=True) as backend:
        shutil.move(copy, tmp_path / "moved")
        shutil.copytree(tmp_path / "moved", copy)  # a re-export swaps in a new directory
        with pytest.raises(ModelDirError, match="was replaced or removed while in use"):
            backend.sample(x0, mix, conditioning, 2, 4.5)


def test_bad_input_is_refused_before_the_graphs(model):
    from mmsep.runtime.errors import BackendError

    x0, mix, conditioning = request(model, 2)
    with OrtBackend(model, "cpu", cuda_graphs=True) as backend:
        with pytest.raises(BackendError, match="input 'mix_latent' has shape"):
            backend.sample(x0, mix[:1], conditioning, 2, 4.5)
        with pytest.raises(BackendError, match="input 'x' is float64"):
            backend.sample(x0.astype(np.float64), mix, conditioning, 2, 4.5)
        assert backend._graphs.enabled and not backend._graphs._pinned
