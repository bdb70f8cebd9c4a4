"""llava-serve over real HTTP on 127.0.0.1: server processes started here (always stopped, and required to stop
cleanly), the `openai` client and raw HTTP. Answers equal `llava-run --json`'s; every error is OpenAI's JSON with
its status, and the server serves on after each; concurrent and cancelled streams; loading (in-process)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import assert_one_line_error, default_sigint, random_image, run, smooth_video, write_video

API_KEY = "test-key"
MAX_IMAGE_PIXELS = 20_000  # the test images are far below; big.png (200 x 200) is over
MAX_REQUEST_BYTES = 1 << 20
MAX_TOKENS = 8
START_DEADLINE_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running llava-serve process."""

    process: subprocess.Popen
    port: int
    bundle: Path
    model: str
    temporary: Path  # the server's TMPDIR
    api_key: str | None = None

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        key = api_key or self.api_key or "unused"
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60)

    def http(self, method: str, path: str, body=None, headers: dict | None = None, chunked: bool = False):
        """`(status, headers, body bytes)` of one raw request; the API key is sent unless `headers` say otherwise."""
        headers = {**({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}), **(headers or {})}
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers, encode_chunked=chunked)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def error(self, method: str, path: str, body=None, headers: dict | None = None, chunked: bool = False) -> tuple[int, dict]:
        """The status and the OpenAI error object of a request that fails."""
        status, response_headers, data = self.http(method, path, body, headers, chunked)
        assert response_headers["content-type"] == "application/json", data
        payload = json.loads(data)
        assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}, payload
        assert payload["error"]["code"] == status
        return status, payload["error"]

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name and labels, e.g. `llava_rt_requests_running` or
        `llava_rt_http_responses_total{endpoint=/health,status=200}`."""
        status, _, data = self.http("GET", "/metrics")
        assert status == 200
        samples = {}
        for family in text_string_to_metric_families(data.decode()):
            for sample in family.samples:
                labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def wait_for(self, condition, deadline_s: float, what: str) -> None:
        deadline = time.monotonic() + deadline_s
        while not condition():
            assert self.process.poll() is None, f"the server exited while waiting until {what}"
            assert time.monotonic() < deadline, f"not {what} within {deadline_s} s"
            time.sleep(0.05)

    def healthy(self) -> bool:
        try:
            return self.http("GET", "/health")[0] == 200
        except OSError:
            return False

    def assert_serving(self) -> None:
        """Healthy, and answers a completion."""
        assert self.healthy()
        answer = self.client().chat.completions.create(model=self.model, messages=user("Still there?"), max_tokens=1)
        assert answer.usage.completion_tokens == 1


@contextmanager
def serving(bundle: Path, directory: Path, *args: str, api_key: str | None = None, model: str | None = None):
    """Start `llava-serve BUNDLE ARGS [--api-key API_KEY] [--served-model-name MODEL]` on a free port, wait for
    /health 200, stop it afterwards (terminate, then kill) and check it stopped cleanly. Its TMPDIR is `directory/tmp`."""
    port, log = free_port(), directory / "server.log"
    (directory / "tmp").mkdir()
    command = [sys.executable, "-m", "llava_rt.serve.cli", str(bundle), "--port", str(port), "--log-level", "warning", *args]
    command += ["--api-key", api_key] if api_key else []
    command += ["--served-model-name", model] if model else []
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": str(directory / "tmp")},
            preexec_fn=default_sigint,
        )
    try:
        server = Server(process, port, bundle, model or bundle.name, directory / "tmp", api_key)
        server.wait_for(server.healthy, START_DEADLINE_S, "healthy")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    text = log.read_text()
    assert process.returncode == 0 and "Traceback" not in text, text


def user(text: str, *media: tuple[str, str]) -> list[dict]:
    """One user message: the media parts (`("image_url" | "video_url", url)`), then the text."""
    parts = [{"type": kind, kind: {"url": url}} for kind, url in media]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text}]


def data_url(path: Path, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image(path: Path) -> tuple[str, str]:
    return "image_url", data_url(path, "image/png")


def video(path: Path) -> tuple[str, str]:
    return "video_url", data_url(path, "video/mp4")


@pytest.fixture(scope="module")
def bundle(onevision) -> Path:
    return onevision["ov"].bundle


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Test media: `allowed/` (what file:// URLs may reach, with a symlink out of it) and a file outside it."""
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    random_image(48, 80, seed=0).save(allowed / "wide.png")
    random_image(64, 40, seed=1).save(allowed / "tall.png")
    random_image(200, 200, seed=2).save(root / "big.png")
    random_image(20, 20, seed=3).save(root / "outside.png")
    (allowed / "escape.png").symlink_to(root / "outside.png")
    write_video(allowed / "clip.mp4", smooth_video(10, 48, 64, seed=4))
    return root


@pytest.fixture(scope="module")
def server(bundle, media, tmp_path_factory):
    """The main server: API key, small body and pixel limits, file:// URLs under media/allowed."""
    with serving(
        bundle,
        tmp_path_factory.mktemp("server"),
        "--max-image-pixels",
        str(MAX_IMAGE_PIXELS),
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--allowed-local-media-path",
        str(media / "allowed"),
        api_key=API_KEY,
    ) as started:
        yield started


@pytest.fixture(scope="module")
def single_slot(bundle, tmp_path_factory):
    """One slot and one place in the queue."""
    directory = tmp_path_factory.mktemp("single")
    with serving(bundle, directory, "--max-concurrency", "1", "--max-queue", "1", model="tiny") as started:
        yield started


def ask(server: Server, messages: list[dict], **options):
    return server.client().chat.completions.create(model=server.model, messages=messages, **options)


def stream_text(server: Server, messages: list[dict], **options) -> tuple[str, list]:
    """The concatenated text of a streamed answer, and its chunks."""
    chunks = list(ask(server, messages, stream=True, **options))
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices), chunks


# ---- answers -----------------------------------------------------------------------------------------------

PARITY_CASES = {
    "text": ("Hello there, who are you?", [], []),
    "one image": ("What is shown?", ["wide.png"], []),
    "two images": ("Compare the two images.", ["wide.png", "tall.png"], []),
    "video": ("What happens in the clip?", [], ["clip.mp4"]),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_greedy_answer_and_usage_equal_llava_run(server, media, case):
    prompt, images, videos = PARITY_CASES[case]
    files = [arg for name in images for arg in ("--image", str(media / "allowed" / name))]
    files += [arg for name in videos for arg in ("--video", str(media / "allowed" / name))]
    args = ["--prompt", prompt, "--max-new-tokens", str(MAX_TOKENS), "--json", *files]
    result = run("llava_rt.runtime.cli", str(server.bundle), *args)
    assert result.returncode == 0, result.stderr
    expected = json.loads(result.stdout)
    parts = [image(media / "allowed" / name) for name in images] + [video(media / "allowed" / name) for name in videos]
    answer = ask(server, user(prompt, *parts), max_tokens=MAX_TOKENS)
    assert answer.object == "chat.completion" and answer.model == server.model and answer.id.startswith("chatcmpl-")
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.message.content == expected["text"]
    assert choice.finish_reason == expected["finish_reason"]
    assert answer.usage.prompt_tokens == expected["input_tokens"]
    assert answer.usage.completion_tokens == len(expected["token_ids"])
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_stream_concatenates_to_the_answer(server, media):
    messages = user("What is shown?", image(media / "allowed" / "wide.png"))
    answer = ask(server, messages, max_tokens=12)
    text, chunks = stream_text(server, messages, max_tokens=12, stream_options={"include_usage": True})
    assert text == answer.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    content = [chunk for chunk in chunks if chunk.choices]
    assert [chunk.choices[0].finish_reason for chunk in content] == [None] * (len(content) - 1) + ["length"]
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
    )
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # the same prompt again, from the cache


def test_a_continued_conversation_reports_its_cached_prompt_tokens(server):
    messages = user("Name three colours of the rainbow, then count to five.")
    first = ask(server, messages, max_tokens=8)
    follow_up = [*messages, {"role": "assistant", "content": first.choices[0].message.content}, *user("And then?")]
    second = ask(server, follow_up, max_tokens=4)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # all of the first prompt but perhaps its last token, the newline after `assistant`, which may tokenize
    # differently once the answer follows it
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens


def test_stream_is_server_sent_events_ending_with_done(server):
    body = json.dumps({"model": server.model, "messages": user("Hi"), "max_tokens": 4, "stream": True})
    status, headers, data = server.http("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = data.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(event.startswith("data: ") for event in events[:-1])
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] is None


def test_finish_reasons_length_and_stop(server):
    messages = user("Tell me a story.")
    long = ask(server, messages, max_tokens=40).choices[0]
    short = ask(server, messages, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    stop = re.search(r"[A-Za-z]{2,}", long.message.content[2:]).group()  # a word of the answer, not at its start
    stopped = ask(server, messages, max_tokens=40, stop=[stop, "never said"]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == long.message.content[: long.message.content.index(stop)]


def test_file_urls_under_the_allowed_directory(server, media):
    path = media / "allowed" / "wide.png"
    from_file = ask(server, user("What is shown?", ("image_url", path.as_uri())), max_tokens=4)
    from_data = ask(server, user("What is shown?", image(path)), max_tokens=4)
    assert from_file.choices[0].message.content == from_data.choices[0].message.content


def test_models_health_and_metrics(server, media):
    (card,) = server.client().models.list().data
    assert card.id == server.model == server.bundle.name and card.owned_by == "llava-rt"
    assert server.http("GET", "/health", headers={"Authorization": ""})[0] == 200  # open without the key
    for _ in range(2):  # the second time the image's features come from the cache
        stream_text(server, user("What is shown?", image(media / "allowed" / "tall.png")), max_tokens=3)
    samples = server.metrics()
    assert samples["llava_rt_http_responses_total{endpoint=/v1/chat/completions,status=200}"] >= 2
    assert samples["llava_rt_requests_running"] == samples["llava_rt_requests_queued"] == 0
    assert samples["llava_rt_time_to_first_token_seconds_count"] >= 1
    assert samples["llava_rt_inter_token_latency_seconds_count"] >= 1
    assert samples["llava_rt_prompt_tokens_total"] > 0 and samples["llava_rt_generated_tokens_total"] > 0
    assert samples["llava_rt_feature_cache_hits_total"] >= 1 and "llava_rt_prefix_cache_hits_total" in samples


# ---- errors: each one OpenAI's JSON with its status, the server serving on --------------------------------


def _chat(**fields) -> bytes:
    return json.dumps({"messages": user("Hi"), "max_tokens": 2, **fields}).encode()


def _chat_with(*media: tuple[str, str]) -> bytes:
    return json.dumps({"messages": user("Hi", *media), "max_tokens": 2}).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


ERROR_CASES = {
    "malformed JSON": (lambda m: b'{"messages": [', 400, "not valid JSON"),
    "not an object": (lambda m: b"[1, 2]", 400, "must be a JSON object"),
    "schema: no messages": (lambda m: b'{"max_tokens": 2}', 400, "messages: Field required"),
    "schema: wrong type": (lambda m: _chat(temperature="hot"), 400, "temperature: Input should be a valid number"),
    "schema: unknown role": (lambda m: json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), 400, "role"),
    "undecodable image": (lambda m: _chat_with(("image_url", "data:image/png;base64," + _b64(b"not a png"))), 400, "cannot read"),
    "not base64": (lambda m: _chat_with(("image_url", "data:image/png;base64,@@@")), 400, "not valid base64"),
    "undecodable video": (lambda m: _chat_with(("video_url", "data:video/mp4;base64," + _b64(b"no video"))), 400, "cannot read"),
    "too many tokens": (lambda m: _chat(max_tokens=4096), 400, "maximum context length is 4096 tokens"),
    "n=2": (lambda m: _chat(n=2), 400, "n=2 is not supported"),
    "logprobs": (lambda m: _chat(logprobs=True), 400, "logprobs=true is not supported"),
    "http URL": (lambda m: _chat_with(("image_url", "http://127.0.0.1:9/cat.png")), 400, "http: URLs are not fetched"),
    "file URL outside": (lambda m: _chat_with(("image_url", (m / "outside.png").as_uri())), 400, "outside"),
    "symlink out": (lambda m: _chat_with(("image_url", (m / "allowed" / "escape.png").as_uri())), 400, "outside"),
    "dot-dot out": (lambda m: _chat_with(("image_url", f"file://{m}/allowed/../outside.png")), 400, "outside"),
    "unknown model": (lambda m: _chat(model="gpt-4o"), 404, "The model `gpt-4o` does not exist"),
    "image over the pixel limit": (lambda m: _chat_with(image(m / "big.png")), 413, "is too large"),
    "body over the limit": (lambda m: _chat(padding="x" * MAX_REQUEST_BYTES), 413, "--max-request-bytes"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_request_is_an_openai_error_and_the_server_serves_on(server, media, case):
    body, status, fragment = ERROR_CASES[case]
    got, error = server.error("POST", "/v1/chat/completions", body(media))
    assert got == status and fragment in error["message"], error
    server.assert_serving()


def test_body_over_the_limit_without_a_length_is_refused_while_read(server):
    chunks = (b"x" * 65536 for _ in range(MAX_REQUEST_BYTES // 65536 + 8))
    status, error = server.error("POST", "/v1/chat/completions", chunks, chunked=True)
    assert status == 413 and "--max-request-bytes" in error["message"]
    server.assert_serving()


def test_unknown_route_method_and_api_key(server):
    assert server.error("GET", "/v1/nothing")[0] == 404
    status, error = server.error("GET", "/v1/chat/completions")
    assert status == 405 and "Method Not Allowed" in error["message"]
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        status, error = server.error("GET", "/v1/models", headers=headers)
        assert status == 401 and error["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(model=server.model, messages=user("Hi"), max_tokens=1)
    server.assert_serving()


def test_video_uploads_leave_no_temporary_file(server, media):
    ask(server, user("What happens?", video(media / "allowed" / "clip.mp4")), max_tokens=1)
    server.error("POST", "/v1/chat/completions", _chat_with(("video_url", "data:video/mp4;base64," + _b64(b"junk"))))
    assert not list(server.temporary.glob("llava-serve-*"))  # the directories media.py makes (libraries leave others)


# ---- concurrency ---------------------------------------------------------------------------------------------

CLIENTS = [
    (user(f"Question number {i}: what is {i} plus {i}?"), {"max_tokens": 12} | ({"temperature": 0.8, "seed": i} if i % 2 else {}))
    for i in range(8)
]


@pytest.fixture(scope="module")
def sequential_answers(server) -> list[str]:
    """What each client's request gets when it is served alone."""
    return [ask(server, messages, **options).choices[0].message.content for messages, options in CLIENTS]


def _concurrently(server: Server) -> list:
    """Stream every client's request at once, each from its own thread: its text, or the exception it raised."""
    results, barrier = [None] * len(CLIENTS), threading.Barrier(len(CLIENTS))

    def client(index: int) -> None:
        messages, options = CLIENTS[index]
        barrier.wait()
        try:
            results[index] = stream_text(server, messages, **options)[0]
        except openai.APIError as exc:
            results[index] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(CLIENTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_concurrent_streams_get_their_sequential_answers(server, sequential_answers):
    assert _concurrently(server) == sequential_answers


def test_concurrent_streams_beyond_the_queue_get_their_answer_or_429(single_slot, sequential_answers):
    results = _concurrently(single_slot)
    for result, expected in zip(results, sequential_answers):
        assert result == expected or (isinstance(result, openai.RateLimitError) and result.status_code == 429), result
    assert any(isinstance(result, str) for result in results)
    single_slot.assert_serving()


def test_queue_full_is_429_and_a_client_leaving_frees_its_slot(single_slot):
    # Greedy, without max_tokens, this answer runs to the end of the context: over 4000 tokens. A request whose client
    # left is cancelled at the next step, so it must stop far short of that (counted in tokens, not timed).
    far_short = 2000

    def generated() -> float:
        return single_slot.metrics()["llava_rt_generated_tokens_total"]

    before = generated()
    running = ask(single_slot, user("Tell me everything."), stream=True)
    pieces = (chunk for chunk in running if chunk.choices[0].delta.content)
    next(pieces)  # it is decoding
    waiting = {}
    queued = threading.Thread(target=lambda: waiting.setdefault("answer", ask(single_slot, user("Hi"), max_tokens=4)))
    queued.start()
    single_slot.wait_for(lambda: single_slot.metrics()["llava_rt_requests_queued"] == 1, 10, "queued")
    with pytest.raises(openai.RateLimitError) as refused:
        ask(single_slot, user("Me too"), max_tokens=1)
    assert refused.value.status_code == 429 and refused.value.body["code"] == 429
    running.close()  # the client goes away: its request is cancelled, the queued one takes the slot
    queued.join(timeout=60)
    assert waiting["answer"].choices[0].finish_reason == "length"
    single_slot.wait_for(lambda: single_slot.metrics()["llava_rt_requests_running"] == 0, 5, "idle")
    assert generated() - before - 4 < far_short
    # The same for a client waiting for a whole (non-streamed) answer.
    before = generated()
    connection = http.client.HTTPConnection("127.0.0.1", single_slot.port)
    connection.request("POST", "/v1/chat/completions", json.dumps({"messages": user("Tell me everything.")}))
    single_slot.wait_for(lambda: single_slot.metrics()["llava_rt_requests_running"] == 1, 10, "running")
    connection.close()
    single_slot.wait_for(lambda: single_slot.metrics()["llava_rt_requests_running"] == 0, 10, "freed")
    assert generated() - before < far_short
    single_slot.assert_serving()
    assert single_slot.client().models.list().data[0].id == "tiny"


# ---- loading and the command line ---------------------------------------------------------------------------


def test_health_is_503_while_loading_and_names_a_failed_load(tmp_path):
    from starlette.testclient import TestClient

    from llava_rt.runtime import BundleError
    from llava_rt.serve.app import ServeConfig, create_app

    release = threading.Event()

    def load(config):
        release.wait(30)
        raise BundleError("checksum mismatch for bundle file decoder.onnx")

    with TestClient(create_app(ServeConfig(bundle=tmp_path), load=load)) as client:
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            response = client.request(method, path, json={"messages": user("Hi")})
            assert response.status_code == 503 and response.json()["error"]["message"] == "the model is loading"
        release.set()
        deadline = time.monotonic() + 10
        while "failed" not in (error := client.get("/health").json()["error"]["message"]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert error == "the model failed to load: checksum mismatch for bundle file decoder.onnx"


class _Replay:
    """A scheduler stand-in whose completions replay fixed events at once."""

    def __init__(self, events: list):
        self.events = events

    def submit(self, request, prepared, notify):
        return SimpleNamespace(id="replay", prompt_tokens=3, poll=lambda: list(self.events), cancel=lambda: None)

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


@pytest.mark.parametrize("reason", ["error", "abort"])
def test_a_generation_that_fails_or_is_aborted(tmp_path, reason):
    """Non-streaming: a 500 naming the error, or a 503 for an abort (the server stopping). Streaming: the text so
    far, then OpenAI's error object, or the finish reason "abort"; then [DONE]."""
    from starlette.testclient import TestClient

    from llava_rt.runtime.scheduler import Event
    from llava_rt.serve.app import ServeConfig, create_app
    from llava_rt.serve.completions import Engine

    error = RuntimeError("the device was lost") if reason == "error" else None
    scheduler = _Replay([Event("Hel", 1, 1.0), Event("", 0, 1.1, reason, error)])
    pipeline = SimpleNamespace(max_length=64, prepare=lambda request: SimpleNamespace(input_ids=[1, 2, 3]))
    app = create_app(ServeConfig(bundle=tmp_path), load=lambda config: Engine(pipeline, scheduler))
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        response = client.post("/v1/chat/completions", json={"messages": user("Hi")})
        expected = (500, "generation failed: the device was lost") if error else (503, "cancelled before it finished")
        assert response.status_code == expected[0] and expected[1] in response.json()["error"]["message"]
        response = client.post("/v1/chat/completions", json={"messages": user("Hi"), "stream": True})
        events = [json.loads(line.removeprefix("data: ")) for line in response.text.split("\n\n")[:-2]]
        assert response.text.endswith("data: [DONE]\n\n") and events[1]["choices"][0]["delta"] == {"content": "Hel"}
        if error:
            assert events[2]["error"] == {"message": expected[1], "type": "server_error", "param": None, "code": 500}
        else:
            assert events[2]["choices"][0]["finish_reason"] == "abort"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--port", "70000"], "--port must be in 1..65535, got 70000"),
        (["--max-concurrency", "0"], "--max-concurrency must be a positive integer"),
        (["--vision-segments", "0"], "--vision-segments must be a positive integer"),
        (["--allowed-local-media-path", "/no/such/dir"], "--allowed-local-media-path: no such directory"),
        (["--autoscale", "1:2"], "--autoscale needs --replicas"),
        (["--replicas", "0"], "--replicas must be a positive integer"),
        (["--replicas", "2", "--autoscale", "3:4"], "--autoscale must be MIN:MAX with 1 <= MIN <= --replicas (2) <= MAX"),
        (["--replicas", "2", "--autoscale", "two"], "--autoscale must be MIN:MAX"),
        (["--replicas", "2", "--max-queue", "0"], "--max-queue must be at least 1 with --replicas"),
        (["--replicas", "2", "--replica-cpus", "0"], "--replica-cpus must be a number > 0"),
    ],
)
def test_bad_arguments_are_one_line(bundle, args, fragment):
    assert_one_line_error(run("llava_rt.serve.cli", str(bundle), *args), "llava-serve", fragment)


def test_a_taken_port_is_one_line(bundle):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run("llava_rt.serve.cli", str(bundle), "--port", str(port))
    assert result.returncode == 2
    assert_one_line_error(result, "llava-serve", f"cannot listen on 127.0.0.1:{port}: Address already in use")


def test_missing_bundle_and_missing_extra_are_one_line(tmp_path):
    assert_one_line_error(run("llava_rt.serve.cli", str(tmp_path / "none")), "llava-serve", "bundle directory not found")
    script = "import sys; sys.modules['fastapi'] = None\nfrom llava_rt.serve.cli import main\nsys.exit(main(['x']))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert_one_line_error(result, "llava-serve", 'pip install "llava-rt[serve]"')
