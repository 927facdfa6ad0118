"""benchmarks/gpu_parity.py on the CPU (ONNX Runtime's CPU provider, torch CPU) with the tiny
preset: the logic of the GPU parity script, its JSON and its exit codes. No timing is asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the parity script exports and runs torch modules")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_parity.py"
STAGES = ("denoiser", "conditioner", "vae_decoder", "vocoder")
TRAJECTORIES = ("ort_fp32", "ort_fp16", "torch_fp32", "torch_bf16", "torch_fp16")


def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)


def _finite(x):
    return isinstance(x, float) and math.isfinite(x)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-parity")
    out = tmp / "parity.json"
    # 2 s windows: the same code paths as 8 s at a quarter of the vocoder's cost
    result = run_script("--preset", "tiny", "--device", "cpu", "--stages", ",".join(STAGES),
                        "--steps", 3, "--cfg", 4.5, "--duration", 2, "--workdir", tmp / "graphs",
                        "--json", out, cwd=tmp)
    return result, out, tmp


def test_tiny_cpu_run_passes_and_writes_json(tiny_run):
    result, out, tmp = tiny_run
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["schema"] == "mmsep-gpu-parity/1" and report["passed"] is True
    assert (report["preset"], report["device"], report["batch"], report["steps"]) == \
        ("tiny", "cpu", 2, 3)
    assert {"cpu", "cores", "gpu"} <= set(report["machine"])
    assert report["versions"]["onnxruntime"] and report["versions"]["torch"]
    assert "CPUExecutionProvider" in report["versions"]["onnxruntime_providers"]
    assert [row["stage"] for row in report["stages"]] == list(STAGES)
    for row in report["stages"]:
        assert row["passed"] is True and row["error"] is None
        assert row["provider"] == "CPUExecutionProvider"
        assert row["fp32"]["bound"] == 1e-4 and row["fp32"]["worst"] < 1e-4
        assert row["fp16"]["bound"] == 1e-2 and _finite(row["fp16"]["worst"])
        assert all(_finite(v) for v in row["fp16"]["rel_l2"].values())
        assert set(row["ms"]) == {"torch_fp32", "ort_fp32", "ort_fp16"}
        assert all(_finite(v) and v > 0 for v in row["ms"].values())
    for name in STAGES:  # the fp32 and fp16 graphs are kept in --workdir
        assert (tmp / "graphs" / f"{name}.onnx").is_file()
        assert (tmp / "graphs" / f"{name}.fp16.onnx").is_file()


def test_tiny_cpu_trajectory(tiny_run):
    result, out, _ = tiny_run
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert set(report["trajectory_variants"]) == set(TRAJECTORIES)
    [entry] = report["trajectory"]
    assert entry["cfg"] == 4.5 and entry["steps"] == 3 and entry["error"] is None
    rel = entry["rel_l2"]
    assert set(rel) == {"ort_fp16_vs_ort_fp32"} | {f"{label}_vs_torch_fp32" for label in
                                                   TRAJECTORIES if label != "torch_fp32"}
    assert all(_finite(v) for v in rel.values())
    # the fp32 graph follows the torch stage over the whole trajectory (measured 1.7e-6)
    assert rel["ort_fp32_vs_torch_fp32"] < 1e-4
    # rounding shows but stays small on the tiny preset (measured 1.6e-3, bf16 2.9e-2, fp16
    # 3.6e-3); the reference sampler makes its own conditioning, so this also checks the
    # stacked [conditional; unconditional] inputs the graphs were given
    assert 0 < rel["ort_fp16_vs_ort_fp32"] < 3e-2
    assert 0 < rel["torch_bf16_vs_torch_fp32"] < 0.2 and 0 < rel["torch_fp16_vs_torch_fp32"] < 0.05
    assert entry["fp16_within_reference_bf16"] is True
    assert set(entry["si_sdr_db"]) == set(TRAJECTORIES) - {"torch_fp32"}
    assert all(_finite(v) for v in entry["si_sdr_db"].values())
    assert entry["si_sdr_db"]["ort_fp32"] > 60


def test_tiny_cpu_prints_one_row_per_stage(tiny_run):
    result, _, _ = tiny_run
    lines = result.stdout.splitlines()
    for name in STAGES:
        [row] = [line for line in lines if line.startswith(f"{name} ") and "rel L2" in line]
        assert row.endswith("ok")
    assert "fp16_within_reference_bf16: true" in result.stdout
    assert any(line.startswith("all checks passed") for line in lines)


@pytest.fixture
def gpu_parity(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import gpu_parity

    return gpu_parity


def run_in_process(gpu_parity, capsys, *args) -> tuple[int, str]:
    """Exit status and stderr of the script's console entry point, run here (no start-up)."""
    with pytest.raises(SystemExit) as exit_info:
        gpu_parity.main(list(map(str, args)))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_device_cuda_without_gpu_is_bad_usage(gpu_parity, capsys):
    code, err = run_in_process(gpu_parity, capsys, "--device", "cuda", "--preset", "tiny")
    assert code == 2 and err.strip().count("\n") == 0 and "--device cuda" in err
    assert "Traceback" not in err


def test_unknown_stage_is_bad_usage(gpu_parity, capsys, tmp_path):
    out = tmp_path / "parity.json"
    code, err = run_in_process(gpu_parity, capsys, "--device", "cpu", "--preset", "tiny",
                               "--stages", "denoiser,bogus", "--json", out)
    assert code == 2 and not out.exists()
    assert err.strip().count("\n") == 0 and "bogus" in err and "Traceback" not in err


def test_bad_cfg_is_bad_usage(gpu_parity, capsys):
    code, err = run_in_process(gpu_parity, capsys, "--device", "cpu", "--cfg", "4.5,x")
    assert code == 2 and err.strip().count("\n") == 0 and "--cfg" in err


def test_a_model_directory_is_checked_without_exporting(tiny_model_dir, tmp_path):
    """--model: the directory's own fp32 and fp16 graphs against the components its manifest
    names (the tiny preset, seed 0, 2 s windows); nothing is exported."""
    out = tmp_path / "parity.json"
    result = run_script("--model", tiny_model_dir, "--device", "cpu", "--stages",
                        "denoiser,conditioner,mix_encoder", "--steps", 2, "--cfg", 4.5,
                        "--json", out, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exported" not in result.stdout
    report = json.loads(out.read_text())
    assert report["preset"] == "tiny" and report["passed"] is True
    for row in report["stages"]:
        assert row["fp32"]["worst"] < 1e-4 and 0 < row["fp16"]["worst"] < 1e-2
    [entry] = report["trajectory"]
    assert entry["error"] is None and entry["rel_l2"]["ort_fp32_vs_torch_fp32"] < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parity.json"]


def test_preset_and_model_together_are_bad_usage(gpu_parity, capsys, tmp_path):
    code, err = run_in_process(gpu_parity, capsys, "--device", "cpu", "--preset", "tiny",
                               "--model", tmp_path)
    assert code == 2 and "--preset or --model, not both" in err


def test_a_failing_stage_is_reported_in_its_row(gpu_parity, tmp_path):
    """An exception (here: no graph to load) fails that stage's row and is not raised."""
    from mmsep.stages import StageSpec, TensorSpec

    spec = StageSpec("vocoder", "x -> x", (TensorSpec("mel", "float32", ("batch", 3)),),
                     (TensorSpec("waveform", "float32", ("batch", 3)),))
    graphs = {"fp32": tmp_path / "vocoder.onnx", "fp16": tmp_path / "vocoder.fp16.onnx"}
    row, sessions = gpu_parity.check_stage(spec, torch.nn.Identity(), graphs, "cpu", 2, 0, None)
    assert row["passed"] is False and sessions == {}
    assert "vocoder.onnx" in row["error"] and "\n" not in row["error"]
    row, _ = gpu_parity.check_stage(spec, torch.nn.Identity(), graphs, "cpu", 2, 0, "boom")
    assert row == {"stage": "vocoder", "passed": False, "error": "boom"}


def test_helpers(gpu_parity):
    assert gpu_parity.finite({"a": [float("nan"), 1.0], "b": float("inf"), "c": "NaN"}) == \
        {"a": [None, 1.0], "b": None, "c": "NaN"}
    from benchmarks.drift import step_inputs

    inputs = step_inputs(("x", "mix_latent", "t", "dt", "cfg"),
                                    {"mix_latent": np.zeros((2, 1))}, np.ones((2, 1)), 0.5,
                                    0.25, 4.5)
    assert list(inputs) == ["x", "mix_latent", "t", "dt", "cfg"]
    np.testing.assert_array_equal(inputs["dt"], np.full(2, 0.25, np.float32))
    assert gpu_parity.parse_stages(" vocoder,denoiser,vocoder ") == ["vocoder", "denoiser"]
    assert gpu_parity.parse_stages(None) is None
    assert gpu_parity.parse_cfg("4.5, 1") == [4.5, 1.0]
