"""mmsep-batch --ray: the same job on a local Ray instance with a pool of two actors."""

from __future__ import annotations

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
