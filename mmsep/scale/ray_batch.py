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

import sys
from collections.abc import Iterator
from pathlib import Path

from mmsep.runtime.atomic import remove_stale_partials
from mmsep.runtime.errors import InputError

from .cluster import actors_that_fit, describe, init_ray
from .jobs import Job, failed_record
from .worker import JobWorker, job_from_json, job_to_json

WORKER_DIED = ("the Ray worker running this request's group died (killed, or out of memory); "
               "nothing was written, a rerun redoes it: ")


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

    from mmsep.console import terminate_as_interrupt

    started_here = not ray.is_initialized()
    if started_here:
        if quiet:  # Ray's own start-up warnings go through the "ray" logger, unconfigured here
            logging.getLogger("ray").setLevel(logging.ERROR)
        init_ray(ray, address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, logging_level=logging.ERROR if quiet else logging.INFO)
    try:
        with terminate_as_interrupt():  # again: ray.init installed its own SIGTERM handler
            cluster = ray.cluster_resources()
            on_gpu = (cluster.get("GPU", 0) >= 1
                      and worker_options["backend_options"].backend != "ort-cpu")
            resources = {"num_gpus": 1} if on_gpu else {"num_cpus": cpus_per_worker}
            workers = _workers_that_fit(cluster, resources, workers, quiet)
            actor = ray.remote(**resources)(_RayWorker)
            paths = (str(Path(model_dir).resolve()), str(Path(out_dir).resolve()))
            yield from _run_groups(ray, lambda: actor.remote(*paths, worker_options), workers,
                                   _groups(jobs, model_dir, workers))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause  # the worker's own exception, as in process
        raise (cause if isinstance(cause, Exception) else exc) from None
    finally:
        if started_here:
            ray.shutdown()
            remove_stale_partials(out_dir, wait_s=10.0)  # what the stopped actors were writing


def _workers_that_fit(cluster: dict, resources: dict, workers: int, quiet: bool) -> int:
    """Actors beyond what the cluster holds would never start, and their groups never run."""
    room = actors_that_fit(cluster, resources.get("num_cpus", 0), resources.get("num_gpus", 0))
    if room == 0:
        raise InputError(f"a worker needs {resources.get('num_cpus', 0):g} CPUs and "
                         f"{resources.get('num_gpus', 0):g} GPUs (--cpus-per-worker): the Ray "
                         f"cluster has {describe(cluster)} in all")
    if room < workers and not quiet:
        print(f"mmsep-batch: the Ray cluster has room for {room} of the {workers} workers "
              f"({describe(cluster)}); running {room}", file=sys.stderr)
    return min(room, workers)


def _run_groups(ray, new_actor, workers: int, groups: list[list[Job]]) -> Iterator[dict]:
    """Each group to an idle actor, its records yielded when it finishes. A group whose actor
    died (killed, out of memory) is recorded as failed and the actor replaced, so the other
    groups go on; a task that raised (a model that does not load) ends the run."""
    pending, running = groups[::-1], {}
    idle = [new_actor() for _ in range(min(workers, len(groups)))]
    while pending or running:
        while idle and pending:
            actor, group = idle.pop(), pending.pop()
            running[actor.run.remote([job_to_json(job) for job in group])] = (actor, group)
        (done,), _ = ray.wait(list(running), num_returns=1)
        actor, group = running.pop(done)
        try:
            records = ray.get(done)
        except ray.exceptions.RayActorError as exc:
            reason = " ".join(str(exc).split())[:160]
            yield from ({**failed_record(job.line, job.key, exc), "error": WORKER_DIED + reason}
                        for job in group)
            idle.append(new_actor())
            continue
        idle.append(actor)
        yield from records


def _groups(jobs: list[Job], model_dir, workers: int) -> list[list[Job]]:
    """The requests of each actor call: up to the model's max batch (their items can fill
    one batch), fewer when that keeps some of the pool idle."""
    from mmsep.runtime import ModelDir

    size = max(1, min(ModelDir(model_dir, verify=False).info.max_batch,
                      -(-len(jobs) // workers)))
    return [jobs[start:start + size] for start in range(0, len(jobs), size)]
