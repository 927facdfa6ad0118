"""mmsep-batch in this process: outputs, failures kept local, exit codes, resuming."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mmsep.runtime import Separator
from mmsep.scale.batch import main
from tests.helpers import rel_l2, without_fp16_copies
from tests.scale.conftest import six_requests, write_jobs

REPO = Path(__file__).resolve().parents[2]


def run_batch(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".partial-" in p.name)


@pytest.fixture(scope="module")
def first_run(model_dir, job_inputs, tmp_path_factory):
    jobs = write_jobs(job_inputs["root"] / "six.jsonl", six_requests(job_inputs))
    out = tmp_path_factory.mktemp("batch") / "out"
    code = run_batch(jobs, "--model", model_dir, "--out", out, "--backend", "ort-cpu",
                     "--subtype", "FLOAT", "--quiet")
    return jobs, out, code


def test_outputs_records_and_exit_code(first_run, model_dir, job_inputs):
    jobs, out, code = first_run
    assert code == 3  # two requests failed
    by_line = {r["line"]: r for r in records(out)}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6]
    assert [by_line[n]["status"] for n in range(1, 7)] == ["ok", "ok", "ok", "failed", "failed",
                                                          "ok"]
    assert by_line[4]["error"] == f"{job_inputs['root'] / 'missing.wav'}: file not found"
    # the line ends after its 29 characters: the error is at its end, not "column 1" of a next
    assert by_line[5]["error"] == "not valid JSON (Expecting value at column 30)"
    assert by_line[1]["outputs"] == ["1_mix_separated.wav"]
    assert by_line[2]["outputs"] == ["two_0.wav", "two_1.wav"]
    assert by_line[3]["outputs"] == ["3_generated.wav"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["results.jsonl", "1_mix_separated.wav", "two_0.wav", "two_1.wav", "3_generated.wav",
         "neg.wav"])
    # each output is what one Separator.process call with that request's options gives
    with Separator(model_dir, backend="ort-cpu") as sep:
        expected = sep.process(video=str(job_inputs["video"]), text=["a dog", "a cat"], seed=2,
                               steps=1).audio
        negative = sep.process(mix=str(job_inputs["other"]), text="a tone",
                               negative_text="noise", seed=4, steps=1).audio[0]
    for k in range(2):
        got, sr = sf.read(out / f"two_{k}.wav", dtype="float32")
        assert sr == 44100
        assert rel_l2(got, expected[k]) < 1e-5  # other batch sizes: float32 rounding apart
    assert rel_l2(sf.read(out / "neg.wav", dtype="float32")[0], negative) < 1e-5


def test_rerun_redoes_only_what_is_missing(first_run, model_dir):
    jobs, out, _ = first_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.wav")}
    n = len(records(out))
    assert run_batch(jobs, "--model", model_dir, "--out", out, "--backend", "ort-cpu",
                     "--subtype", "FLOAT", "--quiet") == 3
    new = records(out)[n:]
    assert sorted((r["line"], r["status"]) for r in new) == [(4, "failed"), (5, "failed")]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.wav")} == before

    (out / "two_1.wav").unlink()
    n = len(records(out))
    assert run_batch(jobs, "--model", model_dir, "--out", out, "--backend", "ort-cpu",
                     "--subtype", "FLOAT", "--quiet") == 3
    new = records(out)[n:]
    assert sorted((r["line"], r["status"]) for r in new) == [(2, "ok"), (4, "failed"),
                                                            (5, "failed")]
    assert (out / "two_1.wav").is_file() and leftovers(out) == []
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.wav")
            if not p.name.startswith("two_")} == {k: v for k, v in before.items()
                                                  if not k.startswith("two_")}


def test_a_changed_output_or_sample_format_is_redone(first_run, model_dir, tmp_path):
    jobs, out, _ = first_run
    sf.write(out / "neg.wav", np.zeros(100, np.float32), 44100)  # not what was recorded
    n = len(records(out))
    assert run_batch(jobs, "--model", model_dir, "--out", out, "--backend", "ort-cpu",
                     "--subtype", "FLOAT", "--quiet") == 3
    assert sorted(r["line"] for r in records(out)[n:] if r["status"] == "ok") == [6]


def test_usage_errors_exit_2(model_dir, tmp_path, capsys):
    assert run_batch(tmp_path / "none.jsonl", "--model", model_dir, "--out", tmp_path) == 2
    assert capsys.readouterr().err.strip() == \
        f"mmsep-batch: error: {tmp_path / 'none.jsonl'}: job file not found"
    jobs = write_jobs(tmp_path / "j.jsonl", [{"text": "x"}])
    assert run_batch(jobs, "--model", tmp_path, "--out", tmp_path / "o") == 2
    assert "no manifest.json; not an mmsep model directory" in capsys.readouterr().err
    assert run_batch(jobs, "--model", tmp_path / "nope", "--out", tmp_path / "o") == 2
    assert capsys.readouterr().err.strip() == (
        f"mmsep-batch: error: model directory {tmp_path / 'nope'} does not exist (create one "
        "with mmsep-export)")
    assert run_batch(jobs, "--model", model_dir, "--out", tmp_path / "o", "--workers", "0") == 2
    capsys.readouterr()
    assert run_batch(jobs, "--model", model_dir, "--out", tmp_path / "o", "--workers", "4",
                     "--cpus-per-worker", "2") == 2  # sizes of a Ray pool, without --ray
    assert capsys.readouterr().err.strip() == (
        "mmsep-batch: error: --workers and --cpus-per-worker size the Ray pool and need --ray (or "
        "--ray-address); without it the job runs in this process")
    (tmp_path / "o").mkdir(exist_ok=True)
    own = write_jobs(tmp_path / "o" / "results.jsonl", [{"text": "x"}])
    assert run_batch(own, "--model", model_dir, "--out", tmp_path / "o", "-q") == 2
    assert capsys.readouterr().err.strip() == (
        f"mmsep-batch: error: {own}: the job file is --out's results.jsonl, where the results "
        "are added; give another --out or rename the job file")
    assert own.read_text() == '{"text": "x"}\n'


def test_results_that_cannot_be_written_are_exit_2(model_dir, tmp_path, capsys):
    import resource

    jobs = write_jobs(tmp_path / "j.jsonl", ["not json"])
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, limits[1]))  # as a full disk
    try:
        code = run_batch(jobs, "--model", model_dir, "--out", tmp_path / "o", "-q")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"mmsep-batch: error: {tmp_path / 'o' / 'results.jsonl'}: cannot write (File too large)")


def test_bad_fields_fail_their_line_only(model_dir, job_inputs, tmp_path):
    jobs = write_jobs(tmp_path / "j.jsonl", [
        {"mix": str(job_inputs["mix"]), "text": "a", "steps": 1, "output": "a.wav"},
        {"mix": str(job_inputs["mix"]), "text": "a", "steps": 1, "output": "a.wav"},
        {"mix": str(job_inputs["mix"]), "colour": "red"},
        {"mix": str(job_inputs["mix"]), "steps": 0},
        {"mix": str(job_inputs["mix"]), "output": "../escape.wav"},
        {"text": "a", "steps": 1, "generate": "yes"},
        [1, 2],
        {"text": 5, "steps": 1},
        {"text": "a", "steps": 1, "generate": True, "duration": 1e9},
        {"mix": str(job_inputs["mix"]), "text": "a", "steps": 1, "output": "up.FLAC"},
    ])
    jobs.write_bytes(b"\xef\xbb\xbf" + jobs.read_bytes())  # a BOM, as Windows editors write
    out = tmp_path / "out"
    assert run_batch(jobs, "--model", model_dir, "--out", out, "--backend", "ort-cpu", "-q") == 3
    errors = {r["line"]: r["error"] for r in records(out)}
    assert errors == {
        1: None,
        2: "output a.wav is already written by line 1",
        3: "unknown field colour (known: video, mix, text, negative_text, generate, duration, "
           "seed, steps, cfg, output)",
        4: "steps must be an integer between 1 and 1000, got 0",
        5: "output '../escape.wav' must be a file name (no folders) inside --out",
        6: "generate must be true or false",
        7: "a request must be a JSON object",
        8: "text must be a string or a list of strings, got int",
        9: "duration must be a number of seconds from 0.1 to 36000, got 1000000000.0",
        10: None,
    }
    assert sorted(p.name for p in out.iterdir()) == ["a.wav", "results.jsonl", "up.FLAC"]
    assert sf.info(out / "up.FLAC").format == "FLAC"  # the extension in any case picks it


def test_no_line_writes_over_another_lines_input(model_dir, job_inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    precious = out / "precious.wav"
    shutil.copyfile(job_inputs["mix"], precious)
    before = precious.read_bytes()
    jobs = write_jobs(tmp_path / "j.jsonl", [
        {"mix": str(precious), "text": "a", "steps": 1, "output": "first.wav"},
        {"mix": str(job_inputs["mix"]), "text": "a", "steps": 1, "output": "precious.wav"}])
    assert run_batch(jobs, "--model", model_dir, "--out", out, "--backend", "ort-cpu", "-q") == 3
    errors = {r["line"]: r["error"] for r in records(out)}
    assert errors == {1: None, 2: f"output {precious} is the same file as line 1's "
                                  f"mix {precious}; choose another path"}
    assert precious.read_bytes() == before


def test_an_out_that_takes_no_file_is_exit_2(model_dir, job_inputs, tmp_path, capsys,
                                             monkeypatch):
    from mmsep.runtime import atomic

    def refused(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic, "_create_unique", refused)
    jobs = write_jobs(tmp_path / "j.jsonl", [{"mix": str(job_inputs["mix"]), "steps": 1}])
    assert run_batch(jobs, "--model", model_dir, "--out", tmp_path / "o") == 2
    assert capsys.readouterr().err.strip() == (
        f"mmsep-batch: error: --out {tmp_path / 'o'}: cannot write (Permission denied)")


def _interrupt_and_resume(model_dir, job_inputs, tmp_path, sig) -> tuple[list, Path]:
    """Start a job of 12 requests (3 groups of 4) in a subprocess, send ``sig`` once the first
    group's records are in, then check the remains and finish the job with a rerun."""
    lines = [{"mix": str(job_inputs["other"]), "text": "a tone", "seed": s, "steps": 2}
             for s in range(12)]
    jobs = write_jobs(tmp_path / "twelve.jsonl", lines)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mmsep.scale.batch", str(jobs), "--model",
                             str(model_dir), "--out", str(out), "--backend", "ort-cpu", "-q"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "results.jsonl").exists() and records(out):
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    kept = records(out)
    assert 1 <= len(kept) < 12 and all(r["status"] == "ok" for r in kept)
    if sig == signal.SIGINT:
        assert code == 130 and "interrupted" in proc.stderr.read()
        assert leftovers(out) == []
    finals = {r["line"] for r in kept}
    # every recorded result is on disk (a group's files can be in place a moment before all
    # of its records are: those requests are simply redone)
    assert all((out / name).is_file() for r in kept for name in r["outputs"])
    assert run_batch(jobs, "--model", model_dir, "--out", out, "--backend", "ort-cpu", "-q") == 0
    redone = records(out)[len(kept):]
    assert sorted(r["line"] for r in redone) == sorted(set(range(1, 13)) - finals)
    assert leftovers(out) == []
    return kept, out


def test_interrupted_job_is_finished_by_a_rerun(model_dir, job_inputs, tmp_path):
    _interrupt_and_resume(model_dir, job_inputs, tmp_path, signal.SIGINT)


@pytest.mark.slow
def test_killed_job_leaves_nothing_after_the_rerun(model_dir, job_inputs, tmp_path):
    _interrupt_and_resume(model_dir, job_inputs, tmp_path, signal.SIGKILL)


def test_progress_and_summary(model_dir, job_inputs, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "j.jsonl", [{"mix": str(job_inputs["other"]), "steps": 1},
                                             "not json"])
    assert run_batch(jobs, "--model", model_dir, "--out", tmp_path / "o", "--backend",
                     "ort-cpu") == 3
    err = capsys.readouterr().err
    assert "done 1, failed 1, remaining 0" in err
    assert "mmsep-batch: 1 done, 0 skipped (done before), 1 failed; 1.5 s of audio" in err
    assert os.path.isfile(tmp_path / "o" / "1_other_separated.wav")


def test_warnings_are_one_line_each_and_quiet_hides_them(model_dir, tmp_path, capsys):
    loud = tmp_path / "loud.wav"
    sf.write(loud, 1.5 * np.sin(np.linspace(0, 900, 44100, dtype=np.float32)), 44100,
             subtype="FLOAT")
    jobs = write_jobs(tmp_path / "j.jsonl", [{"mix": "loud.wav", "text": "a", "steps": 1}])
    assert run_batch(jobs, "--model", model_dir, "--out", tmp_path / "o", "--backend",
                     "ort-cpu") == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "clipped" in line]
    assert len(warned) == 1 and warned[0].startswith(f"mmsep-batch: warning: {loud}: "), warned
    assert run_batch(jobs, "--model", model_dir, "--out", tmp_path / "q", "--backend",
                     "ort-cpu", "-q") == 0
    assert capsys.readouterr().err == ""


def test_an_output_that_is_an_input_by_another_name_fails_its_line(model_dir, job_inputs,
                                                                   tmp_path):
    """A hard link in --out to a line's mixture is the same file: refused, the input intact."""
    out = tmp_path / "out"
    out.mkdir()
    mix = tmp_path / "mix.wav"
    shutil.copyfile(job_inputs["mix"], mix)
    os.link(mix, out / "linked.wav")
    before = mix.read_bytes()
    jobs = write_jobs(tmp_path / "j.jsonl", [{"mix": str(mix), "text": "a", "steps": 1,
                                              "output": "linked.wav"}])
    assert run_batch(jobs, "--model", model_dir, "--out", out, "--backend", "ort-cpu", "-q") == 3
    [record] = records(out)
    assert record["error"] == (f"output {out / 'linked.wav'} is the same file as mix "
                               f"{mix}; choose another path")
    assert mix.read_bytes() == before


def test_backend_options_reach_every_worker(model_dir, job_inputs, tmp_path, capsys):
    """--precision is mmsep-run's: fp16 asked of a model without fp16 graphs is refused (exit 2,
    the one-line reason) before any request runs; fp32 runs."""
    bare = without_fp16_copies(model_dir, tmp_path / "fp32_only")
    jobs = write_jobs(tmp_path / "j.jsonl", [{"mix": str(job_inputs["other"]), "steps": 1}])
    assert run_batch(jobs, "--model", bare, "--out", tmp_path / "o", "--backend", "ort-cpu",
                     "--precision", "fp16", "-q") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmsep-batch: ") and "has no fp16 graphs" in err, err
    assert len(err.splitlines()) == 1 and not list((tmp_path / "o").glob("*.wav"))
    assert run_batch(jobs, "--model", bare, "--out", tmp_path / "o", "--backend", "ort-cpu",
                     "--precision", "fp32", "--threads", "1", "--no-verify", "-q") == 0


def test_an_output_name_taken_by_a_directory_fails_only_its_line(model_dir, job_inputs, tmp_path):
    jobs = write_jobs(job_inputs["root"] / "dir-out.jsonl", [
        {"mix": "mix.wav", "text": "a tone", "steps": 1, "output": "taken.wav"},
        {"mix": "other.wav", "text": "a tone", "steps": 1, "output": "free.wav"}])
    out = tmp_path / "out"
    (out / "taken.wav").mkdir(parents=True)
    assert run_batch(jobs, "--model", model_dir, "--out", out, "--quiet") == 3
    got = {r["line"]: r for r in records(out)}
    assert got[1]["status"] == "failed"
    assert got[1]["error"] == "output taken.wav is a directory in --out; give another name"
    assert got[2]["status"] == "ok" and (out / "free.wav").is_file()


def test_an_output_that_cannot_be_written_fails_only_its_line(model_dir, job_inputs, tmp_path):
    """A write refused by the system (here the file size limit, as a full disk) fails that
    request; the others of its group are written and recorded, exit 3."""
    import resource

    sf.write(tmp_path / "long.wav", np.tile(sf.read(job_inputs["mix"])[0], 4), 44100)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"mix": str(tmp_path / "long.wav"), "text": "a tone", "steps": 1, "output": "big.wav"},
        {"mix": "mix.wav", "text": "a tone", "steps": 1, "output": "small.wav"},
        {"mix": "other.wav", "text": "a tone", "steps": 1, "output": "other.wav"}])
    shutil.copy(job_inputs["mix"], tmp_path / "mix.wav")
    shutil.copy(job_inputs["other"], tmp_path / "other.wav")
    out = tmp_path / "out"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, limits[1]))  # big.wav takes 882 kB
    try:
        code = run_batch(jobs, "--model", model_dir, "--out", out, "--backend", "ort-cpu", "-q")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert code == 3
    got = {r["line"]: r for r in records(out)}
    assert got[1]["status"] == "failed" and got[1]["error"].startswith("big.wav: cannot write (")
    assert got[2]["status"] == got[3]["status"] == "ok"
    assert sorted(p.name for p in out.iterdir()) == ["other.wav", "results.jsonl", "small.wav"]


def test_a_damaged_results_file_redoes_its_lines_without_failing(tmp_path):
    """results.jsonl damaged by hand or by a disk (bytes that are not UTF-8, fields of the wrong
    type): the damaged records count as not done and the others are kept (it was an internal
    error, exit 1)."""
    from mmsep.model_files import sha256_file
    from mmsep.scale.jobs import Job, Results

    (tmp_path / "0.wav").write_bytes(b"zero")
    (tmp_path / "1.wav").write_bytes(b"one")
    jobs = [Job(n, "k", {}, (f"{n}.wav",)) for n in range(4)]
    good = {"line": 0, "key": "k", "status": "ok", "outputs": ["0.wav"],
            "sha256": [sha256_file(tmp_path / "0.wav")]}
    records = [json.dumps(good).encode(), b'{"line": 1, "key": "k", "status": "ok", "outputs": '
               b'["1.wav"], "sha256": null}', b'{"line": 2, "outputs": null, "status": "ok"}',
               b'{"line": "three"}', b'{"line": 3, "text": "\xff\xfe"}']
    (tmp_path / "results.jsonl").write_bytes(b"\n".join(records) + b"\n")
    results = Results(tmp_path)
    latest = results.latest()
    assert sorted(latest) == [0, 1, 2, 3]
    assert [results.is_done(job, latest.get(job.line)) for job in jobs] == \
        [True, False, False, False]


def test_a_line_refused_for_one_output_claims_none(tmp_path):
    """A line whose second output is refused writes nothing, so its first output's name stays
    free for a later line (it was refused as 'already written by line 1')."""
    from mmsep.runtime.errors import InputError
    from mmsep.scale.jobs import Job, check_outputs

    (tmp_path / "taken").mkdir()
    taken: dict[str, int] = {}
    with pytest.raises(InputError, match="output taken is a directory"):
        check_outputs(Job(1, "k", {"text": ["a", "b"]}, ("a.wav", "taken")), tmp_path, taken)
    check_outputs(Job(2, "k", {"text": "a"}, ("a.wav",)), tmp_path, taken)
    assert taken == {"a.wav": 2}
