"""mmsep-batch --ray: the same job on a local Ray instance with a pool of two actors."""

from __future__ import annotations

import json

import pytest

from mmsep.model_files import sha256_file
from tests.scale.conftest import six_requests, write_jobs
from tests.scale.test_batch import leftovers, records, run_batch


def test_ray_pool_runs_the_job_and_resumes_it(local_ray, model_dir, job_inputs, tmp_path):
    jobs = write_jobs(job_inputs["root"] / "six-ray.jsonl", six_requests(job_inputs))
    out = tmp_path / "out"
    assert run_batch(jobs, "--model", model_dir, "--out", out, "--backend", "ort-cpu", "--ray",
                     "--workers", "2", "--cpus-per-worker", "1", "-q") == 3
    got = {r["line"]: r for r in records(out)}
    assert {n: r["status"] for n, r in got.items()} == \
        {1: "ok", 2: "ok", 3: "ok", 4: "failed", 5: "failed", 6: "ok"}
    assert got[4]["error"] == f"{job_inputs['root'] / 'missing.wav'}: file not found"
    assert [got[n]["outputs"] for n in (1, 2, 3, 6)] == [
        ["1_mix_separated.wav"], ["two_0.wav", "two_1.wav"], ["3_generated.wav"], ["neg.wav"]]
    for record in got.values():
        for name, digest in zip(record["outputs"], record["sha256"]):
            assert sha256_file(out / name) == digest
    assert leftovers(out) == []
    # a rerun on Ray redoes only the two bad lines; after deleting an output, that request too
    n = len(records(out))
    assert run_batch(jobs, "--model", model_dir, "--out", out, "--ray", "--backend", "ort-cpu",
                     "-q") == 3
    assert sorted(r["line"] for r in records(out)[n:]) == [4, 5]
    (out / "neg.wav").unlink()
    n = len(records(out))
    assert run_batch(jobs, "--model", model_dir, "--out", out, "--ray", "--backend", "ort-cpu",
                     "-q") == 3
    assert sorted((r["line"], r["status"]) for r in records(out)[n:]) == \
        [(4, "failed"), (5, "failed"), (6, "ok")]


def test_records_come_back_as_each_group_finishes(local_ray, model_dir, job_inputs, tmp_path):
    from mmsep.runtime import ModelDir
    from mmsep.runtime.backend_options import BackendOptions
    from mmsep.scale.jobs import parse_job
    from mmsep.scale.ray_batch import run_on_ray

    size = ModelDir(model_dir, verify=False).info.max_batch
    lines = [{"mix": "other.wav", "text": "a tone", "seed": k, "steps": 1, "output": f"{k}.wav"}
             for k in range(size + 1)]  # one worker: a group of max_batch requests, then one
    jobs = [parse_job(n, json.dumps(line), job_inputs["root"], "salt")
            for n, line in enumerate(lines, 1)]
    out = tmp_path / "out"
    out.mkdir()
    stream = run_on_ray(jobs, model_dir, out, {"backend_options": BackendOptions("ort-cpu")},
                        address=None, workers=1, cpus_per_worker=1)
    first = [next(stream) for _ in range(size)]
    assert [r["status"] for r in first] == ["ok"] * size
    assert not (out / f"{size}.wav").exists()  # the last group has not run yet
    assert [r["line"] for r in stream] == [size + 1]


def test_a_model_that_does_not_load_on_the_actors_is_one_line(local_ray, model_dir, job_inputs,
                                                               tmp_path, capsys):
    import shutil

    model = tmp_path / "tampered"
    shutil.copytree(model_dir, model)
    data = bytearray((model / "vocoder.onnx").read_bytes())
    data[100] ^= 1  # same size: only the actors' hash check can find it
    (model / "vocoder.onnx").write_bytes(bytes(data))
    jobs = write_jobs(job_inputs["root"] / "one-ray.jsonl", six_requests(job_inputs)[:1])
    assert run_batch(jobs, "--model", model, "--out", tmp_path / "out", "--backend", "ort-cpu",
                     "--ray", "--workers", "1", "-q") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmsep-batch: error: ") and "tampered or incomplete" in err
    assert len(err.splitlines()) == 1


def test_quiet_prints_nothing_when_it_starts_its_own_ray(model_dir, job_inputs, tmp_path):
    """-q also silences Ray's own start-up warnings (its token-authentication notice)."""
    import os
    import subprocess
    import sys

    jobs = write_jobs(job_inputs["root"] / "quiet-ray.jsonl", six_requests(job_inputs)[:1])
    env = dict(os.environ, RAY_memory_monitor_refresh_ms="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", "from mmsep.scale.batch import main; main()", str(jobs),
         "--model", str(model_dir), "--out", str(tmp_path / "out"), "--backend", "ort-cpu",
         "--ray", "--workers", "1", "--cpus-per-worker", "1", "-q"],
        capture_output=True, text=True, env=env, timeout=300)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert [r["status"] for r in records(tmp_path / "out")] == ["ok"]


def test_room_for_workers_and_replicas_in_the_cluster(capsys):
    from mmsep.runtime.errors import InputError
    from mmsep.scale.cluster import actors_that_fit
    from mmsep.scale.ray_batch import _workers_that_fit
    from mmsep.scale.serve_cli import _check_fits

    cluster = {"CPU": 2.0, "GPU": 1.0}
    assert actors_that_fit(cluster, 0.5, 0) == 4 and actors_that_fit(cluster, 1, 1) == 1
    assert actors_that_fit({"CPU": 2.0}, 1, 1) == 0
    assert _workers_that_fit(cluster, {"num_cpus": 1}, 2, quiet=False) == 2
    assert capsys.readouterr().err == ""
    assert _workers_that_fit(cluster, {"num_cpus": 1}, 4, quiet=False) == 2
    assert capsys.readouterr().err == ("mmsep-batch: the Ray cluster has room for 2 of the 4 "
                                       "workers (2 CPUs and 1 GPUs); running 2\n")
    with pytest.raises(InputError, match="a worker needs 4 CPUs and 0 GPUs .*: the Ray cluster "
                                         "has 2 CPUs and 1 GPUs in all"):
        _workers_that_fit(cluster, {"num_cpus": 4}, 1, quiet=True)
    _check_fits(cluster, 1.0, 0.0, 2)
    with pytest.raises(InputError, match=r"^3 replica\(s\) of --cpus-per-replica 1 and "
                                         r"--gpus-per-replica 0: the Ray cluster has 2 CPUs and "
                                         r"1 GPUs in all, room for 2$"):
        _check_fits(cluster, 1.0, 0.0, 3)


@pytest.mark.slow
def test_a_worker_that_dies_fails_its_group_and_the_rest_goes_on(local_ray, model_dir,
                                                                   job_inputs, tmp_path):
    """An actor killed mid-group (as by the kernel's OOM killer): that group's requests are
    recorded as failed, the other group's are written. Slow: it depends on catching a worker
    busy, which on a loaded machine can take long."""
    import os
    import signal
    import threading
    import time
    from pathlib import Path

    from mmsep.runtime.backend_options import BackendOptions
    from mmsep.scale.jobs import parse_job
    from mmsep.scale.ray_batch import WORKER_DIED, run_on_ray

    lines = [{"mix": "other.wav", "text": "a tone", "seed": k, "steps": 1000,
              "output": f"{k}.wav"} for k in range(4)]  # two groups of two, one per actor
    jobs = [parse_job(n, json.dumps(line), job_inputs["root"], "salt")
            for n, line in enumerate(lines, 1)]
    out = tmp_path / "out"
    out.mkdir()
    killed = []

    def kill_one_busy_worker():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            busy = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
                    if b"_RayWorker.run" in _read(p)]
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_busy_worker)
    killer.start()
    got = list(run_on_ray(jobs, model_dir, out, {"backend_options": BackendOptions("ort-cpu")},
                          address=None, workers=2, cpus_per_worker=1))
    killer.join()
    assert killed
    status = {r["line"]: r["status"] for r in got}
    assert sorted(status) == [1, 2, 3, 4]
    failed = sorted(n for n, s in status.items() if s == "failed")
    assert failed in ([1, 2], [3, 4])
    assert all(r["error"].startswith(WORKER_DIED) for r in got if r["status"] == "failed")
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert written == sorted(f"{n - 1}.wav" for n in status if n not in failed)


def _read(path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a process that ended meanwhile
        return b""


@pytest.mark.parametrize("program, address, says", [
    ("batch", "ray://127.0.0.1:{port}", "--ray-address ray://127.0.0.1:{port}: no Ray cluster "
                                        "to join (ray client connection timeout)"),
    ("serve_cli", "127.0.0.1:notaport", "--ray-address 127.0.0.1:notaport: no Ray cluster to "
                                        "join (Unable to parse port number"),
])
def test_a_ray_address_with_no_cluster_is_bad_usage(model_dir, job_inputs, tmp_path, program,
                                                    address, says):
    """("auto" is no test: it finds any Ray instance running on the machine.)"""
    import os
    import socket
    import subprocess
    import sys

    pytest.importorskip("ray", reason="the ray extra is not installed")
    jobs = write_jobs(job_inputs["root"] / "no-cluster.jsonl", six_requests(job_inputs)[:1])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free: nothing answers there
    address, says = address.format(port=port), says.format(port=port)
    args = {"batch": [str(jobs), "--out", str(tmp_path / "out"), "-q"],
            "serve_cli": ["--port", str(port)]}[program]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", f"mmsep.scale.{program}", *args, "--model", str(model_dir),
         "--ray-address", address], capture_output=True, text=True, env=env, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert err.startswith(f"mmsep-{program.split('_')[0]}: error: {says}")
    assert len(err.splitlines()) == 1
