"""The denoiser loop alone on ONNX Runtime: fp16 and fp32 graphs, CUDA graphs on and off.

    python benchmarks/denoiser_loop.py --model models/ft --backend ort-cuda --json loop.json

Every variant (precision x graphs) runs the same random request (x0, mixture latent, both
branches' conditioning) at each batch size: two warm-up loops (ONNX Runtime captures a CUDA graph
on a graph id's third run), then ``--repeats`` rounds in which the variants take turns, so that
the machine's drift hits them alike. Reported per variant and batch: median and p90 seconds per
loop, milliseconds per step, the agreement of its result with the fp32 plain loop (relative L2),
and the ratio of the median to the FLOP floor: the loop's FLOPs (benchmarks/flops.py, both CFG
branches of every window) at the measured matrix throughput (fp16 on a GPU, fp32 on a CPU).
On a CPU (``--backend ort-cpu``) the graphs variant is the same pinned loop, uncaptured.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.json_out import json_option, write_json  # noqa: E402
from benchmarks import machine  # noqa: E402
from benchmarks.pairwise import denoiser_efficiency  # noqa: E402

SCHEMA = "mmsep-denoiser-loop/1"
WARMUP = 2  # with the capture on each graph id's third run, the second warm-up loop replays


# the options this script shares with denoiser_profile.py
model_option = click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
                            help="Model directory written by mmsep-export.")
backend_option = click.option("--backend", type=click.Choice(["ort-cuda", "ort-cpu"]),
                              default="ort-cuda", show_default=True,
                              help="ONNX Runtime on CUDA, or on the CPU (a logic check).")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_option
@backend_option
@click.option("--batch", "batches", default="1,4", show_default=True,
              help="Comma-separated batch sizes (windows per loop).")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True,
              help="Euler steps per loop.")
@click.option("--cfg", type=float, default=4.5, show_default=True, help="Guidance strength.")
@click.option("--repeats", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="Timed rounds per variant and batch, after the warm-up.")
@json_option("Write the results here as JSON.")
def main(model_dir, backend, batches, steps, cfg, repeats, json_path):
    """Time the denoiser loop of an exported model on ONNX Runtime, variant by variant."""
    try:
        sizes = [int(b) for b in batches.split(",") if b.strip()]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected positive integers, got {batches!r}",
                                 param_hint="--batch") from None
    model = open_model(model_dir)
    device = backend_device(backend)
    report = measure(model, device, sizes, steps, cfg, repeats)
    for row in report["results"]:
        click.echo(f"batch {row['batch']}  {row['variant']:<14} {row['ms_per_loop']:8.1f} ms/loop"
                   f"  {row['ms_per_step']:6.2f} ms/step  x{row['ratio_to_floor'] or 0:.1f} floor"
                   f"  rel L2 vs fp32 {row['rel_l2_vs_fp32']:.1e}")
    if json_path:
        write_json(json_path, report)


def backend_device(backend: str) -> str:
    """ONNX Runtime's device for ``backend``; bad usage (exit 2) where it cannot run here."""
    from mmsep.runtime.backends.ort import cuda_refusal

    device = backend.removeprefix("ort-")
    refusal = cuda_refusal() if device == "cuda" else None
    if refusal:
        raise click.UsageError(f"--backend {backend}: {refusal}")
    return device


def open_model(model_dir: Path, precision: str | None = None):
    """The model directory (unverified: a benchmark), with graphs of ``precision`` when given;
    bad usage (exit 2) otherwise."""
    from mmsep.runtime.errors import InputError
    from mmsep.runtime.model_dir import ModelDir

    try:
        model = ModelDir(model_dir, verify=False)
        if precision is not None and not model.has_precision(precision):
            raise InputError(f"{model_dir} has no {precision} graphs")
    except InputError as exc:
        raise click.UsageError(str(exc)) from None
    return model




def variants(model, device: str) -> list[tuple[str, bool]]:
    """(precision, graphs) pairs this model and device can run; fp32 plain first (the
    reference of the agreement column)."""
    precisions = ["fp32"] + (["fp16"] if model.has_precision("fp16") else [])
    return [(p, g) for p in precisions for g in (False, True)]


def random_request(model, batch: int, seed: int = 0):
    from mmsep.stages import Stage

    spec = model.specs[Stage.DENOISER]
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(spec.tensor("x").concrete(batch), np.float32)
    mix = rng.standard_normal(x0.shape, np.float32) if "mix_latent" in spec.input_names else None
    conditioning = {t.name: rng.standard_normal(t.concrete(batch), np.float32)
                    for t in spec.inputs if t.name.startswith("cond_")}
    return x0, mix, conditioning


def measure(model, device: str, sizes: list[int], steps: int, cfg: float, repeats: int) -> dict:
    from mmsep.runtime.backends import OrtBackend

    floor = _floor_inputs(model, device)
    backends = {v: OrtBackend(model, device, precision=v[0], cuda_graphs=v[1])
                for v in variants(model, device)}
    rows = []
    try:
        for batch in sizes:
            x0, mix, conditioning = random_request(model, batch)
            results, times = {}, {v: [] for v in backends}
            for r in range(WARMUP + repeats):
                for v, backend in backends.items():
                    started = time.perf_counter()
                    results[v] = backend.to_host(backend.sample(x0, mix, conditioning, steps, cfg))
                    if r >= WARMUP:
                        times[v].append(time.perf_counter() - started)
            reference = results[("fp32", False)]
            rows += [_row(v, batch, steps, times[v], results[v], reference, floor)
                     for v in backends]
    finally:
        for backend in backends.values():
            backend.close()
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine.machine_info(), "versions": machine.versions(),
            "model": {"dir": str(model.path), "preset": model.info.preset},
            "settings": {"device": device, "steps": steps, "cfg": cfg, "repeats": repeats,
                         "warmup": WARMUP},
            "matrix_tflops": floor["tflops"], "step_flops": floor["step_flops"],
            "results": rows}


def _floor_inputs(model, device: str) -> dict:
    from benchmarks.flops import preset_flops

    step = preset_flops([model.info.preset], model.info.window_seconds)[model.info.preset]
    kind = ("cuda", "float16") if device == "cuda" else ("cpu", "float32")
    return {"step_flops": step["denoiser_step"], "tflops": machine.matrix_tflops(*kind)}


def _row(variant, batch, steps, times, result, reference, floor) -> dict:
    from mmsep.export.parity import relative_l2

    median = statistics.median(times)
    efficiency = denoiser_efficiency(floor["step_flops"], steps, batch, median, floor["tflops"])
    return {"variant": f"{variant[0]}{' graphs' if variant[1] else ''}",
            "precision": variant[0], "cuda_graphs": variant[1], "batch": batch,
            "seconds": {"median": median, "p90": float(np.percentile(times, 90))},
            "ms_per_loop": median * 1e3, "ms_per_step": median * 1e3 / steps,
            "ratio_to_floor": efficiency["ratio_to_floor"], "tflops": efficiency["tflops"],
            "rel_l2_vs_fp32": relative_l2(result, reference)}


if __name__ == "__main__":
    main()
