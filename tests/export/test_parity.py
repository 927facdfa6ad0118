"""Where the export's parity checks run (--parity-device), and the PyTorch reference they share."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmsep.export import parity
from mmsep.export.errors import ExportError, UsageError
from mmsep.export.parity import StageReference, check_onnxruntime, resolve_parity_device
from mmsep.export.precision_parity import check_reduced_precision
from mmsep.export.wrappers import stage_modules, stage_specs
from mmsep.models import build_components
from mmsep.runtime.backends import ort as ort_backend
from tests.helpers import TINY_SEED, TINY_WINDOW_SECONDS, rel_l2

CUDA_HERE = torch.cuda.is_available() and ort_backend.cuda_available()


class Counting(torch.nn.Module):
    """A stage module that counts its forward calls."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, *inputs):
        self.calls += 1
        return self.module(*inputs)


@pytest.fixture(scope="module")
def vae_decoder(tiny_model_dir):
    """The tiny model directory's VAE decoder: module, spec and the directory."""
    components = build_components("tiny", duration=TINY_WINDOW_SECONDS, seed=TINY_SEED)
    return (stage_modules(components)["vae_decoder"], stage_specs(components)["vae_decoder"],
            tiny_model_dir)


def test_parity_device_resolution(monkeypatch):
    assert resolve_parity_device("cpu") == "cpu"
    no_provider = "ONNX Runtime's CUDA provider is not available here (install onnxruntime-gpu)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ort_backend, "cuda_refusal", lambda: no_provider)
    assert resolve_parity_device("auto") == "cpu"
    with pytest.raises(UsageError) as refused:
        resolve_parity_device("cuda")
    assert str(refused.value) == f"--parity-device cuda: PyTorch sees no CUDA GPU; {no_provider}"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UsageError, match="CUDA provider is not available"):
        resolve_parity_device("cuda")
    assert resolve_parity_device("auto") == "cpu"  # both must see the GPU
    monkeypatch.setattr(ort_backend, "cuda_refusal", lambda: None)
    assert resolve_parity_device("auto") == resolve_parity_device("cuda") == "cuda"
    with pytest.raises(ValueError, match="one of auto, cpu, cuda"):
        resolve_parity_device("gpu")


def test_fp32_and_fp16_checks_share_one_reference_per_batch(vae_decoder):
    module, spec, model_dir = vae_decoder
    counting = Counting(module)
    reference = StageReference(counting, spec)
    fp32 = check_onnxruntime(counting, spec, model_dir / "vae_decoder.onnx", reference=reference)
    fp16 = check_reduced_precision(counting, spec, model_dir / "vae_decoder.fp16.onnx",
                                   reference=reference)
    assert counting.calls == 1 and fp32.batch == fp16.batch == parity.PARITY_BATCH
    assert fp32.backend == "onnxruntime-cpu-fp32" and fp16.backend == "onnxruntime-cpu-fp16"
    check_reduced_precision(counting, spec, model_dir / "vae_decoder.fp16.onnx", batch=1,
                            reference=reference)
    assert counting.calls == 2  # another batch: another reference
    # the shared reference equals one made afresh (same seed, same inputs)
    inputs, expected = reference.at(1)
    again_inputs, again = StageReference(module, spec).at(1)
    for name in spec.output_names:
        np.testing.assert_array_equal(expected[name], again[name])
    assert all(np.array_equal(inputs[k], again_inputs[k]) for k in inputs)
    # and it is the module's own output on those inputs
    with torch.no_grad():
        direct = module(*(torch.from_numpy(v) for v in inputs.values()))
    np.testing.assert_array_equal(expected[spec.output_names[0]], direct.numpy())


@pytest.mark.skipif(CUDA_HERE, reason="ONNX Runtime CUDA is usable here: no silent fallback")
def test_a_session_that_would_fall_back_to_the_cpu_is_refused(vae_decoder):
    """ONNX Runtime's CPU build accepts the CUDA provider and runs on the CPU instead; a check
    that asked for CUDA must not report a CPU figure as a GPU one."""
    module, spec, model_dir = vae_decoder
    with pytest.raises(ExportError, match="runs on CPUExecutionProvider, not "
                                          "CUDAExecutionProvider"):
        parity.onnxruntime_session(model_dir / "vae_decoder.onnx", spec, "cuda")


@pytest.mark.skipif(CUDA_HERE, reason="a GPU is usable here: --parity-device cuda would run")
def test_cli_parity_device_cuda_without_a_gpu_is_exit_2(tmp_path):
    out = tmp_path / "m"
    done = subprocess.run([sys.executable, "-m", "mmsep.export.cli", "--preset", "tiny",
                           "--parity-device", "cuda", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("mmsep-export: error: --parity-device cuda: ")
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_HERE, reason="needs a CUDA GPU for PyTorch and onnxruntime-gpu")
def test_export_checks_every_graph_on_the_gpu(tiny_model_dir):
    """tiny_model_dir is exported with --parity-device auto: here, on the GPU."""
    manifest = json.loads((tiny_model_dir / "manifest.json").read_text())
    for name, stage in manifest["stages"].items():
        fp32 = stage["parity"]["onnxruntime"]
        fp16 = stage["reduced"]["fp16"]["parity"]["onnxruntime"]
        assert fp32["backend"] == "onnxruntime-cuda-fp32" and fp32["passed"], (name, fp32)
        assert fp16["backend"] == "onnxruntime-cuda-fp16" and fp16["passed"], (name, fp16)
        assert fp16["batch"] == fp32["batch"] == parity.PARITY_BATCH


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_HERE, reason="needs a CUDA GPU for PyTorch and onnxruntime-gpu")
def test_the_gpu_reference_leaves_the_module_on_the_cpu(vae_decoder):
    """The GPU reference moves the module there and back (the next stage traces on the CPU);
    it agrees with the CPU reference to fp32 rounding."""
    module, spec, _ = vae_decoder
    on_gpu = StageReference(module, spec, "cuda").at(2)[1]
    on_cpu = StageReference(module, spec, "cpu").at(2)[1]
    assert all(p.device.type == "cpu" for p in module.parameters())
    for name in spec.output_names:
        assert rel_l2(on_gpu[name], on_cpu[name]) < 1e-5, name
