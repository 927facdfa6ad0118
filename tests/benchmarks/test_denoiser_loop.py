"""benchmarks/denoiser_loop.py on the tiny test model on the CPU: every variant, the JSON it
writes, agreement with the fp32 loop and bad usage. No timing is asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the FLOP floor is counted with torch")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "denoiser_loop.py"


def run_loop(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_every_variant_is_timed_and_agrees(tiny_model_dir, tmp_path):
    out = tmp_path / "loop.json"
    result = run_loop("--model", tiny_model_dir, "--backend", "ort-cpu", "--batch", "1,2",
                      "--steps", 3, "--repeats", 1, "--json", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["schema"] == "mmsep-denoiser-loop/1" and report["settings"]["device"] == "cpu"
    assert report["step_flops"] > 0 and report["matrix_tflops"] > 0
    rows = {(r["batch"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {(b, v) for b in (1, 2)
                         for v in ("fp32", "fp32 graphs", "fp16", "fp16 graphs")}
    for (batch, variant), row in rows.items():
        assert row["ms_per_loop"] > 0 and math.isclose(row["ms_per_step"] * 3, row["ms_per_loop"])
        assert row["ratio_to_floor"] > 0
        if variant.startswith("fp32"):  # the pinned loop is the plain one, uncaptured
            assert row["rel_l2_vs_fp32"] == 0.0
        else:
            assert 0 < row["rel_l2_vs_fp32"] < 1e-2
    assert len(result.stdout.strip().splitlines()) == 8


def test_bad_usage_exits_2(tiny_model_dir, tmp_path):
    result = run_loop("--model", tiny_model_dir, "--backend", "ort-cpu", "--batch", "0",
                      cwd=tmp_path)
    assert result.returncode == 2 and "--batch" in result.stderr
    result = run_loop("--model", tmp_path / "none", "--backend", "ort-cpu", cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr
