"""benchmarks/rtf.py in quick mode on the tiny test model: exit codes, JSON schema, table, and a
hand check of the FLOP counter. No timing is asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the benchmark's baseline needs torch")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "rtf.py"
STAGES = ("decode", "features", "mix_encode", "conditioning", "sampling", "vae_decode", "vocode")


def run_rtf(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _check_summary(entry):
    assert set(entry) == {"median", "p90"}
    assert _positive(entry["median"]) and _positive(entry["p90"])
    assert entry["p90"] >= entry["median"]


@pytest.fixture(scope="module")
def quick_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "out.json"
    result = run_rtf("--model", tiny_model_dir, "--backend", "ort-cpu", "--quick",
                     "--threads", "2", "--cache-dir", tmp / "cache", "--json", out, cwd=tmp)
    return result, out


def test_quick_run_writes_schema(quick_run, tiny_model_dir):
    result, out = quick_run
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["schema"] == "mmsep-benchmark/1"
    assert {"cpu", "cores", "gpu", "driver"} <= set(report["machine"])
    assert {"python", "numpy", "onnxruntime", "torch", "tensorrt", "mmsep"} <= \
        set(report["versions"])
    model = report["model"]
    assert model["preset"] == "tiny" and model["window_seconds"] == 2.0
    assert model["dir"] == str(tiny_model_dir) and model["graph_precisions"] == ["fp32", "fp16"]
    settings = report["settings"]
    assert (settings["repeats"], settings["warmup"], settings["steps"]) == (2, 1, 4)
    assert _positive(report["matrix_tflops"]["cpu_fp32"])
    flops = report["flops"]["model"]
    assert flops["denoiser_step"] > 0 and flops["clip_image"] > 0 and flops["clip_frames"] == 16

    [row] = report["results"]
    assert row["backend"] == "ort-cpu" and row["batch"] == 1 and row["duration"] == 2.0
    assert row["audio_seconds"] == row["batch"] * row["duration"]
    for name in ("candidate", "baseline"):
        side = row[name]
        assert set(side["stages"]) == set(STAGES)
        for entry in side["stages"].values():
            _check_summary(entry)
        _check_summary(side["end_to_end"])
        e2e = side["end_to_end"]["median"]
        assert side["rtf"] == pytest.approx(e2e / row["audio_seconds"])
        assert side["throughput"] == pytest.approx(row["audio_seconds"] / e2e)
        assert _positive(side["peak_rss_mb"]) and side["peak_gpu_mb"] is None
        denoiser = side["denoiser"]
        assert denoiser["flops"] == flops["denoiser_step"] * 4 * row["windows"] * row["batch"]
        assert denoiser["seconds"] == side["stages"]["sampling"]["median"]
    for key in (*STAGES, "end_to_end"):
        base = row["baseline"]["stages"].get(key, row["baseline"]["end_to_end"])
        cand = row["candidate"]["stages"].get(key, row["candidate"]["end_to_end"])
        assert row["speedup"][key] == pytest.approx(base["median"] / cand["median"])
    # same weights, inputs and noise in both pipelines: the same audio
    assert 0 <= row["output_rel_l2"] < 1e-3
    clip = report["clip_image"]["ort-cpu"]
    assert clip["speedup"] == pytest.approx(clip["baseline"]["median"] /
                                            clip["candidate"]["median"])


def test_quick_run_prints_table(quick_run):
    result, _ = quick_run
    assert "ort-cpu (fp32) vs baseline torch (fp32)" in result.stdout
    for key in (*STAGES, "end_to_end"):
        assert key in result.stdout


def test_missing_model_dir(tmp_path):
    out = tmp_path / "out.json"
    result = run_rtf("--model", tmp_path / "nope", "--quick", "--json", out, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.parametrize("durations", ["8,abc", "0.2", "nan"])
def test_bad_durations(tmp_path, durations):
    result = run_rtf("--model", tmp_path, "--durations", durations, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--durations" in result.stderr


def test_flop_counter_by_hand():
    from benchmarks.flops import count_flops

    linear = torch.nn.Linear(48, 80)
    assert count_flops(linear, torch.zeros(6, 48)) == 2 * 6 * 48 * 80
    b, h, length, kv, d = 2, 3, 17, 11, 8
    q, k, v = torch.zeros(b, h, length, d), torch.zeros(b, h, kv, d), torch.zeros(b, h, kv, d)
    attention = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(attention, q, k, v) == 2 * (2 * b * h * length * kv * d)


def test_flops_on_meta_equal_flops_on_cpu():
    from benchmarks.flops import config_flops, denoiser_step_flops
    from mmsep.models.flow import build

    net = build("tiny", separation=True, duration=2.0, seed=0)
    counted = config_flops(net.config, tiny_clip=True)
    assert counted["denoiser_step"] == denoiser_step_flops(net)


@pytest.mark.parametrize("backend", ["auto", "ort-cpu"])
def test_onnx_runtime_batches_what_was_asked_however_it_is_named(backend, tiny_model_dir):
    """BENCHMARKS: batched up to max(--batch, the manifest's max_batch) on ONNX Runtime, also
    when ``auto`` chose it."""
    from benchmarks import rtf
    from mmsep.runtime.model_dir import ModelDir

    info = ModelDir(tiny_model_dir, verify=False).info
    options = {"batches": [info.max_batch + 3], "threads": 1}
    candidate = rtf._candidate(tiny_model_dir, backend, options, info, False, [], print)
    try:
        assert candidate.name == "ort-cpu" and candidate.sep.max_batch == info.max_batch + 3
    finally:
        candidate.close()


def test_an_unavailable_backend_later_in_the_list_is_refused_before_measuring(tiny_model_dir,
                                                                              tmp_path):
    """BENCHMARKS: a GPU backend on a machine without one is refused before measuring, also
    when it follows a backend that can run (whose results would otherwise be thrown away)."""
    from mmsep.runtime.backends.ort import cuda_available

    if cuda_available():
        pytest.skip("ONNX Runtime's CUDA provider is usable here")
    out = tmp_path / "out.json"
    result = run_rtf("--model", tiny_model_dir, "--backend", "ort-cpu,ort-cuda", "--quick",
                     "--no-video", "--repeats", "1", "--warmup", "0", "--cache-dir",
                     tmp_path / "cache", "--json", out, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "ort-cuda" in result.stderr or "CUDA" in result.stderr
    assert "measuring" not in result.stderr and "run 1/1" not in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_skip_unavailable_records_the_backend_and_measures_the_rest(tiny_model_dir, tmp_path):
    from mmsep.runtime.backends.ort import cuda_available

    if cuda_available():
        pytest.skip("ONNX Runtime's CUDA provider is usable here")
    out = tmp_path / "out.json"
    result = run_rtf("--model", tiny_model_dir, "--backend", "ort-cuda,ort-cpu", "--quick",
                     "--no-video", "--repeats", "1", "--warmup", "0", "--skip-unavailable",
                     "--flops-presets", "tiny", "--cache-dir", tmp_path / "cache", "--json", out,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [s["backend"] for s in report["skipped"]] == ["ort-cuda"]
    assert [r["backend"] for r in report["results"]] == ["ort-cpu"]
    assert "skipped backend ort-cuda" in result.stdout


class _FakeCandidate:
    def __init__(self, name):
        self.name, self.closed = name, False

    def close(self):
        self.closed = True


def _fake_candidates(monkeypatch, unavailable=(), failing=()):
    from benchmarks import rtf

    made = {}

    def candidate(model_dir, backend, o, info, skip_unavailable, skipped, log):
        if backend in failing:
            raise rtf.BenchError(f"{backend} cannot run")
        if backend in unavailable:
            skipped.append({"backend": backend, "reason": "not here"})
            return None
        made.setdefault(backend, []).append(_FakeCandidate(backend))
        return made[backend][-1]

    monkeypatch.setattr(rtf, "_candidate", candidate)
    return rtf, made


def test_backends_are_started_up_front_and_only_the_first_stays_open(monkeypatch):
    rtf, made = _fake_candidates(monkeypatch, unavailable=("b",))
    skipped = []
    runnable = rtf._runnable("dir", {"backends": ["a", "b", "c"]}, None, True, skipped,
                             lambda msg: None)
    assert [name for name, _ in runnable] == ["a", "c"]
    assert runnable[0][1] is made["a"][0] and not made["a"][0].closed
    assert runnable[1][1] is None and made["c"][0].closed
    assert skipped == [{"backend": "b", "reason": "not here"}]


def test_a_backend_that_cannot_start_closes_the_one_kept_open(monkeypatch):
    rtf, made = _fake_candidates(monkeypatch, failing=("c",))
    with pytest.raises(rtf.BenchError):
        rtf._runnable("dir", {"backends": ["a", "c"]}, None, False, [], lambda msg: None)
    assert made["a"][0].closed
