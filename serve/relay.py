"""An HTTP request relayed to an ASGI app in another process and its response relayed back, as picklable values:
the replica side runs the app on a request's scope and body and yields what the app sends; the front side turns
those messages back into a streaming response. Used by the Ray Serve deployment (serve/deployment.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.requests import Request as HTTPRequest

from llava_rt.runtime.console import one_line

logger = logging.getLogger("llava_rt.serve")

SCOPE_KEYS = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "query_string",
    "headers",
    "client",
    "server",
)


def portable_scope(request: HTTPRequest) -> dict:
    """The parts of an HTTP request's ASGI scope an app reads, as plain picklable values."""
    scope = {key: request.scope[key] for key in SCOPE_KEYS if key in request.scope}
    scope["headers"] = [(bytes(name), bytes(value)) for name, value in scope.get("headers", [])]
    scope["root_path"] = ""
    return scope


async def run_app(
    app: Callable[..., Awaitable[None]], scope: dict, body: bytes, extra_headers: dict[str, str]
) -> AsyncIterator[dict]:
    """Run `app` on one request and yield the messages it sends, `extra_headers` added to the response's. The app
    sees the client leave (`http.disconnect`) when this generator is closed before the app has finished."""
    sent: asyncio.Queue[dict | None] = asyncio.Queue()
    left = asyncio.Event()
    body_read = answered = False

    async def receive() -> dict:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal answered
        if message["type"] == "http.response.start":
            answered = True
            headers = [(name.encode(), value.encode()) for name, value in extra_headers.items()]
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await sent.put(message)

    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while (message := await sent.get()) is not None:
            yield message
        error = None if task.cancelled() else task.exception()
        if error is not None and not answered:
            raise error
        if error is not None:  # Starlette raises again what it has answered with a 500, for the server to log
            logger.error("the app failed after answering: %s", one_line(error) or type(error).__name__)
    finally:
        left.set()
        if not task.done():
            await asyncio.wait({task}, timeout=1.0)  # the app notices the disconnect and cleans up
            task.cancel()


async def response_parts(messages: AsyncIterator[dict]) -> tuple[dict, AsyncIterator[bytes]]:
    """The response's start message (status, headers) and an iterator over its body, from relayed `messages`."""
    start = await anext(messages)
    if start["type"] != "http.response.start":
        raise RuntimeError(f"the relayed response began with {start['type']!r}")

    async def body() -> AsyncIterator[bytes]:
        async for message in messages:
            if message["type"] == "http.response.body":
                yield message.get("body", b"")

    return start, body()
