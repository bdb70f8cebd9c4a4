"""The llava-serve FastAPI application: `/health`, `/metrics`, `/v1/models` and `/v1/chat/completions`, every error
as OpenAI's JSON error object. The port opens at once; the bundle loads in a background thread meanwhile (503s)."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from llava_rt.runtime import InputError, LlavaRtError, MediaTooLarge, Pipeline, QueueFull, SchedulerClosed
from llava_rt.runtime.console import one_line
from llava_rt.runtime.scheduler import Scheduler

from .completions import ChatCompletions, Engine
from .config import ServeConfig
from .media import MediaReader
from .metrics import ServerMetrics
from .schema import APIError, ModelCard, ModelList, parse_chat_request

logger = logging.getLogger("llava_rt.serve")
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions")


def load_engine(config: ServeConfig) -> Engine:
    """Load the bundle and start its scheduler."""
    pipeline = Pipeline.load(
        config.bundle,
        threads=config.threads,
        precision=config.precision,
        device=config.device,
        max_image_pixels=config.max_image_pixels,
        vision_segments=config.segments,
    )
    scheduler = Scheduler(
        pipeline,
        max_concurrency=config.max_concurrency,
        max_queue=config.max_queue,
        prefill_chunk=config.prefill_chunk,
        feature_cache_mb=config.feature_cache_mb,
    )
    scheduler.start()
    return Engine(pipeline, scheduler)


class ModelState:
    """The engine once `load` has made it in a background thread, or why there is none yet (a 503)."""

    def __init__(self, load: Callable[[ServeConfig], Engine]):
        self._load = load
        self._lock = threading.Lock()
        self._closed = False
        self.engine: Engine | None = None
        self.error: str | None = None

    def start(self, config: ServeConfig) -> None:
        threading.Thread(target=self._run, args=(config,), name="llava-serve-load", daemon=True).start()

    def _run(self, config: ServeConfig) -> None:
        try:
            self.load(config)
        except Exception as exc:  # any failure (a bad bundle, a missing provider, ...) is reported by /health
            self.error = one_line(exc) or type(exc).__name__
            logger.error("loading %s failed: %s", config.bundle, self.error)

    def load(self, config: ServeConfig) -> None:
        """Load the engine in this thread (a Ray replica counts as started only once its bundle has loaded)."""
        started = time.monotonic()
        engine = self._load(config)
        with self._lock:
            if not self._closed:
                self.engine = engine
                elapsed = time.monotonic() - started
                logger.info("%s loaded in %.1f s; serving it as %r", config.bundle, elapsed, config.served_model_name)
                return
        engine.scheduler.close()  # the server stopped while the bundle was loading

    def close(self) -> None:
        with self._lock:
            self._closed = True
        if self.engine is not None:
            self.engine.scheduler.close()

    def ready(self) -> Engine:
        if self.engine is not None:
            return self.engine
        raise APIError(503, f"the model failed to load: {self.error}" if self.error else "the model is loading")

    def stats(self) -> dict | None:
        return self.engine.scheduler.stats() if self.engine is not None else None


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    """The request body, refused (413) when over `limit` bytes; nothing over the limit is kept. A body that is
    over is still read, and dropped, up to twice the limit, so that a client still sending it gets to read the 413
    rather than a reset connection; one whose Content-Length is over twice the limit is refused unread."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is over the limit of {limit} bytes (--max-request-bytes)")
    if declared.isdigit() and int(declared) > 2 * limit:
        raise too_large
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > 2 * limit:
            break
    if size > limit:
        raise too_large
    return bytes(body)


def _status(exc: LlavaRtError) -> int:
    """The HTTP status of a runtime error: the caller's input 400 (413 for media over the pixel limit), a full queue 429,
    a stopping server 503, anything else the server's fault."""
    if isinstance(exc, MediaTooLarge):
        return 413
    if isinstance(exc, InputError):
        return 400
    if isinstance(exc, SchedulerClosed):
        return 503
    return 429 if isinstance(exc, QueueFull) else 500


def error_response(exc: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.response().model_dump(), status_code=exc.status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        return error_response(exc, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    async def runtime_error(request: HTTPRequest, exc: LlavaRtError) -> JSONResponse:
        return error_response(APIError(_status(exc), str(exc)))

    async def http_error(request: HTTPRequest, exc: HTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}"), exc.headers)

    async def unexpected(request: HTTPRequest, exc: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {one_line(exc) or type(exc).__name__}"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(LlavaRtError, runtime_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


class _CountResponses:
    """ASGI middleware: counts every HTTP response by endpoint (the known ones, else "other") and status code."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.responses.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:  # the outermost middleware answers 500
            if not started:
                self.metrics.responses.labels(endpoint, "500").inc()
            raise


def _authorization(api_key: str | None) -> list:
    """The dependencies of the /v1 routes: a bearer token equal to `api_key`, when one is set."""
    if api_key is None:
        return []

    async def authorize(request: HTTPRequest) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    return [Depends(authorize)]


def create_app(
    config: ServeConfig, load: Callable[[ServeConfig], Engine] = load_engine, state: ModelState | None = None
) -> FastAPI:
    """The application serving `config.bundle`, which `load` loads in a background thread once the app starts, unless
    `state` already holds its engine."""
    state = state or ModelState(load)
    metrics = ServerMetrics(state.stats)
    media = MediaReader(config.allowed_local_media_path, config.max_image_pixels)
    completions = ChatCompletions(config.served_model_name, media, metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            state.start(config)
        yield
        await run_in_threadpool(state.close)  # waits for the scheduler's current step

    app = FastAPI(title="llava-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    _install_error_handlers(app)
    app.add_middleware(_CountResponses, metrics=metrics)
    v1 = APIRouter(prefix="/v1", dependencies=_authorization(config.api_key))

    @app.get("/health")
    async def health() -> dict:
        state.ready()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @v1.get("/models")
    async def models() -> ModelList:
        engine = state.ready()
        card = ModelCard(id=config.served_model_name, created=created, max_model_len=engine.pipeline.max_length)
        return ModelList(data=[card])

    @v1.post("/chat/completions")
    async def chat_completions(request: HTTPRequest):
        engine = state.ready()
        body = parse_chat_request(await read_body(request, config.max_request_bytes))
        if body.model is not None and body.model != config.served_model_name:
            raise APIError(404, f"The model `{body.model}` does not exist.", param="model")
        return await completions.create(request, engine, body)

    app.include_router(v1)
    return app
