"""`llava-serve BUNDLE`: serve a bundle over an OpenAI-compatible HTTP API (chat completions, streaming) with
continuous batching. The port opens at once; `/health` answers 503 until the bundle has loaded."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import socket
import sys
import warnings
from pathlib import Path

from llava_rt.runtime.backends import DEVICES
from llava_rt.runtime.console import add_standard_options, require_extra, run_command
from llava_rt.runtime.errors import InputError
from llava_rt.runtime.manifest_schema import PRECISIONS
from llava_rt.runtime.request import check_positive_int

from .config import CPU_VISION_SEGMENTS, ClusterConfig, ServeConfig

SERVE_EXTRA = ("serve", ("fastapi", "uvicorn", "prometheus_client", "pydantic", "onnx"))
API_KEY_VARIABLE = "LLAVA_SERVE_API_KEY"
GRACEFUL_SHUTDOWN_S = 10  # on SIGINT/SIGTERM, running requests get this long to finish before they are cancelled
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
ROUTINGS = ("cache-affinity", "power-of-two")
CLUSTER_EXTRA = ("cluster", ("ray",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle directory written by llava-export")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 serves other hosts)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    parser.add_argument(
        "--served-model-name", metavar="NAME", help="the model id clients use (default: the bundle's directory name)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_VARIABLE),
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_VARIABLE}; none: open)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=ServeConfig.max_concurrency,
        metavar="N",
        help="requests decoded together (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=ServeConfig.max_queue,
        metavar="N",
        help="requests waiting for a slot; more are answered 429 (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads per graph (default: one per core)")
    parser.add_argument("--precision", choices=PRECISIONS, help="graph variants to run (default: the best the bundle has)")
    parser.add_argument(
        "--device", choices=DEVICES, default=ServeConfig.device, help="where onnxruntime runs the graphs (default: %(default)s)"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=ServeConfig.max_image_pixels,
        metavar="N",
        help="refuse (413) an image or video frame with more pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=ServeConfig.max_request_bytes,
        metavar="N",
        help="refuse (413) a larger request body (default: %(default)s, 32 MiB)",
    )
    parser.add_argument(
        "--allowed-local-media-path",
        type=Path,
        metavar="DIR",
        help="accept file:// image and video URLs under this directory (default: refuse them)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=ServeConfig.prefill_chunk,
        metavar="N",
        help="prompt tokens prefilled per step between decode steps (default: %(default)s)",
    )
    parser.add_argument(
        "--vision-segments",
        type=int,
        metavar="N",
        help="run the vision graph as N segments, decode steps between them, so a new image stalls the running streams "
        f"for one segment at a time (default: {CPU_VISION_SEGMENTS} on --device cpu, 1 on a GPU)",
    )
    parser.add_argument(
        "--feature-cache-mb",
        type=float,
        default=ServeConfig.feature_cache_mb,
        metavar="MB",
        help="image and video feature cache (default: %(default)s)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="server and access logs (default: info)")
    cluster = parser.add_argument_group("replicas on Ray Serve (the [cluster] extra)")
    cluster.add_argument("--replicas", type=int, metavar="N", help="serve from N replicas, each its own bundle and scheduler")
    cluster.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    cluster.add_argument("--autoscale", metavar="MIN:MAX", help="let Ray Serve scale between MIN and MAX replicas")
    cluster.add_argument(
        "--replica-cpus",
        type=float,
        default=ClusterConfig.replica_cpus,
        metavar="N",
        help="CPUs each replica reserves; also its --threads unless given (default: %(default)s)",
    )
    cluster.add_argument(
        "--replica-gpus", type=float, metavar="N", help="GPUs each replica reserves (default: 0 on --device cpu, else 1)"
    )
    cluster.add_argument(
        "--routing",
        choices=ROUTINGS,
        default=ClusterConfig.routing,
        help="cache-affinity: conversations, images and long prefixes back to the replica holding them; "
        "power-of-two: Ray's default (default: %(default)s)",
    )
    return add_standard_options(parser)


def _config(args: argparse.Namespace) -> ServeConfig:
    """The server's configuration; a bad argument is an `InputError` (one line, exit 2)."""
    if not Path(args.bundle).is_dir():
        raise InputError(f"bundle directory not found: {args.bundle}")
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    for name in ("max_concurrency", "max_image_pixels", "max_request_bytes", "prefill_chunk"):
        check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("threads", "vision_segments"):
        if getattr(args, name) is not None:
            check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.max_queue < 0:
        raise InputError(f"--max-queue must be an integer >= 0, got {args.max_queue}")
    if not args.feature_cache_mb >= 0:
        raise InputError(f"--feature-cache-mb must be a number >= 0, got {args.feature_cache_mb}")
    media = args.allowed_local_media_path
    if media is not None and not media.is_dir():
        raise InputError(f"--allowed-local-media-path: no such directory: {media}")
    if args.api_key == "":
        raise InputError("--api-key is empty")
    return ServeConfig(
        bundle=Path(args.bundle),
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        threads=args.threads,
        precision=args.precision,
        device=args.device,
        max_image_pixels=args.max_image_pixels,
        max_request_bytes=args.max_request_bytes,
        allowed_local_media_path=media,
        prefill_chunk=args.prefill_chunk,
        feature_cache_mb=args.feature_cache_mb,
        vision_segments=args.vision_segments,
    )


def _autoscale(text: str | None, replicas: int) -> tuple[int, int] | None:
    if text is None:
        return None
    low, _, high = text.partition(":")
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= replicas <= int(high)):
        raise InputError(f"--autoscale must be MIN:MAX with 1 <= MIN <= --replicas ({replicas}) <= MAX, got {text!r}")
    return int(low), int(high)


def _cluster_config(args: argparse.Namespace) -> ClusterConfig | None:
    """How the replicas run, or None to serve from this process; a bad argument is an `InputError`."""
    if args.replicas is None:
        given = [flag for flag, value in (("--ray-address", args.ray_address), ("--autoscale", args.autoscale)) if value]
        if given:
            raise InputError(f"{given[0]} needs --replicas")
        return None
    check_positive_int("--replicas", args.replicas)
    if args.max_queue < 1:
        raise InputError("--max-queue must be at least 1 with --replicas (Ray Serve's queue limit)")
    if not args.replica_cpus > 0:
        raise InputError(f"--replica-cpus must be a number > 0, got {args.replica_cpus}")
    gpus = args.replica_gpus if args.replica_gpus is not None else (0.0 if args.device == "cpu" else 1.0)
    if not gpus >= 0:
        raise InputError(f"--replica-gpus must be a number >= 0, got {gpus}")
    return ClusterConfig(
        replicas=args.replicas,
        ray_address=args.ray_address,
        autoscale=_autoscale(args.autoscale, args.replicas),
        replica_cpus=args.replica_cpus,
        replica_gpus=gpus,
        routing=args.routing,
    )


def configs(args: argparse.Namespace) -> tuple[ServeConfig, ClusterConfig | None]:
    """The server's configuration and, with `--replicas`, its replicas'; a bad argument is an `InputError`."""
    config, cluster = _config(args), _cluster_config(args)
    if cluster is not None and args.threads is None:  # a replica runs as many threads as the CPUs it reserves
        config = dataclasses.replace(config, threads=max(1, math.ceil(cluster.replica_cpus)))
    return config, cluster


def _check_port_free(host: str, port: int) -> None:
    """`InputError` if `host:port` cannot be listened on (taken, or not an address of this machine)."""
    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _main(args: argparse.Namespace) -> int:
    import uvicorn
    from PIL import Image

    from .app import create_app

    config, cluster = configs(args)
    # Pillow warns about large images as it opens them; the pixel limit refuses them with a 413 of its own.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    for name in ("uvicorn", "llava_rt"):
        logging.getLogger(name).setLevel(args.log_level.upper())
    if cluster is not None:
        require_extra(*CLUSTER_EXTRA)
        from .cluster import serve_replicas

        serve_replicas(config, cluster, args.host, args.port, args.log_level)
        return 0
    _check_port_free(args.host, args.port)  # before the bundle loads, and in one line rather than uvicorn's log
    try:
        uvicorn.run(
            create_app(config),
            host=args.host,
            port=args.port,
            log_config=None,
            log_level=args.log_level,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    except KeyboardInterrupt:  # uvicorn stops cleanly on SIGINT/SIGTERM, then raises the signal again
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv, extra=SERVE_EXTRA)


if __name__ == "__main__":
    sys.exit(main())
