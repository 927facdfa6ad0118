"""One configuration (backend, duration, batch) measured pairwise: baseline and candidate runs
alternate in one process after warm-up runs of each, so both see the same machine state."""

from __future__ import annotations

import math
import time

import numpy as np

from mmsep.runtime.requests import TIMING_KEYS

from .inputs import Inputs, queries


def summary(values: list[float]) -> dict[str, float]:
    """Median and 90th percentile (linear interpolation)."""
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90))}


def speedup(baseline: float, candidate: float) -> float | None:
    return baseline / candidate if candidate > 0 else None


class Candidate:
    """The runtime (``mmsep.runtime.Separator``) on one backend."""

    def __init__(self, model_dir, backend: str, *, threads: int, max_batch: int):
        from mmsep.runtime import Separator

        self.sep = Separator(model_dir, backend=backend, threads=threads, max_batch=max_batch)
        self.name = self.sep.backend_name
        self.precision = self.sep.backend.precision  # ort-cuda: fp16 graphs, ort-cpu: fp32
        self.memory_kind = "device"

    def process(self, *, mix, video, texts, steps, cfg, seed):
        result = self.sep.process(mix=str(mix), video=None if video is None else str(video),
                                  text=texts, steps=steps, cfg=cfg, seed=seed)
        return result.audio, dict(result.timings)

    def close(self) -> None:
        self.sep.close()


def _timed(pipeline, memory, gpu, gpu_kind, **request):
    with memory.window() as rss, gpu.window(gpu_kind) as dev:
        started = time.perf_counter()
        audio, timings = pipeline.process(**request)
        total = time.perf_counter() - started  # both pipelines return host arrays: synchronised
    return audio, timings, total, rss["peak_mb"], dev


def run_config(candidate, baseline, inputs: Inputs, *, batch: int, steps: int, cfg: float,
               seed: int, repeats: int, warmup: int, memory, gpu, log) -> dict:
    runs = {"candidate": [], "baseline": []}
    pipelines = {"candidate": (candidate, "device"), "baseline": (baseline, "torch")}
    agreement = None
    for r in range(warmup + repeats):
        texts = queries(batch, r)
        request = dict(mix=inputs.mix, video=inputs.video, texts=texts, steps=steps, cfg=cfg,
                       seed=seed)
        order = ("baseline", "candidate") if r % 2 == 0 else ("candidate", "baseline")
        outputs, seconds = {}, {}
        for name in order:
            pipeline, kind = pipelines[name]
            audio, timings, total, rss, dev = _timed(pipeline, memory, gpu, kind, **request)
            outputs[name], seconds[name] = audio, total
            if r >= warmup:
                runs[name].append((timings, total, rss, dev))
        if agreement is None:
            agreement = _rel_l2(outputs["candidate"], outputs["baseline"])
        log(f"  {'warm-up' if r < warmup else 'run'} {r + 1}/{warmup + repeats}: baseline "
            f"{seconds['baseline']:.2f} s, candidate {seconds['candidate']:.2f} s")
    audio_seconds = batch * inputs.duration
    out = {name: _pipeline_result(runs[name], audio_seconds) for name in runs}
    out["candidate"]["precision"] = candidate.precision
    out["baseline"]["precision"] = baseline.precision
    stages = {k: speedup(out["baseline"]["stages"][k]["median"],
                         out["candidate"]["stages"][k]["median"]) for k in TIMING_KEYS}
    stages["end_to_end"] = speedup(out["baseline"]["end_to_end"]["median"],
                                   out["candidate"]["end_to_end"]["median"])
    out["speedup"] = stages
    out["output_rel_l2"] = agreement
    return out


def _pipeline_result(runs, audio_seconds: float) -> dict:
    stages = {k: summary([t[k] for t, *_ in runs]) for k in TIMING_KEYS}
    e2e = summary([total for _, total, *_ in runs])
    gpu = [dev["peak_mb"] for *_, dev in runs if dev["peak_mb"] is not None]
    return {"stages": stages, "end_to_end": e2e,
            "rtf": e2e["median"] / audio_seconds,
            "throughput": audio_seconds / e2e["median"],
            "peak_rss_mb": max(rss for _, _, rss, _ in runs),
            "peak_gpu_mb": max(gpu) if gpu else None,
            "peak_gpu_how": runs[0][3]["how"]}


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.shape != b.shape:
        return None
    a, b = a.astype(np.float64), b.astype(np.float64)
    value = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    return value if math.isfinite(value) else None


def denoiser_efficiency(step_flops: int, steps: int, items: int, seconds: float,
                        matrix_tflops: float | None) -> dict:
    """Achieved TFLOP/s of the denoiser loop and its distance to the FLOP floor."""
    flops = step_flops * steps * items
    floor = flops / (matrix_tflops * 1e12) if matrix_tflops else None
    return {"flops": flops, "seconds": seconds,
            "tflops": flops / seconds / 1e12 if seconds > 0 else None,
            "floor_seconds": floor,
            "ratio_to_floor": seconds / floor if floor else None}
