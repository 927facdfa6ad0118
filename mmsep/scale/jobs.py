"""Batch-job requests (one JSON object per line of JOBS) and the results file that makes a job
resumable.

A line has the fields of an mmsep-run request: ``video``, ``mix`` (paths, relative ones to the
JOBS file's folder), ``text`` (a string or a list), ``negative_text``, ``generate``,
``duration``, ``seed``, ``steps``, ``cfg`` and an optional ``output`` file name inside the
output folder (default ``<line>_<mix or video name>_separated.wav``; with several texts
``<stem>_<k>.wav`` as mmsep-run names them).

``results.jsonl`` in the output folder gets one record per finished request, appended as it
finishes: the line number, a key (hash of the line, the model manifest and the sample format),
``status`` ``ok`` or ``failed``, output names with their SHA-256, timings and the error line. A
request is done when its latest record is ``ok`` with the current key and every output still has
its recorded hash; everything else is (re)done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mmsep.model_files import sha256_file
from mmsep.runtime.cli import output_paths
from mmsep.runtime.paths import check_outputs as check_paths, identities
from mmsep.runtime.errors import InputError, OutputError, one_line

RESULTS = "results.jsonl"
FIELDS = ("video", "mix", "text", "negative_text", "generate", "duration", "seed", "steps", "cfg",
          "output")


@dataclass(frozen=True)
class Job:
    line: int
    key: str
    options: dict  # Separator.process keyword arguments (paths as strings)
    outputs: tuple[str, ...]  # file names inside the output folder

    @property
    def inputs(self) -> dict[str, str]:
        """The line's input files by field ("video", "mix")."""
        return {k: self.options[k] for k in ("video", "mix") if k in self.options}

    @property
    def format(self) -> str:
        return "flac" if self.outputs[0].lower().endswith(".flac") else "wav"


def parse_job(line: int, text: str, base: Path, salt: str) -> Job:
    """One JOBS line -> a Job; InputError with a one-line message when it is unusable. Input
    files are not opened here (on a cluster only the workers may see them)."""
    try:
        request = json.loads(text.rstrip("\r\n"))  # columns then count on this line
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(request, dict):
        raise InputError("a request must be a JSON object")
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown field {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    options = {k: v for k, v in request.items() if k != "output" and v is not None}
    for name in ("video", "mix"):
        if name in options:
            options[name] = str(base / _string(options[name], name))
    if not isinstance(options.get("generate", False), bool):
        raise InputError("generate must be true or false")
    text_field = options.get("text")
    n_texts = len(text_field) if isinstance(text_field, list) and text_field else 1
    outputs = _output_names(line, request.get("output"), n_texts, options)
    key = hashlib.sha256(json.dumps([request, salt], sort_keys=True).encode()).hexdigest()
    return Job(line, key, options, tuple(outputs))


def _string(value, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"{name} must be a non-empty string (a path)")
    return value


def _output_names(line: int, output, n_texts: int, options: dict) -> list[str]:
    if output is not None:
        output = _string(output, "output")
        if Path(output).name != output or output.startswith("."):
            raise InputError(f"output {output!r} must be a file name (no folders) inside --out")
    else:
        derived = output_paths(None, None, 1, options.get("mix"), options.get("video"))[0]
        output = f"{line}_{derived}"
    if Path(output).suffix.lower() not in ("", ".wav", ".flac"):
        raise InputError(f"output {output!r} must end in .wav or .flac")
    return [p.name for p in output_paths(output, None, n_texts, None, None)]


def check_outputs(job: Job, out_dir: Path, taken: dict[str, int],
                  all_inputs: dict | None = None) -> None:
    """Outputs must not overwrite an input of this line or of another (``all_inputs``, from
    ``job_inputs``; compared as files by the runtime's ``check_outputs``), the results file,
    another line's output, or a directory."""
    labels = ["output"] if len(job.outputs) == 1 else \
        [f"output (text {k})" for k in range(len(job.outputs))]  # as mmsep-run's
    check_paths({label: out_dir / name for label, name in zip(labels, job.outputs)},
                job.inputs, others=all_inputs)
    for name in job.outputs:
        if name == RESULTS:
            raise InputError(f"output {name} is the job's results file")
        if taken.get(name, job.line) != job.line:
            raise InputError(f"output {name} is already written by line {taken[name]}")
        if (out_dir / name).is_dir():
            raise InputError(f"output {name} is a directory in --out; give another name")
    taken.update(dict.fromkeys(job.outputs, job.line))  # only a line that will write claims


def job_inputs(jobs: list[Job]) -> dict:
    """The input files of every line, for ``check_outputs``."""
    return identities({f"line {job.line}'s {k}": path for job in jobs
                       for k, path in job.inputs.items()})


def manifest_salt(model_dir: Path, subtype: str) -> str:
    """What else, besides the line, decides the outputs: the model and the sample format."""
    from mmsep.model_files import MANIFEST

    return f"{sha256_file(Path(model_dir) / MANIFEST)}:{subtype}"


class Results:
    """The append-only results file of an output folder."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RESULTS

    def latest(self) -> dict[int, dict]:
        """The last record of every line (a torn last line from a killed run is ignored)."""
        latest = {}
        if self.path.exists():
            # bytes that are not UTF-8 (a damaged file) spoil only their own line
            for raw in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, ValueError):
                    record = json.loads(raw)
                    latest[int(record["line"])] = record
        return latest

    def is_done(self, job: Job, record: dict | None) -> bool:
        if not record or record.get("status") != "ok" or record.get("key") != job.key:
            return False
        digests = record.get("sha256")
        if record.get("outputs") != list(job.outputs) or not isinstance(digests, list) \
                or len(digests) != len(job.outputs):
            return False  # another job's record, or a damaged one: the line is done again
        for name, digest in zip(job.outputs, digests):
            path = self.out_dir / name
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    def append(self, record: dict) -> None:
        """Add ``record`` durably; OutputError naming the file when it cannot be written."""
        try:
            with open(self.path, "a+b") as f:
                f.seek(0, os.SEEK_END)
                if f.tell():
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # finish a line torn by a killed run
                        f.write(b"\n")
                f.write((json.dumps(record) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({one_line(exc)})") from None


def failed_record(line: int, key: str | None, exc: BaseException) -> dict:
    return {"line": line, "key": key, "status": "failed", "outputs": [], "sha256": [],
            "audio_seconds": 0.0, "seconds": {}, "error": _message(exc)}


def _message(exc: BaseException) -> str:
    if isinstance(exc, InputError):
        return one_line(exc)
    return f"internal error: {type(exc).__name__}: {one_line(exc)}"
