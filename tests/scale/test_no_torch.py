"""mmsep.scale never imports torch: every module imported and a whole mmsep-batch job run in a
process where torch is blocked and every attempt to import it is recorded."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.test_no_torch import BLOCKER
from tests.scale.conftest import write_jobs

REPO = Path(__file__).resolve().parents[2]

SCRIPT = BLOCKER + r"""
import mmsep.scale
modules = [m.name for m in pkgutil.iter_modules(mmsep.scale.__path__)]
for name in modules:
    importlib.import_module(f"mmsep.scale.{name}")
import ray.serve, ray.util  # what --ray and mmsep-serve load

from mmsep.scale.batch import main
run_and_report(main, modules=modules)
"""


def test_scale_runs_without_torch(model_dir, job_inputs, tmp_path):
    for module in ("ray.util", "ray.serve", "fastapi"):  # serve.py and --ray import them
        pytest.importorskip(module, reason="the ray extra is not installed")
    jobs = write_jobs(tmp_path / "j.jsonl", [
        {"mix": str(job_inputs["other"]), "text": "a tone", "steps": 1}])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(jobs), "--model", str(model_dir), "--out",
         str(tmp_path / "out"), "--backend", "ort-cpu", "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, proc.stderr
    assert report["attempts"] == [] and report["loaded"] == [] and report["forbidden"] == []
    assert {"batch", "jobs", "worker", "ray_batch", "serve", "service", "serve_cli"} <= \
        set(report["modules"])
    assert (tmp_path / "out" / "1_other_separated.wav").is_file()
