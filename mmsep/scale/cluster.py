"""What a Ray cluster has room for: an actor that asks for more than it has waits for ever."""

from __future__ import annotations


def actors_that_fit(cluster: dict, cpus: float, gpus: float) -> int:
    """How many actors of ``cpus`` CPUs and ``gpus`` GPUs each the cluster's totals
    (``ray.cluster_resources()``) hold at once."""
    counts = [int(cluster.get(name, 0) / want + 1e-9)
              for name, want in (("CPU", cpus), ("GPU", gpus)) if want > 0]
    return min(counts) if counts else 1 << 30


def describe(cluster: dict) -> str:
    return f"{cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs"
