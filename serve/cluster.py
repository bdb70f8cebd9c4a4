"""`llava-serve --replicas N`: the server as a Ray Serve application, on a local Ray cluster started (and stopped)
with it, or on an existing cluster joined by address. Ray is imported only here and in what this loads."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading

from llava_rt.runtime.console import one_line
from llava_rt.runtime.errors import LlavaRtError

from .config import ClusterConfig, ServeConfig

logger = logging.getLogger("llava_rt.serve")


def _local_cpus(cluster: ClusterConfig) -> int:
    """The CPUs a local cluster offers: the machine's, or as many as the replicas reserve if that is more."""
    most = cluster.most_replicas
    needed = math.ceil(most * cluster.replica_cpus)
    cores = os.cpu_count() or 1
    if needed > cores:
        logger.warning("%d replicas x %g CPUs reserve more than this machine's %d cores", most, cluster.replica_cpus, cores)
    return max(cores, needed)


def serve_replicas(config: ServeConfig, cluster: ClusterConfig, host: str, port: int, log_level: str) -> None:
    """Deploy the app's replicas and serve until SIGINT or SIGTERM; then stop what was started."""
    import ray
    from ray import serve

    from .deployment import APP_NAME, application

    level = log_level.upper()
    try:
        if cluster.ray_address is None:
            ray.init(num_cpus=_local_cpus(cluster), include_dashboard=False, logging_level=level, log_to_driver=False)
        else:
            ray.init(address=cluster.ray_address, logging_level=level, log_to_driver=False)
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
        raise LlavaRtError(f"could not start or join Ray: {one_line(exc)}") from exc
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # Ray's own handler would abort without cleaning up
    try:
        try:
            serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": level})
        except ray.exceptions.RayError as exc:  # its HTTP proxy failed: the port is taken, or the node is too slow
            cause = getattr(exc, "cause", None) or exc
            raise LlavaRtError(f"Ray Serve's HTTP proxy did not start on {host}:{port}: {one_line(cause)}") from exc
        try:
            serve.run(application(config, cluster), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica failed to start (its log says why)
            raise LlavaRtError(f"the replicas did not start: {one_line(exc)}") from exc
        logger.info("serving %s on http://%s:%d with %d replicas", config.served_model_name, host, port, cluster.replicas)
        threading.Event().wait()
    except KeyboardInterrupt:  # SIGINT or SIGTERM, while deploying or serving
        logger.info("stopping the replicas")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        if cluster.ray_address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
