"""Real-time factor per stage and backend, against a reference-style PyTorch pipeline.

    python benchmarks/rtf.py --model models/tiny --backend ort-cpu --quick --json out.json

See BENCHMARKS.md for what each number means and the JSON schema.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.json_out import json_option, write_json  # noqa: E402
from benchmarks import flops as flop_count  # noqa: E402
from benchmarks import machine  # noqa: E402
from mmsep.runtime.backends import BACKENDS  # noqa: E402

SCHEMA = "mmsep-benchmark/1"
EXIT_USAGE = 2
MAX_QUERIES = 16


class BenchError(ValueError):
    """Bad usage or input: reported in one line, exit code 2."""


def _numbers(text: str, kind, what: str, low) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"--{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < low for v in values):
        raise BenchError(f"--{what}: every value must be at least {low}, got {text!r}")
    return values


def _video_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise BenchError(f"--video-size: expected WIDTHxHEIGHT, got {text!r}") from None
    if not (16 <= width <= 7680 and 16 <= height <= 4320) or width % 2 or height % 2:
        raise BenchError(f"--video-size: width and height must be even, 16..7680 x 16..4320, "
                         f"got {text!r}")
    return width, height


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", type=click.Path(path_type=Path),
              help="Model directory written by mmsep-export.")
@click.option("--preset", help="Instead of --model: build random weights of this preset and "
                               "export them to a cached model directory first.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Flow checkpoint for the baseline (default: the path in the manifest).")
@click.option("--weights-dir", type=click.Path(path_type=Path),
              help="Release-layout weights directory for the baseline's companion networks "
                   "(default: the paths in the manifest).")
@click.option("--backend", "backends", default="auto", show_default=True,
              help=f"Comma-separated runtime backends to measure ({', '.join(BACKENDS)}).")
@click.option("--skip-unavailable", is_flag=True,
              help="Skip (and record) backends that cannot run here instead of failing.")
@click.option("--durations", help="Comma-separated clip lengths in seconds [default: 8,30,120; "
                                  "--quick: one window].")
@click.option("--batch", "batches", help="Comma-separated numbers of text queries per request "
                                         "[default: 1,4,16; --quick: 1].")
@click.option("--steps", type=click.IntRange(1, 1000),
              help="Euler steps [default: 25; --quick: 4].")
@click.option("--cfg", type=click.FloatRange(0, 100), default=4.5, show_default=True,
              help="Classifier-free guidance strength.")
@click.option("--repeats", type=click.IntRange(1, 1000),
              help="Measured runs per pipeline and configuration [default: 5; --quick: 2].")
@click.option("--warmup", type=click.IntRange(0, 100),
              help="Warm-up runs per pipeline before measuring [default: 1].")
@click.option("--threads", type=click.IntRange(1, 1024), default=os.cpu_count(),
              show_default=True, help="Intra-op threads for torch and ONNX Runtime alike.")
@click.option("--video-size", help="Synthetic video WIDTHxHEIGHT [default: 1280x720; "
                                   "--quick: 256x144].")
@click.option("--video/--no-video", "with_video", default=True, show_default=True,
              help="Query with a video as well as text (--no-video: text queries only).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Noise seed (both pipelines draw the same x0).")
@click.option("--flops-presets", default=None,
              help="Comma-separated presets whose FLOPs to count [default: all; --quick: none "
                   "but the benchmarked model].")
@click.option("--quick", is_flag=True, help="CI settings: 2 runs after 1 warm-up, 4 steps, one "
                                            "window, batch 1, a small video.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path.home() / ".cache" / "mmsep" / "bench", show_default=True,
              help="Where --preset model directories and the synthetic inputs are kept.")
@json_option("Write the results as JSON to this file.")
@click.option("--quiet", is_flag=True, help="No progress messages (the table is still printed).")
def main(model_dir, preset, checkpoint, weights_dir, backends, skip_unavailable, durations,
         batches, steps, cfg, repeats, warmup, threads, video_size, with_video, seed,
         flops_presets, quick, cache_dir, json_path, quiet):
    """Per-stage latency, real-time factor and throughput of the runtime, measured pairwise
    against a reference-style PyTorch pipeline with the same weights and inputs."""
    from benchmarks.models import WeightsError
    from mmsep.export.errors import UsageError
    from mmsep.models.io import CheckpointError
    from mmsep.runtime.errors import InputError

    log = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    try:
        options = _settings(model_dir, preset, backends, durations, batches, steps, repeats,
                            warmup, threads, video_size, with_video, flops_presets, quick, cfg,
                            seed)
        report = run(options, checkpoint=checkpoint, weights_dir=weights_dir,
                     skip_unavailable=skip_unavailable, cache_dir=cache_dir, log=log)
    except (BenchError, WeightsError, UsageError, CheckpointError, InputError) as exc:
        click.echo(f"rtf.py: error: {' '.join(str(exc).split())}", err=True)
        sys.exit(EXIT_USAGE)
    from benchmarks.report import table

    click.echo(table(report))
    if json_path is not None:
        write_json(json_path, report)
        log(f"wrote {json_path}")


def _settings(model_dir, preset, backends, durations, batches, steps, repeats, warmup, threads,
              video_size, with_video, flops_presets, quick, cfg, seed) -> dict:
    if (model_dir is None) == (preset is None):
        raise BenchError("give exactly one of --model DIR or --preset NAME")
    if model_dir is not None and not model_dir.is_dir():
        raise BenchError(f"model directory {model_dir} does not exist (create one with "
                         "mmsep-export, or pass --preset)")
    names = [b.strip() for b in backends.split(",") if b.strip()]
    if not names:
        raise BenchError("--backend: no backend given")
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise BenchError(f"--backend: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(BACKENDS)}")
    batch_list = _numbers(batches, int, "batch", 1) if batches else ([1] if quick else [1, 4, 16])
    if max(batch_list) > MAX_QUERIES:
        raise BenchError(f"--batch: at most {MAX_QUERIES} queries per request")
    flop_names = None
    if flops_presets:
        flop_names = [p.strip() for p in flops_presets.split(",") if p.strip()]
        unknown = sorted(set(flop_names) - set(flop_count.FLOP_PRESETS))
        if unknown:
            raise BenchError(f"--flops-presets: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(flop_count.FLOP_PRESETS)}")
    elif not quick:
        flop_names = list(flop_count.FLOP_PRESETS)
    size = _video_size(video_size or ("256x144" if quick else "1280x720")) if with_video else None
    return {"model_dir": model_dir, "preset": preset, "backends": list(dict.fromkeys(names)),
            "durations": _numbers(durations, float, "durations", 1.0) if durations else None,
            "batches": batch_list, "steps": steps or (4 if quick else 25),
            "repeats": repeats or (2 if quick else 5), "warmup": 1 if warmup is None else warmup,
            "threads": threads, "video_size": size, "flops_presets": flop_names or [],
            "cfg": cfg, "seed": seed, "quick": quick}


def run(o: dict, *, checkpoint, weights_dir, skip_unavailable: bool, cache_dir: Path,
        log) -> dict:
    import torch

    from benchmarks.baseline import BaselinePipeline
    from benchmarks.models import prepare_model
    from mmsep.runtime.model_dir import ModelDir

    torch.set_num_threads(o["threads"])
    torch.set_grad_enabled(False)
    model_dir, components = prepare_model(o["model_dir"], o["preset"], checkpoint=checkpoint,
                                          weights_dir=weights_dir, cache_dir=cache_dir, log=log)
    model = ModelDir(model_dir, verify=False)
    info = model.info
    durations = o["durations"] or [info.window_seconds]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    skipped = []
    # every backend is tried before anything is measured: one that cannot run here is refused
    # (or, with --skip-unavailable, recorded) up front, not after the others' measurements
    backends = _runnable(model_dir, o, info, skip_unavailable, skipped, log)
    if not backends:
        raise _none_ran(skipped)
    try:
        matrix, flops = _machine_limits(components, device, o["flops_presets"], log)
        baseline = BaselinePipeline(components, device=device,
                                    overlap=info.default_overlap_seconds)
    except BaseException:
        backends[0][1].close()
        raise
    model_flops = flops["model"]
    memory, gpu = machine.PeakRss(), machine.GpuMemory()
    results, clip_micro = [], {}
    try:
        for backend, opened in backends:
            candidate = opened or _candidate(model_dir, backend, o, info, skip_unavailable,
                                             skipped, log)
            if candidate is None:
                continue
            try:
                if o["video_size"] is not None:  # text-only runs never touch the stage
                    clip_micro[candidate.name] = _clip_image(candidate, baseline, model_flops,
                                                             matrix, o["repeats"])
                for duration in durations:
                    results += _configs(candidate, baseline, duration, o, info, model_flops,
                                        matrix, memory, gpu, cache_dir, log)
            finally:
                candidate.close()
    finally:
        memory.close()
    if not results:
        raise _none_ran(skipped)
    return _report(model, o, device, results={"matrix_tflops": matrix, "flops": flops,
                                              "clip_image": clip_micro, "results": results,
                                              "skipped": skipped})


def _none_ran(skipped: list[dict]) -> BenchError:
    return BenchError("no backend could run: "
                      + "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped))


def _report(model, o: dict, device: str, results: dict) -> dict:
    """The JSON document: machine, versions, model, settings, then ``results``."""
    from mmsep.model_files import read_manifest

    info = model.info
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine.machine_info(), "versions": machine.versions(),
            "model": {"dir": str(model.path), "preset": info.preset,
                      "graph_precisions": [p for p in ("fp32", "fp16") if model.has_precision(p)],
                      "sample_rate": info.sample_rate, "window_seconds": info.window_seconds,
                      "sources": read_manifest(model.path).get("sources")},
            "settings": {"steps": o["steps"], "cfg": o["cfg"], "repeats": o["repeats"],
                         "warmup": o["warmup"], "threads": o["threads"], "seed": o["seed"],
                         "video_size": None if o["video_size"] is None
                         else "{}x{}".format(*o["video_size"]),
                         "quick": o["quick"], "baseline_device": device},
            **results}


def _machine_limits(components, device: str, flops_presets, log) -> tuple[dict, dict]:
    """The machine's matrix throughput and the model's FLOPs: what the speeds are set against."""
    log("measuring matrix throughput")
    matrix = {"cpu_fp32": machine.matrix_tflops("cpu", "float32")}
    if device == "cuda":
        matrix["gpu_fp16"] = machine.matrix_tflops("cuda", "float16")
        matrix["gpu_bf16"] = machine.matrix_tflops("cuda", "bfloat16")
    log("counting FLOPs")
    config = components.flow.config
    flops = {"model": flop_count.config_flops(config, tiny_clip=config.name == "tiny"),
             "presets": flop_count.preset_flops(flops_presets),
             "counter": "torch.utils.flop_counter.FlopCounterMode (matmul, conv, attention; "
                        "2 FLOPs per multiply-add)"}
    return matrix, flops


def _runnable(model_dir, o, info, skip_unavailable, skipped, log) -> list[tuple]:
    """(backend, open Candidate or None) for each asked-for backend that starts here. The first
    stays open for its measurement; the others are closed again (their sessions would weigh on
    the first one's peak RSS) and reopened in turn. One that cannot start raises, or with
    ``skip_unavailable`` is recorded in ``skipped`` and left out."""
    log("checking the backends")
    runnable = []
    try:
        for backend in o["backends"]:
            candidate = _candidate(model_dir, backend, o, info, skip_unavailable, skipped, log)
            if candidate is None:
                continue
            if runnable:
                candidate.close()
                candidate = None
            runnable.append((backend, candidate))
    except BaseException:
        if runnable:
            runnable[0][1].close()
        raise
    return runnable


def _candidate(model_dir, backend, o, info, skip_unavailable, skipped, log):
    from benchmarks.pairwise import Candidate
    from mmsep.runtime.errors import BackendUnavailable

    wanted = max(max(o["batches"]), info.max_batch)  # ORT's batch axis is dynamic
    try:
        if backend in ("ort-cpu", "ort-cuda"):
            return Candidate(model_dir, backend, threads=o["threads"], max_batch=wanted)
        candidate = Candidate(model_dir, backend, threads=o["threads"], max_batch=info.max_batch)
        if candidate.name == "trt" or wanted == info.max_batch:
            return candidate
        candidate.close()  # auto chose ONNX Runtime: batched as the explicit name would be
        return Candidate(model_dir, candidate.name, threads=o["threads"], max_batch=wanted)
    except BackendUnavailable as exc:
        if not skip_unavailable:
            raise
        reason = " ".join(str(exc).split())
        log(f"skipping backend {backend}: {reason}")
        skipped.append({"backend": backend, "reason": reason})
        return None


def _configs(candidate, baseline, duration, o, info, model_flops, matrix, memory, gpu,
             cache_dir, log) -> list[dict]:
    from benchmarks.inputs import make_inputs
    from benchmarks.pairwise import denoiser_efficiency, run_config
    from mmsep.runtime.windows import WindowPlan

    inputs = make_inputs(cache_dir / "inputs", duration, info.sample_rate, o["video_size"])
    sr = info.sample_rate
    windows = WindowPlan(round(duration * sr), info.window_samples,
                         round(info.default_overlap_seconds * sr), sr).count
    rows = []
    for batch in o["batches"]:
        log(f"{candidate.name}: {duration:g} s, batch {batch}")
        row = run_config(candidate, baseline, inputs, batch=batch, steps=o["steps"],
                         cfg=o["cfg"], seed=o["seed"], repeats=o["repeats"],
                         warmup=o["warmup"], memory=memory, gpu=gpu, log=log)
        for name, on_gpu in (("candidate", candidate.name != "ort-cpu"),
                             ("baseline", baseline.device.type == "cuda")):
            rate = _matrix_rate(matrix, on_gpu, row[name]["precision"])
            row[name]["denoiser"] = denoiser_efficiency(
                model_flops["denoiser_step"], o["steps"], windows * batch,
                row[name]["stages"]["sampling"]["median"], rate)
        rows.append({"backend": candidate.name, "duration": duration, "batch": batch,
                     "windows": windows, "audio_seconds": batch * duration, **row})
    return rows


def _matrix_rate(matrix: dict, on_gpu: bool, precision: str) -> float | None:
    if not on_gpu:
        return matrix["cpu_fp32"]
    # reduced-precision tensor-core peak: the floor a deployment can aim at
    return matrix.get("gpu_bf16" if precision == "bf16" else "gpu_fp16")


def _clip_image(candidate, baseline, model_flops, matrix, repeats) -> dict:
    """The CLIP image stage alone on one window's frames, pairwise, after one warm-up each."""
    import numpy as np
    import torch

    frames = np.random.default_rng(0).random(
        (model_flops["clip_frames"], 3, baseline.clip.image_size, baseline.clip.image_size),
        dtype=np.float32)
    torch_frames = torch.from_numpy(frames).to(baseline.device, baseline.dtype)

    def run_candidate():
        candidate.sep.backend.run("clip_image", {"frames": frames})

    def run_baseline():
        with torch.inference_mode():
            baseline.clip.encode_image(torch_frames)
        baseline._sync()

    times = {"candidate": [], "baseline": []}
    pair = (("baseline", run_baseline), ("candidate", run_candidate))
    for r in range(repeats + 1):
        for name, fn in (pair if r % 2 == 0 else pair[::-1]):  # each first in turn, as run_config
            started = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - started)
    out = {"frames": model_flops["clip_frames"], "flops": model_flops["clip_image"]}
    for name, on_gpu, precision in (("candidate", candidate.name != "ort-cpu",
                                     candidate.precision),
                                    ("baseline", baseline.device.type == "cuda",
                                     baseline.precision)):
        median = statistics.median(times[name])
        rate = _matrix_rate(matrix, on_gpu, precision)
        floor = model_flops["clip_image"] / (rate * 1e12) if rate else None
        out[name] = {"median": median, "p90": float(np.percentile(times[name], 90)),
                     "tflops": model_flops["clip_image"] / median / 1e12,
                     "floor_seconds": floor, "ratio_to_floor": median / floor if floor else None}
    out["speedup"] = out["baseline"]["median"] / out["candidate"]["median"]
    return out


if __name__ == "__main__":
    main()
