"""Ray Serve request routers for the model replicas, running in the front deployment's process.

`PowerOfTwoRouter` is Ray's default routing (two random replicas, the less loaded wins), plus requests aimed at one
replica by its id (`/metrics` asks each replica). `CacheAffinityRouter` first offers a request to the replica that
served the longest of its cache-affinity prefixes (serve/affinity.py) when that replica has a free slot, and falls
back to the default otherwise; it learns from every request it routes."""

from __future__ import annotations

from collections import OrderedDict

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from llava_rt.serve import router_registry

MAX_REMEMBERED_PREFIXES = 1 << 16


class PowerOfTwoRouter(PowerOfTwoChoicesRequestRouter):
    """Ray's default routing; a request with a `replica` keyword goes to that replica only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        router_registry.ROUTERS[self._deployment_id.name] = self

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get("replica") if pending_request is not None else None
        if target is not None:
            return [[replica for replica in candidate_replicas if replica.replica_id.unique_id == target]]
        return await super().choose_replicas(candidate_replicas, pending_request)


class CacheAffinityRouter(PowerOfTwoRouter):
    """Sends a request to the replica that served its longest known prefix, if that replica has room."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._holder: OrderedDict[str, ReplicaID] = OrderedDict()  # prefix key -> the replica that last served it

    def _affine(self, pending_request: PendingRequest | None) -> ReplicaID | None:
        keys = pending_request.kwargs.get("affinity", ()) if pending_request is not None else ()
        for key in reversed(keys):
            holder = self._holder.get(key)
            if holder is not None and holder in self._replicas:
                return holder
        return None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        holder = self._affine(pending_request)
        if holder is None or pending_request.kwargs.get("replica") is not None:
            return ranks
        # a full holder is skipped by Ray (its queue length is at max_ongoing_requests) and the next rank is tried
        return [[self._replicas[holder]], *ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        for key in pending_request.kwargs.get("affinity", ()):
            self._holder[key] = replica_id
            self._holder.move_to_end(key)
        while len(self._holder) > MAX_REMEMBERED_PREFIXES:
            self._holder.popitem(last=False)
