"""ONNX Runtime backend: IO-binding runs against plain sessions, the device loop, errors."""

import json
import re

import numpy as np
import onnxruntime as ort
import pytest

from mmsep.model_files import sha256_file
from mmsep.runtime.backends import OrtBackend, create_backend, cuda_available
from mmsep.runtime.backends.ort import cuda_refusal
from mmsep.runtime.errors import BackendError, BackendUnavailable, ModelDirError
from mmsep.runtime.model_dir import ModelDir


@pytest.fixture(scope="module")
def model(model_dir):
    return ModelDir(model_dir)


@pytest.fixture(scope="module")
def backend(model):
    with OrtBackend(model, "cpu") as b:
        yield b


def random_inputs(spec, batch, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for t in spec.inputs:
        shape = t.concrete(batch)
        out[t.name] = (rng.integers(0, 1000, shape) if t.dtype == "int64"
                       else rng.standard_normal(shape).astype(np.float32))
    return out


@pytest.mark.parametrize("stage,batch", [("conditioner", 3), ("denoiser", 2),
                                         ("vae_decoder", 1), ("clip_text", 2)])
def test_run_matches_a_plain_session(model, backend, stage, batch):
    spec = model.specs[stage]
    inputs = random_inputs(spec, batch)
    plain = ort.InferenceSession(str(model.onnx_path(stage)), providers=["CPUExecutionProvider"])
    want = dict(zip(spec.output_names, plain.run(None, inputs)))
    got = backend.run(stage, inputs)
    for name in spec.output_names:
        assert got[name].shape == spec.tensor(name).concrete(batch)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    # device values chain into the next run and come back unchanged
    on_device = backend.run(stage, inputs, on_device=True)
    for name in spec.output_names:
        np.testing.assert_array_equal(backend.to_host(on_device[name]), got[name])


def test_condition_stacks_the_cached_unconditional_branch(model, backend):
    batch = 3
    inputs = random_inputs(model.specs["conditioner"], batch, seed=1)
    uncond = backend.run("conditioner", random_inputs(model.specs["conditioner"], 1, seed=2))
    stacked = backend.condition(inputs, uncond)
    cond = backend.run("conditioner", inputs)
    denoiser = model.specs["denoiser"]
    for name in model.specs["conditioner"].output_names:
        assert stacked[name].shape == denoiser.tensor(name).concrete(batch)
        np.testing.assert_array_equal(stacked[name][:batch], cond[name])
        for i in range(batch):
            np.testing.assert_array_equal(stacked[name][batch + i], uncond[name][0])
    with pytest.raises(BackendError, match="unconditional 'cond_text' has shape"):
        backend.condition(inputs, {**uncond, "cond_text": cond["cond_text"]})


def test_sample_equals_a_host_loop(model, backend):
    spec = model.specs["denoiser"]
    batch, steps, cfg = 2, 3, 2.5
    inputs = random_inputs(model.specs["conditioner"], batch, seed=1)
    uncond = backend.run("conditioner", random_inputs(model.specs["conditioner"], 1, seed=2))
    conditioning = backend.condition(inputs, uncond)
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal(spec.tensor("x").concrete(batch)).astype(np.float32)
    mix = rng.standard_normal(x0.shape).astype(np.float32)
    x = x0
    for i in range(steps):
        x = backend.run("denoiser", {**conditioning, "x": x, "mix_latent": mix,
                                     "t": np.full(batch, i / steps, np.float32),
                                     "dt": np.full(batch, 1 / steps, np.float32),
                                     "cfg": np.full(batch, cfg, np.float32)})["x_next"]
    device_cond = {name: backend.upload(value) for name, value in conditioning.items()}
    got = backend.to_host(backend.sample(x0, mix, device_cond, steps, cfg))
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, x0)


def test_input_errors_name_the_stage(backend, model):
    inputs = random_inputs(model.specs["vae_decoder"], 1)
    with pytest.raises(BackendError, match=r"stage 'vae_decoder': input 'latent' has shape "
                                           r"\(1, 86, 40\), expected \(1, 87, 40\)"):
        backend.run("vae_decoder", {"latent": inputs["latent"][:, :86]})
    with pytest.raises(BackendError, match="stage 'vae_decoder': input 'latent' is float64"):
        backend.run("vae_decoder", {"latent": inputs["latent"].astype(np.float64)})
    with pytest.raises(BackendError, match=r"stage 'vae_decoder': inputs missing \['latent'\]"):
        backend.run("vae_decoder", {"mel": inputs["latent"]})
    with pytest.raises(BackendError, match="stage 'nope': this model has no such stage"):
        backend.run("nope", {})


def test_broken_graph_is_reported_with_its_stage(model_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    graph = copy / "vocoder.onnx"
    graph.write_bytes(b"\x00" * graph.stat().st_size)
    mel = {"mel": np.zeros((1, 128, 174), np.float32)}
    # skipped at start, the hash check runs when the graph fails: a damaged file, exit 2
    with OrtBackend(ModelDir(copy, verify=False), "cpu") as b:
        with pytest.raises(ModelDirError, match=r"vocoder.onnx: SHA-256 does not match the "
                                                r"manifest .*--no-verify skipped"):
            b.run("vocoder", mel)
    # a graph that is the manifest's own and still does not load is the runtime's failure
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"]["vocoder"]["files"]["vocoder.onnx"]["sha256"] = sha256_file(graph)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with OrtBackend(ModelDir(copy), "cpu") as b:
        with pytest.raises(BackendError, match="stage 'vocoder': cannot load vocoder.onnx"):
            b.run("vocoder", mel)


def test_backend_selection(model, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # as on a machine without
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        create_backend(model, "trt")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        create_backend(model, "tpu")
    auto = create_backend(model, "auto")
    assert auto.name == ("ort-cuda" if cuda_available() else "ort-cpu")
    if not cuda_available():
        with pytest.raises(BackendUnavailable, match=re.escape(cuda_refusal())):
            create_backend(model, "ort-cuda")


def test_host_outputs_are_bound_to_cpu_device_0(model, monkeypatch):
    """ORT CUDA on GPU 1 returns host outputs: those are bound to ("cpu", 0), never to the CUDA
    device id (finding 7 of issue 18)."""
    bound = []
    original = ort.IOBinding.bind_output

    def recording(self, name, device_type="cpu", device_id=0, *args, **kwargs):
        bound.append((name, device_type, device_id))
        return original(self, name, device_type, device_id, *args, **kwargs)

    monkeypatch.setattr(ort.IOBinding, "bind_output", recording)
    with OrtBackend(model, "cpu", device_id=1) as b:  # as ort-cuda on a second GPU would be
        b.run("vae_decoder", random_inputs(model.specs["vae_decoder"], 1))
    assert bound == [("mel", "cpu", 0)]


def _nvidia_wheels(site, *packages):
    for package in packages:
        (site / "nvidia" / package / "lib").mkdir(parents=True)
    return site


def test_cuda_libraries_are_preloaded_from_nvidia_wheels_apart_from_onnxruntime(tmp_path,
                                                                              monkeypatch,
                                                                              capsys):
    """onnxruntime-gpu's preload_dlls searches only beside itself: NVIDIA's wheels elsewhere on
    sys.path (a PyTorch install's) are passed to it folder by folder, quietly, before its own
    search, which alone may report what is missing."""
    import mmsep.runtime.backends.ort as backend_module

    torch_site = _nvidia_wheels(tmp_path / "torch-site", "cu13", "cudnn")
    ort_site = _nvidia_wheels(tmp_path / "ort-site", "cu12")
    (ort_site / "onnxruntime").mkdir()
    monkeypatch.syspath_prepend(str(torch_site))
    monkeypatch.syspath_prepend(str(ort_site))
    calls = []

    class FakeOrt:
        __file__ = str(ort_site / "onnxruntime" / "__init__.py")

        @staticmethod
        def get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        @staticmethod
        def preload_dlls(directory=None):
            calls.append(directory)
            print(f"Failed to load something from {directory}")

    monkeypatch.setattr(backend_module, "import_ort", lambda: FakeOrt)
    backend_module.preload_cuda_libraries.__wrapped__()
    ours = [c for c in calls[:-1] if c.startswith(str(tmp_path))]
    assert ours == [str(torch_site / "nvidia" / "cu13" / "lib"),
                    str(torch_site / "nvidia" / "cudnn" / "lib")]
    assert calls[-1] is None  # its own search last, beside onnxruntime (cu12 here)
    assert capsys.readouterr().out == "Failed to load something from None\n"
