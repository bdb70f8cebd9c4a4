"""The llava-serve application on Ray Serve: model replicas, each running the server's own app (serve/app.py) on its
own loaded bundle and scheduler, behind one front deployment that reads each request, computes its cache-affinity
keys and relays it to the replica the router picks (serve/relay.py). `/metrics` there gathers every replica's, each
read in its process through Ray's `__ray_call__` (serve/replica_process.py), so that busy slots do not hold it up."""

from __future__ import annotations

import asyncio
import logging
import os

import ray
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import RayActorError
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse

from llava_rt.runtime.console import one_line

from . import replica_process, router_registry
from .affinity import prefix_keys
from .app import ModelState, create_app, error_response, load_engine, read_body
from .config import ClusterConfig, ServeConfig
from .relay import portable_scope, response_parts, run_app
from .router import CacheAffinityRouter, PowerOfTwoRouter
from .schema import APIError

logger = logging.getLogger("llava_rt.serve")
APP_NAME = "llava-serve"
MODEL_DEPLOYMENT = "LlavaModel"
FRONT_DEPLOYMENT = "LlavaFront"
REPLICA_HEADER = "x-llava-replica"
ROUTERS = {"cache-affinity": CacheAffinityRouter, "power-of-two": PowerOfTwoRouter}
METRICS_TIMEOUT_S = 5.0
GRACEFUL_SHUTDOWN_S = 10


class ModelReplica:
    """One replica: the bundle loaded (the replica starts only once it has), its scheduler, the server's app."""

    def __init__(self, config: ServeConfig):
        self.state = ModelState(load_engine)
        self.state.load(config)
        self.app = create_app(config, state=self.state)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        replica_process.REPLICA = self
        # Ray Serve's logger writes to this replica's own log file, named after its id
        logging.getLogger("ray.serve").info("%s loaded (pid %d)", config.bundle, os.getpid())

    async def relay(self, scope: dict, body: bytes, affinity: tuple[str, ...] = ()):
        """The app's answer to one request, as ASGI messages (`affinity` is for the router)."""
        async for message in run_app(self.app, scope, body, {REPLICA_HEADER: self.replica_id}):
            yield message

    def metrics(self) -> tuple[str, str]:
        """This replica's id and its metrics in Prometheus' text format."""
        return self.replica_id, self.app.state.metrics.render().decode()

    def __del__(self):
        self.state.close()


def _merged(texts: list[tuple[str, str]]) -> list[Metric]:
    """The metric families of each replica's `(id, Prometheus text)`, one family per name, every sample labelled
    with its `replica`."""
    families: dict[str, Metric] = {}
    for replica_id, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            merged.samples += [sample._replace(labels={**sample.labels, "replica": replica_id}) for sample in family.samples]
    return list(families.values())


class _Families:
    """A collector of fixed metric families (a scrape's worth, gathered from the replicas)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class Front:
    """Reads each request, relays it to a model replica, and relays the answer back; `/metrics` gathers the
    replicas'. A replica that dies while answering ends its request with a 503 (an error event, once streaming)."""

    def __init__(self, model: DeploymentHandle, config: ServeConfig):
        self.model, self.config = model, config

    async def __call__(self, request: HTTPRequest) -> Response:
        try:
            if request.method == "GET" and request.url.path == "/metrics":
                return await self._metrics()
            return await self._relay(request)
        except APIError as exc:
            return error_response(exc)
        except Exception as exc:  # a replica's failure that is not an HTTP answer: still OpenAI's error object
            logger.exception("relaying %s %s failed", request.method, request.url.path)
            return error_response(APIError(500, f"internal error: {one_line(exc) or type(exc).__name__}"))

    async def _relay(self, request: HTTPRequest) -> Response:
        body = await read_body(request, self.config.max_request_bytes)
        chat = request.method == "POST" and request.url.path == "/v1/chat/completions"
        call = self.model.options(method_name="relay", stream=True)
        messages = call.remote(portable_scope(request), body, affinity=prefix_keys(body) if chat else ())
        try:
            start, body_parts = await response_parts(messages)
        except BackPressureError:
            raise APIError(429, "every replica is busy and the queue is full (--max-queue); retry later") from None
        except RayActorError:
            raise APIError(503, "the replica serving this request stopped before answering; retry") from None
        types = [value.split(b";")[0].strip() for name, value in start["headers"] if name.lower() == b"content-type"]
        streaming = types == [b"text/event-stream"]
        response = StreamingResponse(_until_replica_lost(body_parts, messages, streaming), status_code=start["status"])
        response.raw_headers = list(start["headers"])
        return response

    async def _metrics(self) -> Response:
        names = router_registry.replica_actor_names(MODEL_DEPLOYMENT)
        calls = [asyncio.wait_for(_replica_metrics(name), METRICS_TIMEOUT_S) for name in names]
        texts = []
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                logger.warning("a replica's metrics could not be read: %s", one_line(result) or type(result).__name__)
            else:
                texts.append(result)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(_merged(texts)))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def _replica_metrics(actor_name: str) -> tuple[str, str]:
    """One replica's id and metrics, read in its process (not a Ray Serve request: see serve/replica_process.py)."""
    actor = await asyncio.to_thread(ray.get_actor, actor_name, namespace=SERVE_NAMESPACE)
    return await actor.__ray_call__.remote(replica_process.replica_metrics)


async def _until_replica_lost(body_parts, messages, streaming: bool):
    """The relayed body; if the replica dies meanwhile, an SSE stream ends with an error event (a 503), and any
    other body where it was cut."""
    try:
        async for part in body_parts:
            yield part
    except RayActorError:
        logger.warning("a replica stopped while answering a request")
        if streaming:
            error = APIError(503, "the replica serving this request stopped while answering; retry").response()
            yield f"data: {error.model_dump_json()}\n\n".encode()
    finally:
        messages.cancel()


def application(config: ServeConfig, cluster: ClusterConfig):
    """The Ray Serve application: the model deployment with its replicas, resources and limits, and the front."""
    scaling = (
        {"num_replicas": cluster.replicas}
        if cluster.autoscale is None
        else {
            "autoscaling_config": {
                "min_replicas": cluster.autoscale[0],
                "max_replicas": cluster.autoscale[1],
                "initial_replicas": cluster.replicas,
                "target_ongoing_requests": config.max_concurrency,
            }
        }
    )
    model = serve.deployment(
        ModelReplica,
        name=MODEL_DEPLOYMENT,
        ray_actor_options={"num_cpus": cluster.replica_cpus, "num_gpus": cluster.replica_gpus},
        max_ongoing_requests=config.max_concurrency,
        max_queued_requests=config.max_queue,
        request_router_config=RequestRouterConfig(request_router_class=ROUTERS[cluster.routing]),
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        **scaling,
    )
    most_requests = cluster.most_replicas * config.max_concurrency
    front = serve.deployment(
        Front,
        name=FRONT_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=most_requests + config.max_queue + 16,  # the queue and the 429s are the model's
    )
    return front.bind(model.bind(config), config)


def build(args: dict):
    """The application from a dict of `llava-serve` flags (`bundle` and flag names, dashes or underscores; `replicas`
    defaults to 1): what `serve run llava_rt.serve.deployment:build bundle=PATH replicas=2` and a KubeRay RayService's
    `import_path` with `args` deploy."""
    from .cli import build_parser, configs

    options = {key.replace("_", "-"): value for key, value in args.items()}
    options.setdefault("replicas", 1)
    argv = [str(options.pop("bundle", ""))] + [f"--{key}={value}" for key, value in options.items()]
    config, cluster = configs(build_parser().parse_args(argv))
    return application(config, cluster)
