"""mmsep-batch --ray: the pending requests stream through Ray Data to a pool of actors, each
holding one Separator (one GPU each where the cluster has GPUs); records stream back to the
driver, which appends them to results.jsonl as they arrive.

Outputs are written by the actors straight into the output folder, so on a cluster it must be a
shared file system (as must the inputs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .jobs import Job
from .worker import JobWorker, job_from_json, job_to_json


class _RayWorker:
    """Ray Data callable class: a batch of serialised jobs -> their records (as JSON)."""

    def __init__(self, model_dir: str, out_dir: str, worker_options: dict):
        self.worker = JobWorker(model_dir, out_dir, **worker_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import json

        jobs = [job_from_json(str(text)) for text in batch["job"]]
        records = self.worker.run(jobs)
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def run_on_ray(jobs: list[Job], model_dir, out_dir, worker_options: dict, *,
               address: str | None, workers: int, cpus_per_worker: float) -> Iterator[dict]:
    """Yield each job's record as the pool finishes it."""
    if not jobs:
        return
    import json
    import logging

    import ray

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # mmsep-batch shows the progress
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        on_gpu = (ray.cluster_resources().get("GPU", 0) >= 1
                  and worker_options["backend_options"].backend != "ort-cpu")
        resources = {"num_gpus": 1} if on_gpu else {"num_cpus": cpus_per_worker}
        # requests per actor call: up to the model's max batch (their items can fill one
        # batch), fewer when that keeps some of the pool idle
        batch_size = max(1, min(_max_batch(model_dir), -(-len(jobs) // workers)))
        dataset = ray.data.from_items([{"job": job_to_json(job)} for job in jobs],
                                      override_num_blocks=-(-len(jobs) // batch_size))
        dataset = dataset.map_batches(
            _RayWorker, fn_constructor_args=(str(Path(model_dir).resolve()),
                                             str(Path(out_dir).resolve()), worker_options),
            batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers), **resources)
        for row in dataset.iter_rows():
            yield json.loads(row["record"])
    finally:
        if started_here:
            ray.shutdown()


def _max_batch(model_dir) -> int:
    """Requests per actor call: the model's max batch, so their items can fill one batch."""
    from mmsep.runtime import ModelDir

    return ModelDir(model_dir, verify=False).info.max_batch
