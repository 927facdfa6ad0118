"""ONNX Runtime stage graphs (fp32, fp16 mixed precision) against PyTorch fp32 on one device, and
a whole sampling trajectory's reduced-precision drift next to the PyTorch reference's own.

    python benchmarks/gpu_parity.py --preset large_44k_v2 --device cuda --json gpu_parity.json
    python benchmarks/gpu_parity.py --model models/large_44k_v2 --device cuda --json parity.json

``--preset`` builds random components and exports the stages it checks; ``--model`` checks the
graphs of a directory written by mmsep-export (with its fp16 copies) against the components its
manifest names (benchmarks/models.py), exporting nothing.

Per stage (random weights): relative L2 per output at --batch, gated at the stage's bounds, and
median milliseconds per run. Per --cfg, with the denoiser checked: the final latents of every
TRAJECTORIES variant and their decoded waveforms' SI-SDR, not gated (random weights amplify
rounding). Exit 0 when every gated check passes, 1 when one fails, 2 on bad usage.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.json_out import json_option, write_json  # noqa: E402
from benchmarks import machine  # noqa: E402
from benchmarks.drift import TRAJECTORIES, one_line, print_trajectory, sample_all, say  # noqa: E402
from mmsep.exit_codes import EXIT_INTERNAL, EXIT_OK  # noqa: E402
from mmsep.export.example_inputs import example_inputs  # noqa: E402
from mmsep.export.mixed_precision import convert_graph  # noqa: E402
from mmsep.export.onnx_graph import check_graph, export_onnx  # noqa: E402
from mmsep.export.parity import cuda_missing, onnxruntime_session, relative_l2  # noqa: E402
from mmsep.export.wrappers import stage_modules, stage_specs  # noqa: E402
from mmsep.models.components import build_components  # noqa: E402
from mmsep.runtime.backends.ort import preload_cuda_libraries  # noqa: E402
from mmsep.console import console_main  # noqa: E402
from mmsep.stages import STAGE_ORDER, Stage  # noqa: E402

SCHEMA = "mmsep-gpu-parity/1"
RUNS = {"cuda": (2, 5), "cpu": (1, 1)}  # (warm-up, timed) calls per timing (cpu: a logic check)


@click.command(help=__doc__.split("\n\n")[0],
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default=None,
              help="Flow preset built with random weights (tiny, small_44k, large_44k_v2, ...) "
                   "[default: large_44k_v2 without --model].")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Check this model directory's graphs instead of exporting a preset.")
@click.option("--device", type=click.Choice(("auto", "cuda", "cpu")), default="auto",
              show_default=True,
              help="cuda: torch CUDA and ONNX Runtime's CUDA provider; cpu: a logic check; "
                   "auto: cuda when both are there, else cpu.")
@click.option("--stages", help="Comma-separated stages to check [default: all the preset's].")
@click.option("--batch", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Batch of the stage inputs and of the trajectories.")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True,
              help="Euler steps of each trajectory.")
@click.option("--cfg", "cfg_text", default="4.5,1", show_default=True,
              help="Comma-separated guidance strengths, one trajectory each.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the example inputs and of the initial noise.")
@click.option("--duration", type=click.FloatRange(2, 30), default=8.0, show_default=True,
              help="Window seconds of the random components (the models are trained on 8).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the graphs here [default: a temporary directory].")
@json_option("Write the results as JSON to this file.")
def cli(preset, model_dir, device, stages, batch, steps, cfg_text, seed, duration, workdir,
        json_path):
    if model_dir is not None and preset is not None:
        raise click.UsageError("give --preset or --model, not both")
    source = {"preset": preset or "large_44k_v2"} if model_dir is None else {"model": model_dir}
    settings = {"source": source, "device": resolve_device(device), "names": parse_stages(stages),
                "batch": batch, "steps": steps, "cfgs": parse_cfg(cfg_text), "seed": seed,
                "duration": duration, "json_path": json_path}
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return run(workdir=workdir, **settings)
    with tempfile.TemporaryDirectory(prefix="mmsep-gpu-parity-") as tmp:
        return run(workdir=Path(tmp), **settings)


def main(argv: list[str] | None = None) -> None:
    console_main(cli, "gpu_parity.py", argv, interrupted="interrupted")


def resolve_device(choice: str) -> str:
    missing = [] if choice == "cpu" else cuda_missing()
    if choice == "cuda" and missing:
        raise click.UsageError(f"--device cuda: {'; '.join(missing)}")
    if choice == "auto" and missing:
        say(f"note: {'; '.join(missing)}: running on the CPU - a logic check, not a GPU result")
    return choice if choice != "auto" else "cpu" if missing else "cuda"


def parse_cfg(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise click.BadParameter(f"expected numbers >= 0, got {text!r}", param_hint="--cfg")
    return values


def parse_stages(text: str | None) -> list[str] | None:
    """The requested stages, in the given order (None: every stage of the preset)."""
    names = list(dict.fromkeys(s.strip() for s in (text or "").split(",") if s.strip()))
    unknown = [n for n in names if n not in STAGE_ORDER]
    if unknown or (text is not None and not names):
        raise click.BadParameter(f"unknown stage(s) {', '.join(unknown) or repr(text)}; "
                                 f"choose from {', '.join(STAGE_ORDER)}", param_hint="--stages")
    return names or None


def run(*, source, device, names, batch, steps, cfgs, seed, duration, json_path, workdir) -> int:
    torch.set_grad_enabled(False)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
        torch.backends.cudnn.allow_tf32 = False
        preload_cuda_libraries()
    started = time.perf_counter()
    if "model" in source:
        components, specs, modules, names, graphs = from_model(source["model"], names)
        export_errors, preset = {}, components.flow.config.name
    else:
        preset = source["preset"]
        components, specs, modules, names = build(preset, names, batch, duration)
        export_errors = export(names, specs, modules, workdir)
        graphs = {name: {"fp32": workdir / f"{name}.onnx", "fp16": workdir / f"{name}.fp16.onnx"}
                  for name in names}
    for module in modules.values():  # after the export, which traces on the CPU
        module.to(device).eval()
    rows, trajectory, denoiser_sessions = [], [], None
    for name in names:
        say(f"{name}: checking at batch {batch} on {device}")
        row, sessions = check_stage(specs[name], modules[name], graphs[name], device, batch,
                                    seed, export_errors.get(name))
        rows.append(row)
        print_row(row)
        if name == Stage.DENOISER and row["error"] is None:
            denoiser_sessions = sessions
    for cfg in cfgs if denoiser_sessions else ():
        trajectory.append(sample_all(components, specs, modules, denoiser_sessions, device,
                                     batch, seed, steps, cfg))
        print_trajectory(trajectory[-1])
    passed = bool(rows) and all(r["passed"] for r in rows)
    say(f"{'all checks passed' if passed else 'FAILED'} in {time.perf_counter() - started:.0f} s")
    if json_path is not None:
        versions = {**machine.versions(), "onnxruntime_providers": ort.get_available_providers(),
                    "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
        report = {"schema": SCHEMA, "preset": preset, "device": device, "batch": batch,
                  "steps": steps, "duration": duration, "machine": machine.machine_info(),
                  "versions": versions, "stages": rows,
                  "trajectory_variants": TRAJECTORIES, "trajectory": trajectory, "passed": passed}
        write_json(json_path, finite(report))
        say(f"wrote {json_path}")
    return EXIT_OK if passed else EXIT_INTERNAL


def build(preset: str, names: list[str] | None, batch: int, duration: float):
    """Random components of ``preset``, their stage specs and modules, and the stages to check."""
    say(f"building random {preset} components ({duration:g} s windows)")
    try:
        components = build_components(preset, duration=duration, seed=0)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--preset") from None
    specs = stage_specs(components, max_batch=max(batch, 4))  # a separation model: every stage
    return components, specs, stage_modules(components), names or list(specs)


def from_model(model_dir: Path, names: list[str] | None):
    """A model directory's components (its manifest's sources), stage specs and modules (its
    geometry: the mixture-latent convention too), the stages to check and their graphs."""
    from benchmarks.models import WeightsError, components_for
    from mmsep.export.wrappers import build_stage_modules
    from mmsep.runtime.errors import InputError
    from mmsep.runtime.model_dir import ModelDir
    from mmsep.stages import Geometry

    try:
        model = ModelDir(model_dir, verify=False)
        if not model.has_precision("fp16"):
            raise InputError(f"{model_dir} has no fp16 graphs (export it with --precision fp16)")
        say(f"loading the components {model_dir}'s manifest names")
        components = components_for(model.manifest)
    except (InputError, WeightsError) as exc:
        raise click.UsageError(str(exc)) from None
    names = names or list(model.specs)
    missing = [n for n in names if n not in model.specs]
    if missing:
        raise click.BadParameter(f"{model_dir} has no stage {', '.join(missing)}",
                                 param_hint="--stages")
    modules = build_stage_modules(components, Geometry.from_json(model.manifest["geometry"]))
    graphs = {n: {p: model.onnx_path(n, p) for p in ("fp32", "fp16")} for n in names}
    return components, model.specs, modules, names, graphs


def export(names, specs, modules, workdir: Path) -> dict[str, str]:
    """fp32 and fp16 graphs in ``workdir`` (no parity here); returns each failed stage's error."""
    errors = {}
    for name in names:
        started = time.perf_counter()
        try:
            path = export_onnx(modules[name], specs[name], workdir / f"{name}.onnx")
            check_graph(path, specs[name])
            convert_graph(path, workdir / f"{name}.fp16.onnx", specs[name], "fp16")
            say(f"{name}: exported fp32 and fp16 in {time.perf_counter() - started:.0f} s")
        except Exception as exc:  # noqa: BLE001 - reported in the stage's row; the others go on
            errors[name] = one_line(exc)
            say(f"{name}: export failed: {errors[name]}")
    return errors


def timed(call, device: str):
    """Median milliseconds of ``call`` after warm-up calls, and its last result."""
    warm, runs = RUNS[device]
    times = []
    for _ in range(warm + runs):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times[warm:]), result


def check_stage(spec, module, graphs: dict[str, Path], device: str, batch: int, seed: int,
                error):
    """One stage's row and ORT sessions; timed calls take and return host arrays (both sides)."""
    row, sessions = {"stage": spec.name, "passed": False, "error": error}, {}
    if error is not None:
        return row, sessions

    def torch_call():
        out = module(*(torch.from_numpy(v).to(device) for v in feeds.values()))
        return [o.float().cpu().numpy() for o in (out if isinstance(out, tuple) else (out,))]

    try:
        feeds = {k: v.numpy() for k, v in example_inputs(spec, batch, seed).items()}
        ms, reference = timed(torch_call, device)
        row["ms"] = {"torch_fp32": ms}
        for precision, bound in (("fp32", spec.onnx_tolerance),
                                 ("fp16", spec.reduced_precision_tolerance)):
            sess = sessions[precision] = onnxruntime_session(graphs[precision], spec, device,
                                                             precision)
            row["ms"][f"ort_{precision}"], got = timed(lambda s=sess: s.run(None, feeds), device)
            errors = {n: relative_l2(g, r) for n, g, r in zip(spec.output_names, got, reference)}
            worst = max(errors.values())
            row[precision] = {"rel_l2": errors, "worst": worst, "bound": bound,
                              "passed": worst <= bound}
        row["provider"] = sessions["fp32"].get_providers()[0]
        row["passed"] = row["fp32"]["passed"] and row["fp16"]["passed"]
    except Exception as exc:  # noqa: BLE001 - report every stage, then fail
        row["error"] = one_line(exc)
    return row, sessions


def print_row(row: dict) -> None:
    if row["error"]:
        say(f"{row['stage']:<12} ERROR {row['error']}")
        return
    fp32, fp16, ms = row["fp32"], row["fp16"], row["ms"]
    say(f"{row['stage']:<12} rel L2 fp32 {fp32['worst']:.2e} (<= {fp32['bound']:.0e})  "
        f"fp16 {fp16['worst']:.2e} (<= {fp16['bound']:.0e})  ms: torch fp32 "
        f"{ms['torch_fp32']:.2f}, ort fp32 {ms['ort_fp32']:.2f}, ort fp16 {ms['ort_fp16']:.2f}  "
        f"{'ok' if row['passed'] else 'FAIL'}")


def finite(value):
    """JSON has no inf or nan: they become null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value



if __name__ == "__main__":
    main()
