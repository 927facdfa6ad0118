"""mmsep-batch --ray: the pending requests go, in groups, to a pool of Ray actors, each holding
one Separator (one GPU each where the cluster has GPUs); each group's records come back to the
driver as soon as its actor finishes it, and the driver appends them to results.jsonl.

Groups, not a Ray Data pipeline: Ray Data hands a task's results back only when the task ends,
so an interrupted job lost every record of the requests already written. Here at most the groups
in flight (one per actor) are lost, as in process.

Outputs are written by the actors straight into the output folder, so on a cluster it must be a
shared file system (as must the inputs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .jobs import Job
from .worker import JobWorker, job_from_json, job_to_json


class _RayWorker:
    """A pool actor. A model that does not load is raised by ``run`` as the task's error, which
    the driver unwraps (an actor whose constructor fails dies without its exception)."""

    def __init__(self, model_dir: str, out_dir: str, worker_options: dict):
        try:
            self.worker, self.error = JobWorker(model_dir, out_dir, **worker_options), None
        except Exception as exc:  # noqa: BLE001 - raised again by run
            self.worker, self.error = None, exc

    def run(self, jobs: list[str]) -> list[dict]:
        if self.error is not None:
            raise self.error
        return self.worker.run([job_from_json(text) for text in jobs])


def run_on_ray(jobs: list[Job], model_dir, out_dir, worker_options: dict, *,
               address: str | None, workers: int, cpus_per_worker: float,
               quiet: bool = False) -> Iterator[dict]:
    """Yield each job's record as the pool finishes its group."""
    if not jobs:
        return
    import logging

    import ray
    from ray.util import ActorPool

    from mmsep.console import terminate_as_interrupt

    started_here = not ray.is_initialized()
    if started_here:
        if quiet:  # Ray's own start-up warnings go through the "ray" logger, unconfigured here
            logging.getLogger("ray").setLevel(logging.ERROR)
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False,
                 logging_level=logging.ERROR if quiet else logging.INFO)
    try:
        with terminate_as_interrupt():  # again: ray.init installed its own SIGTERM handler
            on_gpu = (ray.cluster_resources().get("GPU", 0) >= 1
                      and worker_options["backend_options"].backend != "ort-cpu")
            resources = {"num_gpus": 1} if on_gpu else {"num_cpus": cpus_per_worker}
            actor = ray.remote(**resources)(_RayWorker)
            paths = (str(Path(model_dir).resolve()), str(Path(out_dir).resolve()))
            pool = ActorPool([actor.remote(*paths, worker_options) for _ in range(workers)])
            for records in pool.map_unordered(lambda a, group: a.run.remote(group),
                                              _groups(jobs, model_dir, workers)):
                yield from records
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause  # the worker's own exception, as in process
        raise (cause if isinstance(cause, Exception) else exc) from None
    finally:
        if started_here:
            ray.shutdown()


def _groups(jobs: list[Job], model_dir, workers: int) -> list[list[str]]:
    """Serialised requests per actor call: up to the model's max batch (their items can fill
    one batch), fewer when that keeps some of the pool idle."""
    from mmsep.runtime import ModelDir

    size = max(1, min(ModelDir(model_dir, verify=False).info.max_batch,
                      -(-len(jobs) // workers)))
    return [[job_to_json(job) for job in jobs[start:start + size]]
            for start in range(0, len(jobs), size)]
