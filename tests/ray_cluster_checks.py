"""Replicas on Ray Serve, end to end: run by tests/test_cluster.py inside a network namespace with only loopback
(Ray binds its node to the machine's routable address otherwise), never collected on their own. The bundle comes
from $LLAVA_RT_CLUSTER_BUNDLE."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve import Server, ask, serving, stream_text, user

RAY_LOGS = Path(os.environ["RAY_TMPDIR"], "ray", "session_latest", "logs", "serve")
SLOTS, QUEUE = 2, 16  # per replica, and Ray's queue in front of both (it counts requests being routed too)
LONG = user("Tell me everything.")  # greedy, without max_tokens, over 4000 tokens


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Server:
    """The single server (no Ray) on the same bundle."""
    bundle = Path(os.environ["LLAVA_RT_CLUSTER_BUNDLE"])
    with serving(bundle, tmp_path_factory.mktemp("single")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Server:
    bundle = Path(os.environ["LLAVA_RT_CLUSTER_BUNDLE"])
    limits = ("--max-concurrency", str(SLOTS), "--max-queue", str(QUEUE))
    with serving(bundle, tmp_path_factory.mktemp("cluster"), "--replicas", "2", "--replica-cpus", "0.5", *limits) as server:
        yield server
    _assert_no_ray_processes_left()


def _assert_no_ray_processes_left() -> None:
    deadline = time.monotonic() + 30
    while (left := _ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left after the server stopped: {left}"


def _ray_processes() -> list[str]:
    found = subprocess.run(["pgrep", "-a", "-f", "raylet|gcs_server|ray::"], capture_output=True, text=True).stdout
    return found.splitlines()


def answer_and_replica(server: Server, messages: list[dict], **options) -> tuple[object, str]:
    raw = server.client().chat.completions.with_raw_response.create(model=server.model, messages=messages, **options)
    return raw.parse(), raw.headers["x-llava-replica"]


def replica_pid(replica_id: str) -> int:
    log = RAY_LOGS.glob(f"replica_*_LlavaModel_{replica_id}.log")
    return int(re.search(r"loaded \(pid (\d+)\)", next(log).read_text()).group(1))


QUESTIONS = [user(f"Question number {i}: what is {i} times {i}?") for i in range(16)]


@pytest.fixture(scope="module")
def single_answers(reference) -> list[str]:
    return [ask(reference, messages, max_tokens=10).choices[0].message.content for messages in QUESTIONS]


def test_joining_a_running_cluster_leaves_it_running(tmp_path, monkeypatch):
    """`--ray-address`: the app is deployed on a cluster `ray start` made, with Ray's token authentication on (the
    token in a home of the test's own), and removed from it on SIGTERM, the cluster left running."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # Ray keeps its token in ~/.ray/auth_token
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    ray = [str(Path(sys.executable).with_name("ray"))]
    subprocess.run(ray + ["get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)
    head = ["start", "--head", "--port", "6390", "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats"]
    subprocess.run(ray + head, check=True, capture_output=True, timeout=120)
    try:
        bundle = Path(os.environ["LLAVA_RT_CLUSTER_BUNDLE"])
        with serving(bundle, tmp_path, "--replicas", "1", "--ray-address", "127.0.0.1:6390") as server:
            assert ask(server, user("Hi"), max_tokens=2).choices[0].finish_reason == "length"
        deadline = time.monotonic() + 30  # `ray status` reports resources as the cluster last sent them
        while True:
            status = subprocess.run(ray + ["status", "--address", "127.0.0.1:6390"], capture_output=True, text=True, timeout=60)
            assert status.returncode == 0 and "2.0 CPU" in status.stdout, status.stdout + status.stderr
            if " 0.0/2.0 CPU" in status.stdout or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert " 0.0/2.0 CPU" in status.stdout, "the replica's CPU is still reserved: the app was not removed"
    finally:
        subprocess.run(ray + ["stop", "--force"], capture_output=True, timeout=120)


def test_a_taken_port_is_one_line_and_leaves_no_ray_behind():
    """Ray Serve's HTTP proxy cannot bind: one line, status 2, and the local Ray cluster is stopped."""
    bundle = os.environ["LLAVA_RT_CLUSTER_BUNDLE"]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "llava_rt.serve.cli", bundle, "--replicas", "1", "--port", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("llava-serve: error:")]
    assert errors == [
        f"llava-serve: error: Ray Serve's HTTP proxy did not start on 127.0.0.1:{port}: "
        f"Failed to bind to address '127.0.0.1:{port}'."
    ], result.stderr
    _assert_no_ray_processes_left()


def test_streamed_answers_equal_the_single_server(cluster, reference):
    for messages in (user("Hello there, who are you?"), LONG):
        expected = ask(reference, messages, max_tokens=24).choices[0].message.content
        text, chunks = stream_text(cluster, messages, max_tokens=24)
        assert text == expected and chunks[-1].choices[0].finish_reason == "length"


def test_sixteen_concurrent_requests_are_served_by_both_replicas(cluster, single_answers):
    results, replicas = [None] * len(QUESTIONS), set()
    barrier = threading.Barrier(len(QUESTIONS))

    def client(index: int) -> None:
        barrier.wait()
        answer, replica = answer_and_replica(cluster, QUESTIONS[index], max_tokens=10)
        results[index] = answer.choices[0].message.content
        replicas.add(replica)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == single_answers and len(replicas) == 2


def test_continued_conversations_land_on_the_replica_holding_their_cache(cluster):
    for i in range(4):
        opening = user(f"Conversation {i}. " + "Here is a long preamble about colours and numbers. " * 4)
        first, replica = answer_and_replica(cluster, opening, max_tokens=6)
        follow_up = [*opening, {"role": "assistant", "content": first.choices[0].message.content}, *user("Go on.")]
        second, again = answer_and_replica(cluster, follow_up, max_tokens=4)
        assert again == replica
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def _summed_metrics(server: Server) -> tuple[Counter[str], int]:
    """Each llava-rt sample's value summed over the replicas, and how many replicas the scrape gathered."""
    _, _, body = server.http("GET", "/metrics")
    sums, replicas = Counter(), set()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            sums[sample.name] += sample.value
            replicas.add(sample.labels["replica"])
    return sums, len(replicas)


def _idle_metrics(server: Server) -> Counter[str]:
    """The summed metrics of both replicas once neither is running a request."""
    scraped: list[tuple[Counter[str], int]] = []

    def idle() -> bool:
        scraped.append(_summed_metrics(server))
        sums, replicas = scraped[-1]
        return replicas == 2 and sums["llava_rt_requests_running"] == 0

    server.wait_for(idle, 30, "both replicas idle")
    return scraped[-1][0]


@contextmanager
def every_slot_busy(server: Server):
    """Every slot of both replicas decoding the 4066-token answer, streamed and unread; the streams closed after."""
    with ThreadPoolExecutor(2 * SLOTS) as pool:
        holders = list(pool.map(lambda _: ask(server, LONG, stream=True), range(2 * SLOTS)))
    try:
        for stream in holders:
            next(stream)
        yield holders
    finally:
        for stream in holders:
            stream.close()


def test_metrics_gather_every_replica_while_every_slot_is_busy(cluster):
    """The scrape is not a request to the replicas (those wait for a free slot): it reads both while they are full."""
    with every_slot_busy(cluster):
        sums, replicas = _summed_metrics(cluster)
    assert replicas == 2 and sums["llava_rt_requests_running"] == 2 * SLOTS
    assert "llava_rt_generated_tokens_total" in sums and "llava_rt_prefix_cache_hits_total" in sums


@contextmanager
def stopped(pids: set[int]):
    """The processes stopped (SIGSTOP) inside the block, continued after it."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_a_full_cluster_answers_429_and_serves_its_queue_after(cluster):
    """Every slot holds a long answer, and the replicas are stopped (SIGSTOP) so that none finishes meanwhile: QUEUE
    of QUEUE + 2 requests wait in Ray's queue, the other two are refused with 429, and once the replicas go on the
    queue is served. Counted, not timed: whichever requests arrive last are the refused ones."""
    outcomes: list = []

    def queued(i: int) -> None:
        try:
            outcomes.append(ask(cluster, user(f"Hi {i}"), max_tokens=2))
        except openai.APIError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=queued, args=(i,)) for i in range(QUEUE + 2)]
    with every_slot_busy(cluster) as holders:
        pids = {replica_pid(stream.response.headers["x-llava-replica"]) for stream in holders}
        assert len(pids) == 2
        with stopped(pids):
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while len(outcomes) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
    for thread in threads:
        if thread.ident is not None:  # started
            thread.join(timeout=60)
    refused = [outcome for outcome in outcomes if isinstance(outcome, openai.APIError)]
    assert [(exc.status_code, exc.body["code"]) for exc in refused] == [(429, 429)] * 2, refused
    answers = [outcome for outcome in outcomes if not isinstance(outcome, openai.APIError)]
    assert len(answers) == QUEUE and all(answer.choices[0].finish_reason == "length" for answer in answers)


def test_a_client_that_leaves_stops_its_generation_on_the_replica(cluster):
    """Counted in tokens, not timed: that answer runs to over 4000 tokens; cancelled, it stops far short of that."""
    before = _idle_metrics(cluster)["llava_rt_generated_tokens_total"]
    stream = ask(cluster, LONG, stream=True)
    for _ in range(5):
        next(stream)
    stream.close()
    assert _idle_metrics(cluster)["llava_rt_generated_tokens_total"] - before < 2000


def _stream_lines(port: int, messages: list[dict]):
    """A raw streamed request: its replica and an iterator over its SSE data lines."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps({"messages": messages, "stream": True}))
    response = connection.getresponse()
    assert response.status == 200
    lines = (line.decode().strip() for line in response)
    return response.getheader("x-llava-replica"), (line for line in lines if line.startswith("data: "))


def test_a_killed_replica_fails_its_requests_with_503_and_is_replaced(cluster):
    replica, lines = _stream_lines(cluster.port, user("Tell me everything, once more."))
    next(lines)
    os.kill(replica_pid(replica), signal.SIGKILL)
    rest = list(lines)
    error = json.loads(rest[-1].removeprefix("data: "))["error"]
    assert error["code"] == 503 and "stopped while answering" in error["message"]
    for i in range(4):  # answered meanwhile by the other replica, then by both
        assert ask(cluster, user(f"After the crash {i}"), max_tokens=2).choices[0].finish_reason == "length"
    deadline, replicas = time.monotonic() + 60, set()
    while len(replicas - {replica}) < 2 and time.monotonic() < deadline:
        replicas.add(answer_and_replica(cluster, user("Who is there?"), max_tokens=1)[1])
    assert len(replicas - {replica}) == 2, "Ray did not replace the killed replica"
