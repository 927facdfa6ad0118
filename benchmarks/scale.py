"""Throughput of mmsep-serve and mmsep-batch (the ``ray`` extra) on this machine.

    python benchmarks/scale.py --model models/tiny --json scale.json

Service: mmsep-serve is started on a free loopback port with its own Ray instance; clients at
each concurrency send mixtures of ``--seconds`` with one text and report latency (p50/p95),
requests per second and the mean number of requests per batch (the X-Mmsep-Batch-Requests
header). Batch: a job of ``--jobs`` such requests run by mmsep-batch in process and with
``--ray --workers`` 1 and 2 (one ONNX Runtime thread per worker); wall time includes starting
Ray and loading the model in every actor.
"""

from __future__ import annotations

import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.json_out import json_option, write_json  # noqa: E402
from benchmarks.machine import machine_info, versions  # noqa: E402
from mmsep.runtime.example import tones  # noqa: E402

RAY_ENV = {"RAY_memory_monitor_refresh_ms": "0"}  # a shared machine: no OOM-killer surprises


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_service(model: Path, mix: bytes, concurrencies, requests_per_level: int, steps: int,
                  threads: int) -> list[dict]:
    import requests

    port = _free_port()
    log = tempfile.TemporaryFile("w+")  # the service's stderr: its last line if it fails to start
    server = subprocess.Popen(
        [sys.executable, "-m", "mmsep.scale.serve_cli", "--model", str(model), "--port",
         str(port), "--backend", "ort-cpu", "--threads", str(threads), "--max-queue", "256",
         "--batch-wait-ms", "20"], env={**os.environ, **RAY_ENV},
        stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server, log)

        def one(i: int) -> tuple[float, int]:
            started = time.perf_counter()
            answer = requests.post(f"{url}/v1/separate", files={"mix": ("m.wav", mix)},
                                   data={"text": "a tone", "seed": str(i), "steps": str(steps)},
                                   timeout=3600)
            answer.raise_for_status()
            return time.perf_counter() - started, int(answer.headers["x-mmsep-batch-requests"])

        one(0)  # warm-up
        rows = []
        for clients in concurrencies:
            n = max(requests_per_level, clients)
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                done = list(pool.map(one, range(n)))
            wall = time.perf_counter() - started
            latencies = [d[0] for d in done]
            rows.append({"clients": clients, "requests": n, "wall_s": wall,
                         "requests_per_s": n / wall,
                         "p50_s": statistics.median(latencies),
                         "p95_s": _percentile(latencies, 0.95),
                         "mean_batch_requests": statistics.mean(d[1] for d in done)})
            print(f"service  {clients:3d} clients: p50 {rows[-1]['p50_s']:.2f} s, p95 "
                  f"{rows[-1]['p95_s']:.2f} s, {rows[-1]['requests_per_s']:.2f} req/s, mean "
                  f"batch {rows[-1]['mean_batch_requests']:.1f} requests", file=sys.stderr)
        return rows
    finally:
        server.terminate()
        server.wait(timeout=300)
        log.close()


def _wait_healthy(url: str, server: subprocess.Popen, log) -> None:
    import requests

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            last = (log.read().strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise click.ClickException(f"mmsep-serve exited while starting: {last}")
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise RuntimeError("mmsep-serve did not come up in 10 minutes")


def bench_batch(model: Path, root: Path, jobs: int, steps: int, seconds: float) -> list[dict]:
    job_file = root / "jobs.jsonl"
    job_file.write_text("".join(json.dumps({"mix": "mix.wav", "text": "a tone", "seed": i,
                                            "steps": steps}) + "\n" for i in range(jobs)))
    rows = []
    pool = ["--ray", "--cpus-per-worker", "1", "--workers"]
    for label, extra in (("in process", []), ("ray, 1 worker", [*pool, "1"]),
                         ("ray, 2 workers", [*pool, "2"])):
        out = root / f"out-{len(rows)}"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mmsep.scale.batch", str(job_file), "--model",
                        str(model), "--out", str(out), "--backend", "ort-cpu", "--threads", "1",
                        "-q", *extra], check=True,
                       env={**os.environ, **RAY_ENV})
        wall = time.perf_counter() - started
        rows.append({"mode": label, "requests": jobs, "wall_s": wall,
                     "requests_per_s": jobs / wall, "audio_s_per_s": jobs * seconds / wall})
        print(f"batch  {label:15s}: {wall:.1f} s, {jobs / wall:.2f} req/s, "
              f"{jobs * seconds / wall:.2f} audio s/s", file=sys.stderr)
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", type=click.Path(path_type=Path, exists=True), required=True,
              help="Model directory (mmsep-export's output).")
@click.option("--seconds", type=click.FloatRange(0.1, 600), default=2.0, show_default=True,
              help="Length of each request's mixture.")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True,
              help="Euler steps.")
@click.option("--requests", "requests_per_level", type=click.IntRange(1), default=32,
              show_default=True,
              help="Requests per concurrency level (at least the number of clients).")
@click.option("--jobs", type=click.IntRange(1), default=32, show_default=True,
              help="Requests in the batch job.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="ONNX Runtime threads of the service's replica (0: its default).")
@json_option("Also write the figures to this JSON file.")
def main(model, seconds, steps, requests_per_level, jobs, threads, json_path):
    """Measure mmsep-serve latency/throughput at 1, 4, 16 clients and mmsep-batch throughput."""
    with tempfile.TemporaryDirectory(prefix="mmsep-scale-bench-") as tmp:
        root = Path(tmp)
        sf.write(root / "mix.wav", tones(seconds, 44100), 44100, subtype="PCM_16")
        buffer = io.BytesIO()
        sf.write(buffer, tones(seconds, 44100), 44100, format="WAV", subtype="PCM_16")
        service = bench_service(model, buffer.getvalue(), (1, 4, 16), requests_per_level, steps,
                                threads)
        batch = bench_batch(model, root, jobs, steps, seconds)
    report = {"schema": "mmsep-scale-benchmark/1", "model": str(model), "seconds": seconds,
              "steps": steps, "machine": machine_info(), "versions": versions(),
              "service": service, "batch": batch}
    if json_path:
        write_json(json_path, report)


if __name__ == "__main__":
    main()
