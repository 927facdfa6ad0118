"""Where a denoiser step's time goes on ONNX Runtime: its own profiler over one sampling loop.

    python benchmarks/denoiser_profile.py --model models/ft --backend ort-cuda --json prof.json

One session of the denoiser graph (``--precision``, fp16 by default) with ONNX Runtime's profiler
on runs the loop step by step (host arrays in and out, no CUDA graph: the profiler sees each
node), after ``--warmup`` unprofiled-in-effect loops. From the profile, per step: the wall time of
``run`` (``model_run``), the host time spent in the nodes' compute calls (on CUDA that is mostly
kernel launching: the kernels run asynchronously), the number of nodes run (a lower bound on the
kernel launches), and the ten op types that take most of it. This is what the GPU issue asks for
where the loop misses its figure: launches per step and host time, beside benchmarks/
denoiser_loop.py's end-to-end timings.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.json_out import json_option, write_json  # noqa: E402
from benchmarks import machine  # noqa: E402
from benchmarks.denoiser_loop import (  # noqa: E402
    backend_device, backend_option, model_option, open_model, random_request)

SCHEMA = "mmsep-denoiser-profile/1"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@backend_option
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16",
              show_default=True, help="Which of the model's denoiser graphs.")
@click.option("--batch", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True)
@click.option("--warmup", type=click.IntRange(0, 100), default=1, show_default=True,
              help="Loops run before the profiled one (their events are left out).")
@json_option("Write the summary here as JSON.")
def main(model_dir, backend, precision, batch, steps, warmup, json_path):
    """Profile one denoiser loop of an exported model with ONNX Runtime's profiler."""
    model = open_model(model_dir, precision)
    device = backend_device(backend)
    summary = profile(model, device, precision, batch, steps, warmup)
    print_summary(summary)
    if json_path:
        report = {"schema": SCHEMA, "machine": machine.machine_info(),
                  "versions": machine.versions(), "model": {"dir": str(model.path),
                                                            "preset": model.info.preset},
                  **summary}
        write_json(json_path, report)


def profile(model, device: str, precision: str, batch: int, steps: int, warmup: int) -> dict:
    """Run ``warmup`` + 1 loops in one profiled session; summarise the last loop's events."""
    from mmsep.export.parity import onnxruntime_session
    from mmsep.stages import Stage, Tensor, euler_schedule

    spec = model.specs[Stage.DENOISER]
    x0, mix, conditioning = random_request(model, batch)
    times, dt = euler_schedule(steps)
    fixed = {**conditioning, Tensor.DT: np.full(batch, dt, np.float32),
             Tensor.CFG: np.full(batch, 4.5, np.float32)}
    if mix is not None:
        fixed[Tensor.MIX_LATENT] = mix
    with tempfile.TemporaryDirectory(prefix="mmsep-profile-") as tmp:
        session = onnxruntime_session(model.onnx_path(Stage.DENOISER, precision), spec, device,
                                      precision, configure=_profiling(Path(tmp)))
        for _ in range(warmup + 1):
            x = x0
            for t in times:
                (x,) = session.run([Tensor.X_NEXT], {**fixed, Tensor.X: x,
                                                     Tensor.T: np.full(batch, t, np.float32)})
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last = runs[-steps:]
    start, end = last[0]["ts"], last[-1]["ts"] + last[-1]["dur"]
    nodes = [e for e in events if e.get("cat") == "Node" and start <= e["ts"] <= end
             and e.get("name", "").endswith("_kernel_time")]
    return {"device": device, "precision": precision, "batch": batch, "steps": steps,
            "provider": session.get_providers()[0], **summarise(last, nodes, steps)}


def _profiling(directory: Path):
    def configure(options):
        options.enable_profiling = True
        options.profile_file_prefix = os.fspath(directory / "denoiser")
    return configure


def summarise(runs: list[dict], nodes: list[dict], steps: int) -> dict:
    """Per step: ``run`` wall time, host time in node compute calls, nodes run; the op types
    by host time."""
    by_op = defaultdict(lambda: {"count": 0, "us": 0})
    for event in nodes:
        op = event.get("args", {}).get("op_name", "?")
        by_op[op]["count"] += 1
        by_op[op]["us"] += event["dur"]
    top = sorted(by_op.items(), key=lambda item: -item[1]["us"])[:10]
    return {"ms_per_step": sum(r["dur"] for r in runs) / 1e3 / steps,
            "host_ms_per_step": sum(e["dur"] for e in nodes) / 1e3 / steps,
            "nodes_per_step": len(nodes) / steps,
            "top_ops": [{"op": op, "nodes_per_step": v["count"] / steps,
                         "host_ms_per_step": v["us"] / 1e3 / steps} for op, v in top]}


def print_summary(summary: dict) -> None:
    click.echo(f"denoiser {summary['precision']} on {summary['provider']}, batch "
               f"{summary['batch']}: {summary['ms_per_step']:.2f} ms per step (run), "
               f"{summary['host_ms_per_step']:.2f} ms in node compute calls, "
               f"{summary['nodes_per_step']:.0f} nodes per step")
    for row in summary["top_ops"]:
        click.echo(f"  {row['op']:<24} {row['nodes_per_step']:6.0f} nodes  "
                   f"{row['host_ms_per_step']:8.3f} ms")


if __name__ == "__main__":
    main()
