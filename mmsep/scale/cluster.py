"""Joining a Ray cluster, and what it has room for: an actor that asks for more than it has
waits for ever."""

from __future__ import annotations

import os

from mmsep.runtime.errors import InputError, one_line


def init_ray(ray, address: str | None, **options) -> None:
    """``ray.init``; an address (``--ray-address``, else ``RAY_ADDRESS``) where no cluster
    answers, or that does not parse, is bad usage (InputError), not an internal failure."""
    try:
        ray.init(address=address, **options)
    except (ConnectionError, ValueError) as exc:
        if address:
            given = f"--ray-address {address}"
        elif os.environ.get("RAY_ADDRESS"):
            given = f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
        else:  # starting a local instance failed: no address of the user's to blame
            raise
        raise InputError(f"{given}: no Ray cluster to join ({one_line(exc)})") from None


def actors_that_fit(cluster: dict, cpus: float, gpus: float) -> int:
    """How many actors of ``cpus`` CPUs and ``gpus`` GPUs each the cluster's totals
    (``ray.cluster_resources()``) hold at once."""
    counts = [int(cluster.get(name, 0) / want + 1e-9)
              for name, want in (("CPU", cpus), ("GPU", gpus)) if want > 0]
    return min(counts) if counts else 1 << 30


def describe(cluster: dict) -> str:
    return f"{cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs"
