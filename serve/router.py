"""Ray Serve request routers for the model replicas, running in the front deployment's process.

`PowerOfTwoRouter` is Ray's default routing (two random replicas, the less loaded wins), registered in
serve/router_registry.py for the front's `/metrics` to list the replicas. `CacheAffinityRouter` routes requests
that have cache-affinity keys (serve/affinity.py): to the replica that served the longest of them when that
replica has a free slot, else to the replica holding the fewest conversations; it learns from every request it
routes. Requests without keys (short prompts) get the default routing."""

from __future__ import annotations

from collections import Counter, OrderedDict

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from llava_rt.serve import router_registry

MAX_REMEMBERED_PREFIXES = 1 << 16


class PowerOfTwoRouter(PowerOfTwoChoicesRequestRouter):
    """Ray's default routing, registered by deployment name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        router_registry.ROUTERS[self._deployment_id.name] = self


class CacheAffinityRouter(PowerOfTwoRouter):
    """Sends a request to the replica that served its longest known prefix, if that replica has room. A request
    none of whose prefixes is known (a new conversation) goes to the replica holding the fewest conversations, so
    that each replica's slots, which are its prefix cache, are shared by as few conversations as can be."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._holder: OrderedDict[str, ReplicaID] = OrderedDict()  # prefix key -> the replica that last served it
        self._openings: OrderedDict[str, ReplicaID] = OrderedDict()  # a conversation's first key -> its replica
        self._conversations: Counter[ReplicaID] = Counter()  # conversations (first keys) each replica holds

    def _affine(self, keys: tuple[str, ...]) -> ReplicaID | None:
        for key in reversed(keys):
            holder = self._holder.get(key)
            if holder is not None and holder in self._replicas:
                return holder
        return None

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        keys = pending_request.kwargs.get("affinity", ()) if pending_request is not None else ()
        if not keys:
            return await super().choose_replicas(candidate_replicas, pending_request)
        # one replica per rank: a full one is skipped by Ray (its queue is at max_ongoing_requests), the next tried
        fewest_first = sorted(candidate_replicas, key=lambda replica: self._conversations[replica.replica_id])
        holder = self._affine(keys)
        if holder is None:
            return [[replica] for replica in fewest_first]
        return [[self._replicas[holder]], *([replica] for replica in fewest_first if replica.replica_id != holder)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        keys = pending_request.kwargs.get("affinity", ())
        for key in keys:
            self._holder[key] = replica_id
            self._holder.move_to_end(key)
        while len(self._holder) > MAX_REMEMBERED_PREFIXES:
            self._holder.popitem(last=False)
        if keys:
            self._hold_conversation(keys[0], replica_id)

    def _hold_conversation(self, opening: str, replica_id: ReplicaID) -> None:
        previous = self._openings.pop(opening, None)
        if previous is not None:
            self._conversations[previous] -= 1
        self._openings[opening] = replica_id
        self._conversations[replica_id] += 1
        while len(self._openings) > MAX_REMEMBERED_PREFIXES:
            self._conversations[self._openings.popitem(last=False)[1]] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._conversations.pop(replica_id, None)
