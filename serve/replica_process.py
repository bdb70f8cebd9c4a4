"""The model replica loaded in this process, for what the front runs here through Ray's `__ray_call__` rather than
as a Ray Serve request: Ray Serve counts every request to a replica against its `max_ongoing_requests`, so a
metrics scrape sent as one waited for a free slot, and under full load never got one."""

from __future__ import annotations

REPLICA = None  # the ModelReplica this process loaded (set by its constructor)


def replica_metrics(_actor) -> tuple[str, str]:
    """This process's replica id and its metrics in Prometheus' text format (`_actor`: the Ray Serve replica actor
    `__ray_call__` passes in)."""
    if REPLICA is None:
        raise RuntimeError("no model replica is loaded in this process")
    return REPLICA.metrics()
