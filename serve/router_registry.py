"""The request routers Ray Serve made in this process, by deployment name. Ray pickles a router's own module by
value into the process that routes, so what that process's other code reads of its routers lives here instead."""

from __future__ import annotations

import weakref

ROUTERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def replica_actor_names(deployment: str) -> list[str]:
    """The Ray actor names of `deployment`'s running replicas, as this process's router for it knows them (none
    yet: [])."""
    router = ROUTERS.get(deployment)
    return [replica_id.to_full_id_str() for replica_id in router.curr_replicas] if router is not None else []
