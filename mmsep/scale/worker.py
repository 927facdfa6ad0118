"""Runs groups of batch-job requests on one ``Separator`` and writes their outputs atomically.

The same class runs in the mmsep-batch process and, on Ray, inside each actor of the pool.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from mmsep.model_files import sha256_file
from mmsep.runtime import Separator
from mmsep.runtime.audio import AudioWriter
from mmsep.runtime.audio_writer import open_audio_outputs
from mmsep.runtime.backend_options import BackendOptions
from mmsep.runtime.cli import check_input_files

from .jobs import Job, failed_record


class JobWorker:
    """Holds one Separator (models loaded once); ``run(jobs)`` returns one record per job."""

    def __init__(self, model_dir, out_dir, *, backend_options: BackendOptions = BackendOptions(),
                 subtype: str = "PCM_16"):
        self.out_dir = Path(out_dir)
        self.subtype = subtype
        self.separator = Separator(model_dir, **backend_options.separator_kwargs())

    @property
    def max_batch(self) -> int:
        return self.separator.max_batch

    def close(self) -> None:
        self.separator.close()

    def run(self, jobs: list[Job]) -> list[dict]:
        """Run ``jobs`` together (their items share batches). Outputs go to temporary files
        renamed into place only when a request succeeded; on any exception, Ctrl-C included,
        none is left behind."""
        started = time.perf_counter()
        records: dict[int, dict] = {}
        stacks: dict[int, contextlib.ExitStack] = {}
        writers: dict[int, list[AudioWriter]] = {}
        try:
            for i, job in enumerate(jobs):
                try:
                    stacks[i], writers[i] = self._open(job)
                except Exception as exc:  # noqa: BLE001 - recorded, the job goes on
                    records[i] = failed_record(job.line, job.key, exc)
            requests = [{**jobs[i].options, "sink": _sink(writers[i])} for i in stacks]
            results = self.separator.process_many(requests) if requests else []
            for i, result in zip(list(stacks), results):
                records[i] = self._finish(jobs[i], stacks.pop(i), writers[i], result, started)
        finally:  # whatever is still open failed or was interrupted: remove its temporaries
            for stack in stacks.values():
                stack.__exit__(RuntimeError, RuntimeError("interrupted"), None)
        return [records[i] for i in range(len(jobs))]

    def _open(self, job: Job) -> tuple[contextlib.ExitStack, list[AudioWriter]]:
        check_input_files(job.options.get("video"), job.options.get("mix"))
        stack = contextlib.ExitStack()
        try:
            writers = open_audio_outputs(stack, [self.out_dir / n for n in job.outputs],
                                         self.separator.sample_rate, job.format, self.subtype,
                                         names=list(job.outputs))
        except BaseException as exc:
            stack.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return stack, writers

    def _finish(self, job: Job, stack, writers, result, started: float) -> dict:
        if isinstance(result, BaseException):
            stack.__exit__(type(result), result, result.__traceback__)
            return failed_record(job.line, job.key, result)
        try:
            for writer in writers:
                writer.close()
        except BaseException as exc:
            stack.__exit__(type(exc), exc, exc.__traceback__)
            if isinstance(exc, Exception):
                return failed_record(job.line, job.key, exc)
            raise
        try:
            stack.close()  # renames every output of the request into place
        except Exception as exc:  # noqa: BLE001 - e.g. a directory made there meanwhile
            return failed_record(job.line, job.key, exc)
        seconds = {k: round(v, 4) for k, v in result.timings.items()}
        seconds["total"] = round(time.perf_counter() - started, 4)
        return {"line": job.line, "key": job.key, "status": "ok", "outputs": list(job.outputs),
                "sha256": [sha256_file(self.out_dir / n) for n in job.outputs],
                "audio_seconds": round(result.duration, 4), "seconds": seconds, "error": None}


def _sink(writers: list[AudioWriter]):
    def sink(k, samples):
        writers[k].write(samples)
    return sink


def job_to_json(job: Job) -> str:
    return json.dumps(asdict(job))


def job_from_json(text: str) -> Job:
    data = json.loads(text)
    return Job(data["line"], data["key"], data["options"], tuple(data["outputs"]))
