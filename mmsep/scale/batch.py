"""mmsep-batch: separate every request of a JSONL job file, resumably, in this process or on Ray.

Exit codes: 0 every request succeeded, 3 some failed (each has its one-line error in
results.jsonl), 2 bad usage (missing job file, unusable model or output folder), 1 internal
failure, 130 interrupted (finished results are kept; rerun to finish).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click

from mmsep.console import FiniteRange, console_main, quiet_option
from mmsep.exit_codes import EXIT_OK, EXIT_SOME_FAILED
from mmsep.progress import Progress
from mmsep.runtime.atomic import check_writable, remove_stale_partials
from mmsep.runtime.backend_options import backend_options
from mmsep.runtime.model_dir import read_model_manifest

from .jobs import (RESULTS, Job, Results, check_outputs, failed_record, job_inputs, manifest_salt,
                   parse_job)

PROG = "mmsep-batch"


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               epilog="Exit status: 0 all requests succeeded, 3 some failed (see results.jsonl), "
                      "2 bad usage, 1 internal failure, 130 interrupted.")
@click.argument("jobs", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="Model directory written by mmsep-export.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="Output folder (made if missing); holds results.jsonl.")
@click.option("--subtype", type=click.Choice(["PCM_16", "PCM_24", "FLOAT"]), default="PCM_16",
              show_default=True, help="Output sample format (FLOAT needs wav outputs).")
@backend_options("worker")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run on a pool of Ray actors: starts a local Ray instance or joins "
                   "--ray-address's.")
@click.option("--ray-address", help="Ray cluster to connect to ('auto': the one `ray start` "
                                    "made); implies --ray.")
@click.option("--workers", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="With Ray: actors in the pool, each holding one Separator.")
@click.option("--cpus-per-worker", type=FiniteRange(0.01), default=1.0, show_default=True,
              help="With Ray on machines without GPUs: CPUs reserved per actor (with GPUs "
                   "each actor takes one GPU).")
@quiet_option("No progress bar or summary.")
def cli(jobs, model_dir, out_dir, subtype, backend_options, use_ray, ray_address, workers,
        cpus_per_worker, quiet):
    """Separate every request of JOBS (JSON lines with the fields of an mmsep-run request:
    video, mix, text, negative_text, generate, duration, seed, steps, cfg and an optional output
    file name) into --out. Requests whose outputs exist with their recorded SHA-256 are skipped,
    so an interrupted or partly failed job is finished by running it again."""
    from mmsep.runtime.errors import InputError, OutputError

    _check_ray_options(use_ray or bool(ray_address))
    if not jobs.is_file():
        raise InputError(f"{jobs}: job file not found")
    read_model_manifest(model_dir)  # a missing or foreign directory: a clear refusal first
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {out_dir}: cannot write ({exc.strerror or exc})") from None
    check_writable(out_dir / RESULTS, label=f"--out {out_dir}")
    if (out_dir / RESULTS).exists() and (out_dir / RESULTS).samefile(jobs):
        raise InputError(f"{jobs}: the job file is --out's {RESULTS}, where the results are "
                         "added; give another --out or rename the job file")
    remove_stale_partials(out_dir)
    results = Results(out_dir)
    plan = _plan(jobs, out_dir, results, manifest_salt(model_dir, subtype))
    progress = _Progress(plan.total, plan.skipped, quiet)
    for record in plan.failed:
        results.append(record)
        progress.update(record)
    worker_options = {"backend_options": backend_options, "subtype": subtype}
    try:
        if use_ray or ray_address:
            from .ray_batch import run_on_ray

            records = run_on_ray(plan.pending, model_dir, out_dir, worker_options,
                                 address=ray_address, workers=workers,
                                 cpus_per_worker=cpus_per_worker, quiet=quiet)
        else:
            records = _run_here(plan.pending, model_dir, out_dir, worker_options)
        for record in records:
            results.append(record)
            progress.update(record)
    finally:
        progress.close()
    if not quiet:
        click.echo(progress.summary(results.path), err=True)
    return EXIT_SOME_FAILED if progress.failed else EXIT_OK


def _check_ray_options(with_ray: bool) -> None:
    """--workers and --cpus-per-worker size the Ray pool: without --ray they would be ignored."""
    from click.core import ParameterSource

    context = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" for name in ("workers", "cpus_per_worker")
             if context.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if given and not with_ray:
        raise click.UsageError(f"{' and '.join(given)} size the Ray pool and need --ray (or "
                               "--ray-address); without it the job runs in this process")


class _Plan:
    def __init__(self):
        self.total = self.skipped = 0
        self.failed: list[dict] = []
        self.pending: list[Job] = []


def _plan(jobs_path: Path, out_dir: Path, results: Results, salt: str) -> _Plan:
    """Every line of JOBS: skipped (done before), failed now (unusable line) or pending."""
    plan, latest, taken = _Plan(), results.latest(), {}
    base = jobs_path.resolve().parent
    parsed = []
    with open(jobs_path, encoding="utf-8-sig", errors="replace") as f:  # a BOM: Windows
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            plan.total += 1
            try:
                parsed.append(parse_job(number, text, base, salt))
            except Exception as exc:  # noqa: BLE001 - recorded, the job goes on
                plan.failed.append(failed_record(number, None, exc))
    inputs = job_inputs(parsed)  # no line writes over another line's input
    for job in parsed:
        try:
            check_outputs(job, out_dir, taken, inputs)
        except Exception as exc:  # noqa: BLE001 - recorded, the job goes on
            plan.failed.append(failed_record(job.line, None, exc))
            continue
        if results.is_done(job, latest.get(job.line)):
            plan.skipped += 1
        else:
            plan.pending.append(job)
    plan.failed.sort(key=lambda record: record["line"])
    return plan


def _run_here(jobs: list[Job], model_dir, out_dir, worker_options) -> Iterator[dict]:
    """One Separator in this process; requests run in groups of max_batch, sharing batches."""
    if not jobs:
        return
    from .worker import JobWorker

    worker = JobWorker(model_dir, out_dir, **worker_options)
    try:
        size = worker.max_batch
        for start in range(0, len(jobs), size):
            yield from worker.run(jobs[start:start + size])
    finally:
        worker.close()


class _Progress:
    """requests done / failed / remaining and audio seconds per second, on stderr."""

    def __init__(self, total: int, skipped: int, quiet: bool):
        self.total, self.skipped, self.done, self.failed = total, skipped, 0, 0
        self.audio_seconds = 0.0
        self.started = time.perf_counter()
        self.bar = Progress(total, PROG, "request", enabled=not quiet, initial=skipped)

    def update(self, record: dict) -> None:
        if record["status"] == "ok":
            self.done += 1
            self.audio_seconds += record["audio_seconds"]
        else:
            self.failed += 1
        remaining = self.total - self.skipped - self.done - self.failed
        self.bar.update(self.total - remaining, f"done {self.done}, failed {self.failed}, "
                        f"remaining {remaining}, {self._rate():.2f} audio s/s")

    def _rate(self) -> float:
        return self.audio_seconds / max(time.perf_counter() - self.started, 1e-9)

    def close(self) -> None:
        self.bar.close()

    def summary(self, results_path: Path) -> str:
        elapsed = time.perf_counter() - self.started
        return (f"{PROG}: {self.done} done, {self.skipped} skipped (done before), {self.failed} "
                f"failed; {self.audio_seconds:.1f} s of audio in {elapsed:.1f} s "
                f"({self._rate():.2f} audio s/s); results in {results_path}")


def main(argv=None) -> None:
    """Console entry point: one-line errors, exit codes 0/3/2/1/130, never a traceback."""
    console_main(cli, PROG, sys.argv[1:] if argv is None else list(argv),
                 interrupted=f"interrupted; finished results are in {RESULTS}, rerun to finish")

if __name__ == "__main__":
    main()
