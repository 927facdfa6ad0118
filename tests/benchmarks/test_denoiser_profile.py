"""benchmarks/denoiser_profile.py on the tiny test model on the CPU: the profiled loop's node
count against ONNX Runtime's own optimised graph, the summary's arithmetic, the JSON, bad usage.
No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import onnx

from mmsep.export.parity import onnxruntime_session
from mmsep.runtime.model_dir import ModelDir
from tests.helpers import without_fp16_copies

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "denoiser_profile.py"


def run_profile(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def optimised_nodes(model_dir: Path, precision: str, tmp_path: Path) -> int:
    """Nodes of the denoiser graph as ONNX Runtime optimises it (each runs once per step)."""
    model = ModelDir(model_dir, verify=False)
    saved = tmp_path / f"optimised-{precision}.onnx"

    def save(options):
        options.optimized_model_filepath = str(saved)

    onnxruntime_session(model.onnx_path("denoiser", precision), model.specs["denoiser"], "cpu",
                        precision, configure=save)
    return len(onnx.load(str(saved), load_external_data=False).graph.node)


def test_one_loop_is_profiled_step_by_step(tiny_model_dir, tmp_path):
    out = tmp_path / "profile.json"
    result = run_profile("--model", tiny_model_dir, "--backend", "ort-cpu", "--steps", 3,
                         "--warmup", 1, "--json", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["schema"] == "mmsep-denoiser-profile/1"
    assert report["provider"] == "CPUExecutionProvider" and report["precision"] == "fp16"
    # the warm-up loop's events are left out: every node of the optimised graph, once per step
    assert report["nodes_per_step"] == optimised_nodes(tiny_model_dir, "fp16", tmp_path)
    assert 0 < report["host_ms_per_step"] <= report["ms_per_step"]
    top = report["top_ops"]
    assert 0 < len(top) <= 10 and {"MatMul", "Cast"} <= {row["op"] for row in top}
    assert [r["host_ms_per_step"] for r in top] == sorted(
        (r["host_ms_per_step"] for r in top), reverse=True)
    assert sum(r["nodes_per_step"] for r in top) <= report["nodes_per_step"]
    assert result.stdout.startswith("denoiser fp16 on CPUExecutionProvider, batch 1: ")


def test_fp32_graph_and_bad_usage(tiny_model_dir, tmp_path):
    result = run_profile("--model", tiny_model_dir, "--backend", "ort-cpu", "--precision",
                         "fp32", "--steps", 2, "--warmup", 0, "--json", tmp_path / "p.json",
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["nodes_per_step"] == optimised_nodes(tiny_model_dir, "fp32", tmp_path)
    bare = without_fp16_copies(tiny_model_dir, tmp_path / "bare")
    refused = run_profile("--model", bare, "--backend", "ort-cpu", cwd=tmp_path)
    assert refused.returncode == 2 and "has no fp16 graphs" in refused.stderr
    missing = run_profile("--model", tmp_path / "nothing", "--backend", "ort-cpu", cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
