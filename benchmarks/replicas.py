"""Replicas on Ray Serve under load, over HTTP: `llava-serve --replicas` started once per layout.

    python -m llava_rt.benchmarks.replicas BUNDLE [--layouts 0x2,1x2,1x1,2x1,2x2] [--clients 8] [--json out.json]

A layout RxT is R replicas of T onnxruntime threads each; R = 0 is the single server without Ray. Every layout has
`--clients` slots in all (each replica `clients / R`). Two measurements:
- load: `--clients` closed-loop clients each stream `--requests` different text requests: aggregate generated
  tokens per second and time to first token (p50/p99), from the client's side;
- cache affinity (layouts with 2 or more replicas): a multi-turn replay of `--conversations` conversations, their
  turns shuffled and sent by `--replay-clients` clients, each turn repeating the conversation so far; a continued
  turn hits when the replica that answers it held the previous turn (its usage's cached tokens cover the previous
  prompt). Hit rate and continued turns' TTFT under
  `--routing cache-affinity` and under Ray's default (`power-of-two`).
Ray binds its node to a routable address: on a machine without one, run this inside `unshare -n` with `lo` up.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from queue import Empty, Queue

import numpy as np

from ..runtime.console import add_standard_options, run_command, say
from .serving import WORDS, percentiles

START_DEADLINE_S = 600


def _words(seed: int, count: int) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, size=count))


def _stream(port: int, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: time to first token, tokens, cached prompt tokens, the replica, the text."""
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.monotonic()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, pieces, usage = None, [], None
    for line in response:
        data = line.decode().strip().removeprefix("data: ")
        if not data or data == "[DONE]":
            continue
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            if choice["delta"].get("content"):
                first = first or time.monotonic()
                pieces.append(choice["delta"]["content"])
    connection.close()
    return {
        "ttft_s": (first or time.monotonic()) - started,
        "tokens": usage["completion_tokens"],
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
        "replica": response.getheader("x-llava-replica"),
        "text": "".join(pieces),
    }


def _healthy(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False


@contextmanager
def serving(args, replicas: int, threads: int, routing: str = "cache-affinity"):
    """`llava-serve` with `replicas` replicas of `threads` threads (0: no Ray), its port once healthy."""
    port = args.port
    slots = -(-args.clients // max(replicas, 1))
    command = [sys.executable, "-m", "llava_rt.serve.cli", str(args.bundle), "--port", str(port), "--threads", str(threads)]
    command += ["--max-concurrency", str(slots), "--log-level", "warning"]
    command += ["--precision", args.precision] if args.precision else []
    if replicas:
        cpus = (os.cpu_count() or 1) / replicas
        command += ["--replicas", str(replicas), "--replica-cpus", f"{cpus:g}", "--routing", routing]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llava-serve did not start: {process.stderr.read()[-2000:]}")
            time.sleep(1.0)
        _stream(port, [{"role": "user", "content": "warm up"}], 2)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=120)


def _in_threads(work: list) -> None:
    threads = [threading.Thread(target=item) for item in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def measure_load(port: int, args) -> dict:
    results, lock = [], threading.Lock()

    def client(index: int) -> None:
        for request in range(args.requests):
            prompt = _words(1000 * index + request, args.prompt_words)
            outcome = _stream(port, [{"role": "user", "content": prompt}], args.new_tokens)
            with lock:
                results.append(outcome)

    started = time.monotonic()
    _in_threads([lambda i=i: client(i) for i in range(args.clients)])
    wall = time.monotonic() - started
    tokens = sum(result["tokens"] for result in results)
    replicas = {result["replica"] for result in results}
    return {"tokens_per_s": tokens / wall, "ttft": percentiles([r["ttft_s"] for r in results]), "replicas_seen": len(replicas)}


def measure_affinity(port: int, args) -> dict:
    """The replay: every conversation's turn 1 in a shuffled order, then every turn 2 (shuffled again), ..., sent by
    `--replay-clients` workers; a turn waits for its conversation's previous one to be answered."""
    rng = np.random.default_rng(0)
    turns = Queue()
    for turn in range(args.turns):
        for conversation in rng.permutation(args.conversations):
            turns.put((int(conversation), turn))
    histories = [
        [{"role": "user", "content": f"Conversation {c}. {_words(c, args.prompt_words)}"}] for c in range(args.conversations)
    ]
    answered, previous = [0] * args.conversations, [None] * args.conversations
    continued, turn_done = [], threading.Condition()  # (hit, ttft) of every turn after the first

    def worker() -> None:
        while True:
            try:
                conversation, turn = turns.get_nowait()
            except Empty:
                return
            with turn_done:
                turn_done.wait_for(lambda: answered[conversation] == turn)
            outcome = _stream(port, histories[conversation], args.turn_tokens)
            with turn_done:
                if previous[conversation] is not None:
                    hit = outcome["cached_tokens"] >= previous[conversation]["prompt_tokens"] - 1
                    continued.append((hit, outcome["ttft_s"]))
                previous[conversation] = outcome
                answer, question = {"role": "assistant", "content": outcome["text"]}, {"role": "user", "content": f"And {turn}?"}
                histories[conversation] += [answer, question]
                answered[conversation] += 1
                turn_done.notify_all()

    _in_threads([worker] * args.replay_clients)
    hits = sum(hit for hit, _ in continued)
    return {
        "continuations": len(continued),
        "hits": hits,
        "hit_rate": hits / len(continued),
        "ttft_continuation_p50_ms": float(np.median([ttft for _, ttft in continued]) * 1e3),
    }


def report(results: dict) -> str:
    rows = results["layouts"]
    base = rows[0]["load"]["tokens_per_s"]
    lines = [
        f"| layout (replicas x threads) | tok/s ({results['clients']} clients) | vs {rows[0]['layout']} | TTFT p50 / p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        load = row["load"]
        name = "single server (no Ray)" if row["replicas"] == 0 else row["layout"]
        lines.append(
            f"| {name} | {load['tokens_per_s']:.1f} | {load['tokens_per_s'] / base:.2f}x "
            f"| {load['ttft']['p50_ms']:.0f} / {load['ttft']['p99_ms']:.0f} |"
        )
    lines += ["", "| layout | routing | continued turns on their cache | continued turns' TTFT p50 ms |", "|---|---|---:|---:|"]
    for row in results["affinity"]:
        lines.append(
            f"| {row['layout']} | {row['routing']} | {row['hits']} / {row['continuations']} ({row['hit_rate']:.0%}) "
            f"| {row['ttft_continuation_p50_ms']:.0f} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-bench-replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a bundle directory (e.g. llava-bench --preset ... --build-only's)")
    parser.add_argument("--layouts", default="0x2,1x2,1x1,2x1,2x2", help="REPLICASxTHREADS, comma-separated (0: no Ray)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the load test (default 8)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    parser.add_argument("--prompt-words", type=int, default=32, help="words per text prompt (default 32: about 140 tokens)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max tokens per answer (default 64)")
    parser.add_argument("--conversations", type=int, default=8, help="conversations in the affinity replay (default 8)")
    parser.add_argument("--replay-clients", type=int, default=4, help="clients sending the replay's turns (default 4)")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation (default 4)")
    parser.add_argument("--turn-tokens", type=int, default=16, help="max tokens per answer in the replay (default 16)")
    parser.add_argument("--precision", help="the bundle's precision to run (default: the runtime's choice)")
    parser.add_argument("--port", type=int, default=8321, help="port of the servers it starts (default 8321)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    add_standard_options(parser)
    return parser


def _bench(args) -> int:
    results = {"bundle": str(args.bundle), "clients": args.clients, "layouts": [], "affinity": []}
    for layout in args.layouts.split(","):
        replicas, threads = (int(part) for part in layout.split("x"))
        say(f"{layout}: load")
        with serving(args, replicas, threads) as port:
            row = {"layout": layout, "replicas": replicas, "threads": threads, "load": measure_load(port, args)}
            results["layouts"].append(row)
            if replicas >= 2:
                say(f"{layout}: affinity replay, cache-affinity routing")
                results["affinity"].append({"layout": layout, "routing": "cache-affinity", **measure_affinity(port, args)})
        if replicas >= 2:
            say(f"{layout}: affinity replay, power-of-two routing")
            with serving(args, replicas, threads, routing="power-of-two") as port:
                results["affinity"].append({"layout": layout, "routing": "power-of-two", **measure_affinity(port, args)})
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), _bench, argv)


if __name__ == "__main__":
    raise SystemExit(main())
