"""GPU check of the export chain on random weights: ONNX fp32, reduced-precision ONNX, engines.

    python -m mmsep.export.gpu_check --preset tiny [--precision fp16] [--stages denoiser,vocoder]

Builds random components of the preset, exports the stage graphs into a temporary directory
(mmsep.export.exporter.export_model, or only the named stages), writes the reduced-precision
graphs, builds TensorRT engines and prints one parity row per stage: relative L2 against the
PyTorch fp32 module of the ONNX fp32 graph, the reduced-precision graph (both on ONNX Runtime
CUDA where onnxruntime-gpu is installed, else its CPU provider) and the engine (GPU), with the
bound; and a row for each frame-resize engine (grey levels from the host's resize). Exit status
(``mmsep.exit_codes``): 0 when every check passes, 1 when one fails or TensorRT / a CUDA GPU is
missing (the reason is printed), 2 on bad usage, 130 interrupted.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from ..exit_codes import EXIT_INTERNAL, EXIT_OK

PROG = "python -m mmsep.export.gpu_check"


@click.command(help=__doc__.split("\n\n")[0],
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="tiny",
              help="flow preset with random weights (tiny, small_44k, large_44k_v2, ...)")
@click.option("--precision", default="fp16", type=click.Choice(("fp16", "bf16", "fp32")),
              help="engine precision (fp32 builds from the fp32 graphs)")
@click.option("--stages", default=None, help="comma-separated stages to check (default: all)")
@click.option("--max-batch", type=int, default=4, help="largest batch of the profiles")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="keep graphs and engines here instead of a temporary directory")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="also write the results as JSON")
def cli(preset: str, precision: str, stages: str | None, max_batch: int, workdir: Path | None,
        json_path: Path | None) -> int:
    from .tensorrt_build import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        click.echo(f"{PROG}: cannot run: {reason}", err=True)
        return EXIT_INTERNAL
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return _run(preset, precision, stages, max_batch, workdir, json_path)
    with tempfile.TemporaryDirectory(prefix="mmsep-gpu-check-") as tmp:
        return _run(preset, precision, stages, max_batch, Path(tmp), json_path)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit codes from ``mmsep.exit_codes``, one-line errors."""
    from ..console import console_main

    console_main(cli, PROG, argv, interrupted="interrupted")


def _run(preset: str, precision: str, stages: str | None, max_batch: int, workdir: Path,
         json_path: Path | None) -> int:
    import torch

    from .parity import resolve_parity_device
    from .tensorrt_build import engine_info

    torch.set_grad_enabled(False)
    device = resolve_parity_device("auto")
    started = time.perf_counter()
    components, specs, modules, names = _stages(preset, stages, max_batch)
    info = engine_info()
    click.echo(f"preset {preset}, {precision}, TensorRT {info['version']} on {info['gpu']} "
               f"(sm {info['compute_capability']})")
    onnx_parity = _export(components, specs, modules, names, workdir / "model", max_batch,
                          device)
    rows = []
    for name in names:
        row = _check_stage(name, specs[name], modules[name], onnx_parity[name], precision,
                           workdir, device)
        rows.append(row)
        _print_row(row)
    for yuv in (False, True):
        rows.append(_check_frame_resize(workdir, info, yuv))
        _print_row(rows[-1])
    ok = all(r["passed"] for r in rows)
    click.echo(f"{'all checks passed' if ok else 'FAILED'} in "
               f"{time.perf_counter() - started:.0f} s")
    if json_path:
        from ..runtime.atomic import write_json_atomically

        report = {"preset": preset, "precision": precision, "tensorrt": info, "stages": rows}
        write_json_atomically(json_path, report)
    return EXIT_OK if ok else EXIT_INTERNAL


def _stages(preset: str, stages: str | None, max_batch: int):
    """The preset's random components, stage specs and modules, and the stages to check."""
    from ..models.components import build_components
    from .wrappers import stage_modules, stage_specs

    try:
        components = build_components(preset, seed=0)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--preset") from None
    specs = stage_specs(components, max_batch=max_batch)
    names = list(specs) if not stages else [s.strip() for s in stages.split(",")]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise click.BadParameter(f"unknown stage(s) {', '.join(unknown)}; this preset has "
                                 f"{', '.join(specs)}", param_hint="--stages")
    return components, specs, stage_modules(components), names


def _check_stage(name: str, spec, module, onnx_fp32: float, precision: str, workdir: Path,
                 device: str) -> dict:
    """One parity row: the reduced-precision graph (unless fp32) and the engine built from it;
    an error is reported in the row, so that every stage is checked."""
    from .mixed_precision import convert_graph
    from .precision_parity import check_reduced_precision
    from .tensorrt_build import FP32_ENGINE_TOLERANCE, build_engine
    from .tensorrt_parity import check_engine

    row = {"stage": name, "onnx_fp32": onnx_fp32, "bound": None}
    graph = workdir / "model" / f"{name}.onnx"
    try:
        if precision != "fp32":
            low = graph.with_name(f"{name}.{precision}.onnx")
            row["conversion"] = convert_graph(graph, low, spec, precision)["fp32_nodes"]
            reduced = check_reduced_precision(module, spec, low, precision, device=device,
                                              raise_on_failure=False)
            row["onnx_reduced"] = getattr(reduced, "worst", None)
            row["onnx_reduced_note"] = getattr(reduced, "reason", None)
            graph = low
        tolerance = FP32_ENGINE_TOLERANCE if precision == "fp32" else None
        built = build_engine(graph, spec, workdir / f"{name}.{precision}.engine",
                             timing_cache=workdir / "timing.cache")
        engine = check_engine(module, spec, workdir / built["file"], tolerance=tolerance,
                              raise_on_failure=False)
        row.update(engine=engine.worst, bound=engine.tolerance,
                   build_seconds=built["build_seconds"], passed=engine.passed and (
                       row.get("onnx_reduced") is None
                       or row["onnx_reduced"] <= spec.reduced_precision_tolerance))
    except Exception as exc:  # noqa: BLE001 - report every stage, then fail
        row.update(error=f"{type(exc).__name__}: {exc}", passed=False)
    return row


def _check_frame_resize(workdir: Path, info: dict, yuv: bool) -> dict:
    """The row of one of the TensorRT backend's frame-resize engines: built in ``workdir`` and
    checked against the host's resize, in grey levels (``grey_levels``, ``grey_bound``)."""
    from .tensorrt_resize import NAMES, build_frame_resize_engine

    row = {"stage": NAMES[yuv], "onnx_fp32": None, "bound": None}
    try:
        record, _ = build_frame_resize_engine(workdir, info, yuv,
                                              timing_cache=workdir / "timing.cache")
        parity = record["parity"]
        row.update(grey_levels=parity["max_grey_levels"], grey_bound=parity["tolerance"],
                   build_seconds=record["build_seconds"], passed=parity["passed"])
    except Exception as exc:  # noqa: BLE001 - reported in its row, like a stage's
        row.update(error=f"{type(exc).__name__}: {exc}", passed=False)
    return row


def _export(components, specs, modules, names, out: Path, max_batch: int,
            device: str) -> dict[str, float]:
    """fp32 graphs of ``names`` in ``out``; returns their ONNX Runtime parity on ``device``
    (worst rel L2)."""
    if set(names) == set(specs):
        from .exporter import export_model

        result = export_model(components, out, max_batch=max_batch, parity_device=device,
                              log=lambda message: print(message, flush=True))
        return {name: max(stage["parity"]["onnxruntime"]["rel_l2"].values())
                for name, stage in result.manifest["stages"].items()}
    from .onnx_graph import check_graph, export_onnx
    from .parity import check_onnxruntime

    out.mkdir(parents=True, exist_ok=True)
    parity = {}
    for name in names:
        path = export_onnx(modules[name], specs[name], out / f"{name}.onnx")
        check_graph(path, specs[name])
        parity[name] = check_onnxruntime(modules[name], specs[name], path, device=device).worst
        print(f"{name}: exported, ONNX Runtime rel L2 {parity[name]:.1e}", flush=True)
    return parity


def _print_row(row: dict) -> None:
    def fmt(value):
        return "-" if value is None else f"{value:.2e}"

    if "error" in row:
        print(f"{row['stage']:<12} ERROR {row['error']}", flush=True)
        return
    if "grey_levels" in row:
        print(f"{row['stage']:<12} engine {row['grey_levels']:.2g} grey levels from the host's "
              f"resize  bound {row['grey_bound']:g}  build {row['build_seconds']:.0f} s  "
              f"{'ok' if row['passed'] else 'FAIL'}", flush=True)
        return
    note = f"  ({row['onnx_reduced_note']})" if row.get("onnx_reduced_note") else ""
    print(f"{row['stage']:<12} onnx fp32 {fmt(row['onnx_fp32'])}  reduced onnx "
          f"{fmt(row.get('onnx_reduced'))}  engine {fmt(row.get('engine'))}  bound "
          f"{fmt(row['bound'])}  build {row.get('build_seconds', 0):.0f} s  "
          f"{'ok' if row['passed'] else 'FAIL'}{note}", flush=True)


if __name__ == "__main__":
    main()
