"""The TensorRT backend's logic on a CPU stand-in for TensorRT/pycuda/cuda-python (fake_gpu.py).

Real TensorRT needs an NVIDIA GPU; these tests check everything around the engines (which ones
load: test_tensorrt_choice.py): refusal reasons, buffer reuse and pointer arithmetic, the
double-buffered step loop and its CUDA graph capture/replay, against the ONNX Runtime CPU backend
on the same graphs. `pytest -m gpu` runs the real thing where TensorRT and a GPU exist (the last
test).
"""

import json
import shutil
import threading

import numpy as np
import onnx
import pytest

from mmsep.runtime import Separator
from mmsep.runtime.errors import BackendError, InputError
from mmsep.runtime.example import tones
from mmsep.runtime.model_dir import ModelDir
from mmsep.runtime.backends import create_backend
from mmsep.runtime.backends.cuda_memory import CudaMemory, DeviceArray
from mmsep.runtime.backends.tensorrt import engine_refusal
from tests.helpers import TINY_SEED, TINY_WINDOW_SECONDS, rel_l2
from tests.runtime.backends.fake_gpu import HERE, with_engines

SR = 44100


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


def test_without_cuda_python_the_steps_are_enqueued_one_by_one(make_gpu, trt_dir, reference):
    gpu = make_gpu(with_cudart=False)
    with Separator(trt_dir, "trt", max_batch=4) as sep:
        assert not sep.backend.cuda_graphs
        check_same(sep.process(**REQUESTS["multi"], keep_latents=True), reference["multi"])
    assert gpu.counts["captures"] == gpu.counts["graph_launches"] == 0


def test_a_refused_capture_falls_back_with_a_warning(make_gpu, trt_dir, reference):
    make_gpu(capture_fails=True)
    with Separator(trt_dir, "trt", max_batch=4) as sep:
        with pytest.warns(RuntimeWarning, match="CUDA graph capture of the denoiser loop failed"):
            result = sep.process(**REQUESTS["generation"], keep_latents=True)
        check_same(result, reference["generation"])
        assert not sep.backend.cuda_graphs


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


# ---- the audit's findings (issue 18), each on the strict stand-in --------------------------------

def test_an_odd_batch_binds_every_tensor_at_an_aligned_address(gpu, trt_dir, model_dir):
    """Finding 1: the per-step t and the cfg scalars get slots of their own, 256-byte aligned."""
    request = dict(mix=tones(3.5, SR, seed=5), text="rain", steps=3, cfg=2.0, seed=4,
                   keep_latents=True)
    with Separator(model_dir, "ort-cpu") as cpu:
        want = cpu.process(**request)
    with Separator(trt_dir, "trt", max_batch=4) as sep:
        got = sep.process(**request)
        assert got.batches == 1 and got.latents.shape[0] == 3  # batch 3: t at 12-byte strides
    check_same(got, want)


def test_no_context_is_left_pushed_without_close_or_across_threads(gpu, trt_dir, reference):
    """Finding 2: the context is current only during a call, on the calling thread."""
    sep = Separator(trt_dir, "trt", max_batch=4)  # not a context manager, never closed
    assert gpu.leftover_contexts() == 0
    results = []
    worker = threading.Thread(target=lambda: results.append(
        sep.process(**REQUESTS["generation"], keep_latents=True)))
    worker.start()
    worker.join()
    check_same(results[0], reference["generation"])
    assert gpu.leftover_contexts() == 0


def test_close_after_a_sticky_cuda_error_still_pops_the_context(gpu, trt_dir):
    """Finding 2: close() pops in a finally, and says what went wrong."""
    sep = Separator(trt_dir, "trt", max_batch=4)
    gpu.sticky_error = "an illegal memory access was encountered"
    with pytest.raises(BackendError, match="an illegal memory access was encountered"):
        sep.close()
    assert gpu.leftover_contexts() == 0
    sep.close()  # a second close does nothing


def test_the_capture_binds_addresses_only_after_a_plain_enqueue(gpu, trt_dir, reference):
    """Finding 3: shapes are set before the capture, which is not invalidated."""
    with Separator(trt_dir, "trt", max_batch=4) as sep:
        result = sep.process(**REQUESTS["generation"], keep_latents=True)
        assert sep.backend.cuda_graphs and gpu.counts["captures"] == 1
    check_same(result, reference["generation"])


def test_cuda_python_11_graph_api_is_used_too(make_gpu, trt_dir, reference):
    """Finding 4: cudaGraphInstantiate's 11.x signature (graph, log buffer, size)."""
    gpu = make_gpu(cudart_api="11")
    with Separator(trt_dir, "trt", max_batch=4) as sep:
        check_same(sep.process(**REQUESTS["generation"], keep_latents=True),
                   reference["generation"])
        assert sep.backend.cuda_graphs and gpu.counts["captures"] == 1


def test_copies_go_through_page_locked_staging_buffers(gpu, trt_dir, reference):
    """Finding 5: no async copy from or to pageable memory in the request loop."""
    with Separator(trt_dir, "trt", max_batch=4) as sep:
        check_same(sep.process(**REQUESTS["multi"], keep_latents=True), reference["multi"])
    assert gpu.counts["pageable_copies"] == 0


def test_the_stand_in_refuses_what_tensorrt_and_cuda_refuse(gpu, trt_dir):
    """The stand-in itself: misaligned addresses, shapes outside the profile, missing addresses,
    unsafe captures, pending errors, pageable copies and an empty context stack all fail."""
    import pycuda.driver as cuda
    import tensorrt as trt
    from cuda.bindings import runtime as rt

    with pytest.raises(cuda.LogicError, match="no currently active context"):
        cuda.mem_alloc(256)
    context = cuda.Device(0).retain_primary_context()
    context.push()
    try:
        engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(
            (trt_dir / "vae_decoder.fp16.engine").read_bytes())
        ctx, stream = engine.create_execution_context(), cuda.Stream()
        latent, mel = cuda.mem_alloc(1 << 20), cuda.mem_alloc(1 << 20)
        assert not ctx.set_tensor_address("latent", int(latent) + 4)
        assert not ctx.set_input_shape("latent", (5, 87, 40))  # profile max is 4
        assert ctx.set_input_shape("latent", (1, 87, 40))
        assert ctx.set_tensor_address("latent", int(latent))
        assert not ctx.execute_async_v3(stream.handle)  # "mel" has no address
        assert ctx.set_tensor_address("mel", int(mel))
        rt.cudaStreamBeginCapture(stream.handle, 1)
        assert not ctx.execute_async_v3(stream.handle)  # no plain enqueue at these shapes yet
        assert rt.cudaStreamEndCapture(stream.handle)[0] == 901
        assert not ctx.execute_async_v3(stream.handle)  # the capture's error was pending
        assert ctx.execute_async_v3(stream.handle)
        rt.cudaStreamBeginCapture(stream.handle, 1)
        ctx.set_input_shape("latent", (1, 87, 40))
        assert ctx.execute_async_v3(stream.handle)
        assert rt.cudaStreamEndCapture(stream.handle)[0] == 901  # set_input_shape in a capture
        assert rt.cudaGetLastError()[0] == 901 and rt.cudaGetLastError()[0] == 0
        cuda.memcpy_htod_async(latent, np.zeros(4, np.float32), stream)
        cuda.memcpy_htod_async(latent, cuda.pagelocked_empty(4, np.float32), stream)
        assert gpu.counts["pageable_copies"] == 1
        with pytest.raises(TypeError):
            rt.cudaGraphInstantiate(None, b"", 0)  # 12.x takes (graph, flags)
    finally:
        context.pop()
    with pytest.raises(cuda.LogicError, match="cannot pop"):
        context.pop()


# ---- what TensorRT refuses, through the backend -------------------------------------------------

def test_a_shape_outside_the_engine_profile_is_a_backend_error(gpu, model_dir, tmp_path):
    """Engines built with a narrower profile than the manifest says: set_input_shape is False."""
    narrow = with_engines(model_dir, tmp_path / "narrow", profile_max_batch={"vae_decoder": 2})
    with create_backend(ModelDir(narrow), "trt") as backend:
        latent = np.zeros(backend.model.specs["vae_decoder"].tensor("latent").concrete(3),
                          np.float32)
        with pytest.raises(BackendError, match=r"stage 'vae_decoder': TensorRT could not set the "
                                               r"shape of input 'latent' to \(3, 87, 40\)"):
            backend.run("vae_decoder", {"latent": latent})
        assert backend.run("vae_decoder", {"latent": latent[:2]})["mel"].shape[0] == 2


def test_an_address_tensorrt_refuses_is_a_backend_error(gpu, trt_dir, monkeypatch):
    """set_tensor_address is False for memory that is not the device's, and for an address
    that is not 256-byte aligned."""
    with create_backend(ModelDir(trt_dir), "trt") as backend:
        spec = backend.model.specs["vae_decoder"]
        shape = spec.tensor("latent").concrete(1)
        foreign = DeviceArray(1 << 40, shape, np.dtype(np.float32))
        with pytest.raises(BackendError, match="stage 'vae_decoder': TensorRT could not bind "
                                               "input 'latent'"):
            backend.run("vae_decoder", {"latent": foreign})
    allocate = CudaMemory.alloc
    monkeypatch.setattr(CudaMemory, "alloc", lambda self, n: allocate(self, n + 16) + 16)
    with create_backend(ModelDir(trt_dir), "trt") as backend:
        with pytest.raises(BackendError, match="stage 'vae_decoder': TensorRT could not bind "
                                               "input 'latent'"):
            backend.run("vae_decoder", {"latent": np.zeros(shape, np.float32)})


@pytest.mark.parametrize("dtype", ["float16", "int32", "bool"])
def test_an_engine_tensor_of_another_dtype_is_refused(gpu, model_dir, tmp_path, dtype):
    def retype_waveform(stage, graph):
        if stage == "vocoder":
            cast_to(graph, dtype)

    other = with_engines(model_dir, tmp_path / dtype, edit=retype_waveform)
    with pytest.raises(BackendError, match=f"stage 'vocoder': engine tensor 'waveform' is "
                                           f"{dtype}, the contract says float32"):
        create_backend(ModelDir(other), "trt")


def cast_to(graph, dtype: str) -> None:
    """Make the graph's first output ``dtype``: its producer now writes a tensor that is cast."""
    output = graph.graph.output[0]
    for node in graph.graph.node:
        node.output[:] = [f"{o}_before_cast" if o == output.name else o for o in node.output]
    element = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph.graph.node.append(onnx.helper.make_node("Cast", [f"{output.name}_before_cast"],
                                                  [output.name], to=element))
    output.type.tensor_type.elem_type = element


def test_a_staging_buffer_rewritten_before_its_copy_ran_is_caught(gpu, trt_dir, monkeypatch):
    """Host-to-device copies are asynchronous: one staging buffer shared by all copies (a bug)
    is rewritten while an earlier copy still waits on the stream."""
    put = CudaMemory.put
    monkeypatch.setattr(CudaMemory, "put",
                        lambda self, ptr, array, key=None: put(self, ptr, array, key="shared"))
    with pytest.raises(AssertionError, match="rewritten before the copy ran"):
        with Separator(trt_dir, "trt") as sep:
            sep.process(**REQUESTS["generation"])


def test_the_stand_in_copies_asynchronously(gpu):
    import pycuda.driver as cuda

    context = cuda.Device(0).retain_primary_context()
    context.push()
    try:
        stream, device = cuda.Stream(), cuda.mem_alloc(256)
        staged, back = cuda.pagelocked_empty(4, np.float32), cuda.pagelocked_empty(4, np.float32)
        staged[:] = 1
        cuda.memcpy_htod_async(device, staged, stream)
        cuda.memcpy_dtoh_async(back, device, stream)
        assert not back.any()  # nothing ran yet
        stream.synchronize()
        assert (back == 1).all()
        cuda.memcpy_htod_async(device, np.full(4, 2, np.float32), stream)  # pageable: staged now
        staged[:] = 3
        cuda.memcpy_htod_async(device, staged, stream)
        staged[:] = 4
        with pytest.raises(AssertionError, match="rewritten before the copy ran"):
            stream.synchronize()
    finally:
        context.pop()


# ---- real TensorRT (a GPU with TensorRT and pycuda) ---------------------------------------------

@pytest.mark.gpu
def test_runtime_trt_backend_matches_onnxruntime(request, tmp_path):
    """Real engines through the runtime's TensorRT backend (pycuda, CUDA graph) vs ORT CPU."""
    from mmsep.export import tensorrt_build as tb

    reason = tb.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("pycuda.driver", reason="the runtime's TensorRT backend needs pycuda")
    from mmsep.export.wrappers import stage_modules
    from mmsep.models import build_components

    model_dir = tmp_path / "tiny"
    shutil.copytree(request.getfixturevalue("tiny_model_dir"), model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    modules = stage_modules(build_components("tiny", duration=TINY_WINDOW_SECONDS, seed=TINY_SEED))
    manifest["tensorrt"] = tb.build_engines(model_dir, manifest, modules, precision="fp16",
                                            timing_cache=tmp_path / "timing.cache")
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    request_ = dict(mix=tones(3.5, 44100, seed=3), text=["rain", "wind"], steps=2, cfg=1.0,
                    seed=1, keep_latents=True)
    video = dict(video=request.getfixturevalue("media")["av"], steps=2, seed=1,
                 keep_latents=True)
    with Separator(model_dir, "ort-cpu") as cpu, Separator(model_dir, "trt") as gpu:
        want, got = cpu.process(**request_), gpu.process(**request_)
        again = gpu.process(**request_)  # replays the captured step loop
        assert gpu._resizer is not None  # the frame-resize engine, built beside the others
        video_want, video_got = cpu.process(**video), gpu.process(**video)
    video_err = rel_l2(video_got.latents, video_want.latents)
    print(f"the same with video resized by the frame-resize engine: {video_err:.2e}")
    assert video_err < 2e-2
    err = np.linalg.norm(got.latents - want.latents) / np.linalg.norm(want.latents)
    print(f"TensorRT fp16 runtime vs ONNX Runtime fp32, final latents (2 steps, cfg 1): {err:.2e}")
    assert err < 2e-2
    np.testing.assert_array_equal(again.latents, got.latents)


def test_a_device_buffer_is_kept_per_key_and_grows_only_when_asked_for_more(gpu):
    import pycuda.driver as cuda

    context = cuda.Device(0).retain_primary_context()
    context.push()
    try:
        memory = CudaMemory(cuda)
        first = memory.buffer("x", 100, reserve=1000)
        assert memory.buffer("x", 1000) == first  # the reserve was allocated up front
        assert gpu.view(first, 1000).size == 1000
        assert memory.buffer("y", 100) != first  # another key, another buffer
        grown = memory.buffer("x", 1001)
        assert grown != first and gpu.view(grown, 1001).size == 1001
        assert memory.buffer("x", 10) == grown
        memory.release()
        assert memory.buffer("x", 10) not in (first, grown)  # released: allocated anew
    finally:
        context.pop()
