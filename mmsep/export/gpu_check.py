"""GPU check of the export chain on random weights: ONNX fp32, reduced-precision ONNX, engines.

    python -m mmsep.export.gpu_check --preset tiny [--precision fp16] [--stages denoiser,vocoder]

Builds random components of the preset, exports the stage graphs into a temporary directory
(mmsep.export.exporter.export_model, or only the named stages), writes the reduced-precision
graphs, builds TensorRT engines and prints one parity row per stage: relative L2 against the
PyTorch fp32 module of the ONNX fp32 graph (ONNX Runtime CPU), the reduced-precision graph
(ONNX Runtime CPU) and the engine (GPU), with the bound. Exit status 0 when every check passes,
1 when one fails or TensorRT / a CUDA GPU is missing (the reason is printed), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmsep.export.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny",
                        help="flow preset with random weights (tiny, small_44k, large_44k_v2, ...)")
    parser.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"),
                        help="engine precision (fp32 builds from the fp32 graphs)")
    parser.add_argument("--stages", default=None,
                        help="comma-separated stages to check (default: all)")
    parser.add_argument("--max-batch", type=int, default=4, help="largest batch of the profiles")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep graphs and engines here instead of a temporary directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)

    from .tensorrt_build import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        print(f"gpu_check: cannot run: {reason}", file=sys.stderr)
        return EXIT_FAILED
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return _run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="mmsep-gpu-check-") as tmp:
        return _run(args, Path(tmp))


def _run(args, workdir: Path) -> int:
    import torch

    from ..models.components import build_components
    from .mixed_precision import convert_graph
    from .precision_parity import check_reduced_precision
    from .tensorrt_build import FP32_ENGINE_TOLERANCE, build_engine, engine_info
    from .tensorrt_parity import check_engine
    from .wrappers import stage_modules, stage_specs

    torch.set_grad_enabled(False)
    started = time.perf_counter()
    try:
        components = build_components(args.preset, seed=0)
    except ValueError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    specs = stage_specs(components, max_batch=args.max_batch)
    modules = stage_modules(components)
    names = list(specs) if not args.stages else [s.strip() for s in args.stages.split(",")]
    unknown = [n for n in names if n not in specs]
    if unknown:
        print(f"gpu_check: unknown stage(s) {', '.join(unknown)}; this preset has "
              f"{', '.join(specs)}", file=sys.stderr)
        return EXIT_USAGE
    info = engine_info()
    print(f"preset {args.preset}, {args.precision}, TensorRT {info['version']} on {info['gpu']} "
          f"(sm {info['compute_capability']})", flush=True)
    onnx_parity = _export(components, specs, modules, names, workdir / "model", args.max_batch)
    timing_cache = workdir / "timing.cache"
    rows = []
    for name in names:
        spec, module = specs[name], modules[name]
        row = {"stage": name, "onnx_fp32": onnx_parity[name], "bound": None}
        graph = workdir / "model" / f"{name}.onnx"
        try:
            if args.precision != "fp32":
                low = graph.with_name(f"{name}.{args.precision}.onnx")
                row["conversion"] = convert_graph(graph, low, spec, args.precision)["fp32_nodes"]
                reduced = check_reduced_precision(module, spec, low, args.precision,
                                                  raise_on_failure=False)
                row["onnx_reduced"] = getattr(reduced, "worst", None)
                row["onnx_reduced_note"] = getattr(reduced, "reason", None)
                graph = low
            tolerance = FP32_ENGINE_TOLERANCE if args.precision == "fp32" else None
            built = build_engine(graph, spec, workdir / f"{name}.{args.precision}.engine",
                                 timing_cache=timing_cache)
            engine = check_engine(module, spec, workdir / built["file"], tolerance=tolerance,
                                  raise_on_failure=False)
            row.update(engine=engine.worst, bound=engine.tolerance,
                       build_seconds=built["build_seconds"], passed=engine.passed and (
                           row.get("onnx_reduced") is None
                           or row["onnx_reduced"] <= spec.reduced_precision_tolerance))
        except Exception as exc:  # report every stage, then fail
            row.update(error=f"{type(exc).__name__}: {exc}", passed=False)
        rows.append(row)
        _print_row(row)
    ok = all(r["passed"] for r in rows)
    print(f"{'all checks passed' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s")
    if args.json:
        from ..runtime.atomic import write_bytes_atomically

        report = {"preset": args.preset, "precision": args.precision, "tensorrt": info,
                  "stages": rows}
        write_bytes_atomically(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return EXIT_OK if ok else EXIT_FAILED


def _export(components, specs, modules, names, out: Path, max_batch: int) -> dict[str, float]:
    """fp32 graphs of ``names`` in ``out``; returns their ONNX Runtime parity (worst rel L2)."""
    if set(names) == set(specs):
        from .exporter import export_model

        result = export_model(components, out, max_batch=max_batch,
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
        parity[name] = check_onnxruntime(modules[name], specs[name], path).worst
        print(f"{name}: exported, ONNX Runtime rel L2 {parity[name]:.1e}", flush=True)
    return parity


def _print_row(row: dict) -> None:
    def fmt(value):
        return "-" if value is None else f"{value:.2e}"

    if "error" in row:
        print(f"{row['stage']:<12} ERROR {row['error']}", flush=True)
        return
    note = f"  ({row['onnx_reduced_note']})" if row.get("onnx_reduced_note") else ""
    print(f"{row['stage']:<12} onnx fp32 {fmt(row['onnx_fp32'])}  reduced onnx "
          f"{fmt(row.get('onnx_reduced'))}  engine {fmt(row.get('engine'))}  bound "
          f"{fmt(row['bound'])}  build {row.get('build_seconds', 0):.0f} s  "
          f"{'ok' if row['passed'] else 'FAIL'}{note}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
