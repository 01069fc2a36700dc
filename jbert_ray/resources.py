"""Sizing Ray Data actor pools so they never starve the read tasks.

On a 2-CPU machine a read plus a 2-actor pool at 1 CPU each deadlocks silently (the actors hold both CPUs and
the read never runs). Actors therefore ask for slightly less than a CPU each, and reads for 0.1 CPU."""

from __future__ import annotations

ACTOR_CPUS = 0.85  # per actor: one pool per CPU still leaves room for reads and the writer


def cluster_cpus() -> int:
    """Whole CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def actor_pool(num_actors: int = 0):
    """An ActorPoolStrategy with `num_actors` actors (0 = one per CPU of the cluster)."""
    import ray.data

    return ray.data.ActorPoolStrategy(size=num_actors or cluster_cpus())
