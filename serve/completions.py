"""One chat completion: its media read and its prompt prepared in a worker thread, the request submitted to the
scheduler, then its events sent as SSE chunks or collected into one response. A client that leaves cancels it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import StreamingResponse

from llava_rt.runtime import Pipeline, Request
from llava_rt.runtime.console import one_line
from llava_rt.runtime.pipeline import PreparedRequest
from llava_rt.runtime.request import DEFAULT_NUM_FRAMES
from llava_rt.runtime.scheduler import Completion, Event, Scheduler

from .media import MediaReader
from .metrics import ServerMetrics, TokenTimer
from .schema import (
    APIError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
    check_context,
)


@dataclass
class Engine:
    """A loaded model and the scheduler that runs its requests."""

    pipeline: Pipeline
    scheduler: Scheduler


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _notifier(wakeup: asyncio.Event) -> Callable[[], None]:
    """A callback for the scheduler's thread that wakes the request's coroutine on the event loop."""
    loop = asyncio.get_running_loop()

    def notify() -> None:
        try:
            loop.call_soon_threadsafe(wakeup.set)
        except RuntimeError:  # the loop is closed: the server has stopped and nobody waits
            pass

    return notify


async def _events(completion: Completion, wakeup: asyncio.Event, timer: TokenTimer) -> AsyncIterator[Event]:
    """The completion's events as they come, up to and including its last one."""
    while True:
        wakeup.clear()  # before polling: a notification that comes after the poll is not lost
        for event in completion.poll():
            timer.observe(event)
            yield event
            if event.finish_reason is not None:
                return
        await wakeup.wait()


async def _cancel_on_disconnect(http_request: HTTPRequest, completion: Completion) -> None:
    """Cancel the completion when the client goes away (its body has been read: only the disconnect is left)."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass
    completion.cancel()


def _failure(event: Event) -> APIError:
    return APIError(500, f"generation failed: {one_line(event.error) or type(event.error).__name__}")


@dataclass
class _Reply:
    """The identity every object of one answer carries."""

    id: str
    created: int
    model: str

    def chunk(self, delta: Delta, finish_reason: str | None = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        return _sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice]))

    def usage_chunk(self, usage: Usage) -> str:
        return _sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))


class ChatCompletions:
    """Answers `POST /v1/chat/completions` for one served model."""

    def __init__(self, model_name: str, media: MediaReader, metrics: ServerMetrics):
        self.model_name, self.media, self.metrics = model_name, media, metrics
        self._watchers: set[asyncio.Task] = set()

    def _prepare(self, pipeline: Pipeline, body: ChatCompletionRequest) -> tuple[Request, PreparedRequest]:
        """Read the media, build and prepare the runtime request, check it fits the context (CPU work: a worker thread)."""
        images = [self.media.image(url) for url in body.media_urls("image_url")]
        videos = [self.media.video(url, DEFAULT_NUM_FRAMES) for url in body.media_urls("video_url")]
        limit = body.token_limit  # without one the answer may run to the end of the context
        request = body.runtime_request(images, videos, DEFAULT_NUM_FRAMES, limit or pipeline.max_length)
        prepared = pipeline.prepare(request)
        check_context(len(prepared.input_ids), limit, pipeline.max_length)
        return request, prepared

    async def create(self, http_request: HTTPRequest, engine: Engine, body: ChatCompletionRequest):
        """Prepare, submit, and answer: a `StreamingResponse` of SSE chunks or a `ChatCompletion`."""
        arrived, created = time.monotonic(), int(time.time())
        request, prepared = await run_in_threadpool(self._prepare, engine.pipeline, body)
        wakeup = asyncio.Event()
        completion = engine.scheduler.submit(request, prepared=prepared, notify=_notifier(wakeup))
        watcher = asyncio.create_task(_cancel_on_disconnect(http_request, completion))
        self._watchers.add(watcher)  # the loop keeps only weak references to tasks
        watcher.add_done_callback(self._watchers.discard)
        self.metrics.prompt_tokens.inc(completion.prompt_tokens)
        events = _events(completion, wakeup, self.metrics.timer(arrived))
        reply = _Reply(f"chatcmpl-{completion.id}", created, self.model_name)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            stream = self._stream(completion, watcher, events, reply, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            return await self._collect(completion, events, reply)
        finally:
            watcher.cancel()
            completion.cancel()

    async def _stream(
        self, completion: Completion, watcher: asyncio.Task, events: AsyncIterator[Event], reply: _Reply, include_usage: bool
    ) -> AsyncIterator[str]:
        """SSE lines: the role, the text as it comes (the last piece with the finish reason), the usage when asked
        for, `[DONE]`. However the stream ends, the completion is cancelled (a no-op once it has finished)."""
        try:
            yield reply.chunk(Delta(role="assistant", content=""))
            tokens = 0
            async for event in events:
                tokens += event.tokens
                if event.error is not None:
                    yield _sse(_failure(event).response())
                elif event.text or event.finish_reason is not None:
                    yield reply.chunk(Delta(content=event.text or None), event.finish_reason)
            if include_usage:
                yield reply.usage_chunk(Usage.of(completion.prompt_tokens, tokens, completion.reused_tokens))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            completion.cancel()

    async def _collect(self, completion: Completion, events: AsyncIterator[Event], reply: _Reply) -> ChatCompletion:
        pieces, tokens = [], 0
        async for event in events:
            pieces.append(event.text)
            tokens += event.tokens
        if event.error is not None:
            raise _failure(event)
        if event.finish_reason == "abort":
            raise APIError(503, "the request was cancelled before it finished: the server is stopping")
        return ChatCompletion(
            id=reply.id,
            created=reply.created,
            model=reply.model,
            choices=[Choice(message=AssistantMessage(content="".join(pieces)), finish_reason=event.finish_reason)],
            usage=Usage.of(completion.prompt_tokens, tokens, completion.reused_tokens),
        )
