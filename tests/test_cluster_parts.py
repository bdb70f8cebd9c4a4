"""The parts of `llava-serve --replicas` that need no Ray: cache-affinity keys and the ASGI relay."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import StreamingResponse

from llava_rt.serve.affinity import MIN_PREFIX_CHARS, prefix_keys
from llava_rt.serve.relay import response_parts, run_app

PREAMBLE = "You are a careful assistant who answers in full sentences. " * 3  # over MIN_PREFIX_CHARS


def chat(*messages: dict) -> bytes:
    return json.dumps({"model": "m", "messages": list(messages), "max_tokens": 3}).encode()


def text(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def image(url: str, question: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}


def test_a_continued_conversation_shares_its_opening_keys():
    opening = [text("system", PREAMBLE), text("user", "What is a rainbow?")]
    first = prefix_keys(chat(*opening))
    continued = prefix_keys(chat(*opening, text("assistant", "Light split by rain."), text("user", "Why?")))
    assert len(first) == 2 and continued[: len(first)] == first and len(continued) == 4


def test_the_same_image_shares_a_key_whatever_the_question():
    first = prefix_keys(chat(image("data:image/png;base64,AAAA", "What is this?")))
    second = prefix_keys(chat(image("data:image/png;base64,AAAA", "Describe the colours.")))
    other = prefix_keys(chat(image("data:image/png;base64,BBBB", "What is this?")))
    assert first[0] == second[0] and first[1] != second[1] and other[0] != first[0]


def test_short_openings_and_non_chat_bodies_have_no_keys():
    assert prefix_keys(chat(text("user", "Hi"))) == ()
    assert len(prefix_keys(chat(text("user", "x" * MIN_PREFIX_CHARS)))) == 1
    assert prefix_keys(chat(text("user", "Hi"), text("assistant", "Hello"))) == ()
    for body in (b"not json", b"[]", b'{"messages": "text"}', b"{}"):
        assert prefix_keys(body) == ()
    # the same text under another role is another prefix
    assert prefix_keys(chat(text("system", PREAMBLE))) != prefix_keys(chat(text("user", PREAMBLE)))


def _app(seen: dict) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        return {"body": (await request.body()).decode(), "query": request.url.query}

    @app.get("/stream")
    async def stream():
        async def pieces():
            try:
                for i in range(1000):
                    yield f"piece {i}\n"
                    await asyncio.sleep(0.01)
            finally:
                seen["closed"] = True

        return StreamingResponse(pieces(), media_type="text/plain")

    return app


def _scope(method: str, path: str, query: bytes = b"") -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http"} | {
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": [(b"content-type", b"application/json")],
        "root_path": "",
    }


def test_the_relay_returns_the_apps_answer_with_extra_headers():
    async def main():
        messages = run_app(_app({}), _scope("POST", "/echo", b"a=1"), b"hello", {"x-llava-replica": "r1"})
        start, body = await response_parts(messages)
        return start, b"".join([part async for part in body])

    start, body = asyncio.run(main())
    assert start["status"] == 200 and (b"x-llava-replica", b"r1") in start["headers"]
    assert json.loads(body) == {"body": "hello", "query": "a=1"}


def test_closing_the_relay_tells_the_app_its_client_left():
    seen = {}

    async def main():
        messages = run_app(_app(seen), _scope("GET", "/stream"), b"", {})
        start, body = await response_parts(messages)
        first = await anext(body)
        await messages.aclose()  # the front stopped reading: the client went away
        return start, first

    start, first = asyncio.run(main())
    assert start["status"] == 200 and first == b"piece 0\n" and seen == {"closed": True}


def test_a_relayed_response_must_begin_with_its_start():
    async def body_first():
        yield {"type": "http.response.body", "body": b"x"}

    with pytest.raises(RuntimeError, match="began with 'http.response.body'"):
        asyncio.run(response_parts(body_first()))


def test_an_app_failing_after_its_500_ends_the_relay_cleanly_and_one_failing_before_raises():
    async def crashing(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"oops"})
        raise ValueError("raised again after answering")

    async def silent(scope, receive, send):
        raise ValueError("no answer")

    async def relayed(app):
        return [message async for message in run_app(app, _scope("GET", "/"), b"", {})]

    assert [message["type"] for message in asyncio.run(relayed(crashing))] == ["http.response.start", "http.response.body"]
    with pytest.raises(ValueError, match="no answer"):
        asyncio.run(relayed(silent))
