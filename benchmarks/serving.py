"""Continuous batching under load: concurrent clients on one `Scheduler`, in one process.

    python -m llava_rt.benchmarks.serving BUNDLE [--clients 1,2,4,8] [--threads 2] [--json out.json]

Three measurements, each with a fresh scheduler over one loaded pipeline:
- load: N clients each send `--requests` text requests in a row (distinct prompts of `--prompt-tokens` tokens,
  `--new-tokens` tokens each, end-of-sequence held back so every answer has the same length): aggregate generated
  tokens per second, time to first token and inter-token latency (p50/p99 over every request and token);
- prefill interference: `--streams` text streams decoding while one image request arrives; the streams'
  inter-token latency while the image is prefilled, for each `--prefill-chunk` (the largest is no chunking),
  against one client's inter-token p99 alone (from the load test); the vision graph runs as `--vision-segments`
  segments, as `llava-serve` runs it, and an image is run once before the timing;
- prefix reuse: a multi-turn replay (each conversation's next turn repeats the image and the answers so far); how
  many turns start from a cached prefix and their time to first token against the first turns'.
p99 over a few hundred samples hides a single long stall: the maximum is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

from ..runtime.chat import user_turn
from ..runtime.console import add_standard_options, run_command, say
from ..runtime.pipeline import Pipeline
from ..runtime.request import Request
from ..runtime.scheduler import Completion, Scheduler
from ..serve.config import CPU_VISION_SEGMENTS
from .sides import synthetic_image

WORDS = "river stone cloud lamp forest window paper garden silver engine marble candle".split()


def _text_prompt(pipeline: Pipeline, client: int, tokens: int) -> str:
    """A user prompt of about `tokens` tokens, different for each client (no shared prefix beyond the template)."""
    rng = np.random.default_rng(client)
    words = list(rng.choice(WORDS, size=tokens))
    while len(pipeline.tokenizer.encode(pipeline.render(user_turn(" ".join(words), 0)))) > tokens and len(words) > 1:
        words.pop()
    return " ".join(words)


def _timings(completion: Completion) -> tuple[float, list[float], int]:
    """Follow a completion to its end: time to first token, the gaps between tokens, tokens generated."""
    times = [event.time for event in completion.events() if event.tokens]
    return times[0] - completion.created, list(np.diff(times)), len(times)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    p50, p99 = np.percentile(values, [50, 99]) * 1e3
    return {"p50_ms": float(p50), "p99_ms": float(p99), "max_ms": float(max(values) * 1e3)}


def measure_load(pipeline: Pipeline, clients: int, args) -> dict:
    """`clients` closed-loop clients, each sending `args.requests` different text requests one after the other."""
    prompts = [[_text_prompt(pipeline, 1000 * c + r, args.prompt_tokens) for r in range(args.requests)] for c in range(clients)]
    ttft, gaps, tokens = [], [], [0]
    lock = threading.Lock()

    def client(prompts: list[str]) -> None:
        for prompt in prompts:
            request = Request.build(prompt=prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
            first, between, count = _timings(scheduler.submit(request))
            with lock:
                ttft.append(first)
                gaps.extend(between)
                tokens[0] += count

    with Scheduler(pipeline, max_concurrency=max(clients, 1), prefill_chunk=args.load_chunk) as scheduler:
        scheduler.generate(prompt="warm up", max_new_tokens=2)
        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(own,)) for own in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - started
    return {
        "clients": clients,
        "generated_tokens": tokens[0],
        "wall_s": wall,
        "tokens_per_s": tokens[0] / wall,
        "ttft": percentiles(ttft),
        "inter_token": percentiles(gaps),
    }


def measure_interference(pipeline: Pipeline, streams: int, chunk: int, args) -> dict:
    """`streams` text streams decoding while one image request is prefilled with `chunk`."""
    image = synthetic_image(args.image_size)
    with Scheduler(pipeline, max_concurrency=streams + 1, prefill_chunk=chunk) as scheduler:
        # a first image pays for its graphs' first runs (memory first touched): a server that has run a while does not
        scheduler.generate(prompt="warm up", images=[synthetic_image(args.image_size, seed=1000)], max_new_tokens=2)
        budget = 4096  # outlasts the image's prefill; the streams are cancelled once it is done
        texts = [
            scheduler.submit(Request.build(prompt=_text_prompt(pipeline, c, 64), max_new_tokens=budget, min_new_tokens=budget))
            for c in range(streams)
        ]
        times: list[list[float]] = [[] for _ in texts]

        def follow(index: int) -> None:
            times[index] = [event.time for event in texts[index].events() if event.tokens]

        followers = [threading.Thread(target=follow, args=(i,)) for i in range(streams)]
        for follower in followers:
            follower.start()
        time.sleep(args.settle_s)  # let the streams reach their decode steps
        image_request = scheduler.submit(Request.build(prompt="Describe the picture.", images=[image], max_new_tokens=1))
        image_request.result()
        window = (image_request.created, image_request.first_token_time)
        for completion in texts:
            completion.cancel()
        for follower in followers:
            follower.join()
    # every gap overlapping the prefill, including the one it ends (the streams' next token comes after the image's first)
    gaps = [b - a for stream in times for a, b in zip(stream, stream[1:]) if a < window[1] and b > window[0]]
    return {
        "streams": streams,
        "prefill_chunk": chunk,
        "image_prompt_tokens": image_request.prompt_tokens,
        "image_ttft_s": window[1] - window[0],
        "inter_token_during_prefill": percentiles(gaps),
        "samples": len(gaps),
    }


def measure_prefix_reuse(pipeline: Pipeline, args) -> dict:
    """A multi-turn replay: each conversation asks `args.turns` questions about its own image, one after the other."""
    conversations = args.conversations
    first, later, reused = [], [], []
    with Scheduler(pipeline, max_concurrency=conversations, prefill_chunk=args.load_chunk) as scheduler:

        def converse(index: int) -> None:
            image = synthetic_image(args.image_size, seed=index)
            messages: list[dict] = []
            for turn in range(args.turns):
                content = [{"type": "text", "text": f"Question {turn} about it?"}]
                messages.append({"role": "user", "content": ([{"type": "image"}] if turn == 0 else []) + content})
                completion = scheduler.submit(Request.build(messages, images=[image], max_new_tokens=args.turn_tokens))
                result = completion.result()
                (first if turn == 0 else later).append(result.timings_ms["time_to_first_token"] / 1e3)
                if turn:
                    reused.append(result.reused_tokens)
                messages.append({"role": "assistant", "content": result.text})

        threads = [threading.Thread(target=converse, args=(i,)) for i in range(conversations)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = scheduler.stats()
    return {
        "continuations": len(later),
        "continuations_from_cache": sum(1 for r in reused if r > 0),
        "reused_tokens_mean": float(np.mean(reused)) if reused else 0.0,
        "ttft_first_turn_s": float(np.median(first)),
        "ttft_continuation_s": float(np.median(later)) if later else 0.0,
        "feature_cache_hits": stats["feature_cache_hits"],
    }


def report(results: dict) -> str:
    """Markdown tables of the three measurements."""
    load = results["load"]
    base = load[0]
    lines = [
        "| clients | tok/s (all clients) | vs 1 client | TTFT p50 / p99 ms | inter-token p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in load:
        lines.append(
            f"| {row['clients']} | {row['tokens_per_s']:.1f} | {row['tokens_per_s'] / base['tokens_per_s']:.2f}x "
            f"| {row['ttft']['p50_ms']:.0f} / {row['ttft']['p99_ms']:.0f} "
            f"| {row['inter_token']['p50_ms']:.0f} / {row['inter_token']['p99_ms']:.0f} |"
        )
    one = next((row for row in load if row["clients"] == 1), base)["inter_token"]["p99_ms"]
    lines += [
        "",
        "| streams | prefill chunk | image prompt tokens | image TTFT s | streams' inter-token p50 / p99 / max ms during it "
        "| p99 vs 1 client alone |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["interference"]:
        gap = row["inter_token_during_prefill"]
        lines.append(
            f"| {row['streams']} | {row['prefill_chunk']} | {row['image_prompt_tokens']} | {row['image_ttft_s']:.1f} "
            f"| {gap['p50_ms']:.0f} / {gap['p99_ms']:.0f} / {gap['max_ms']:.0f} | {gap['p99_ms'] / one:.2f}x |"
        )
    reuse = results["prefix_reuse"]
    lines += [
        "",
        f"prefix reuse: {reuse['continuations_from_cache']} of {reuse['continuations']} continued turns started from a "
        f"cached prefix ({reuse['reused_tokens_mean']:.0f} tokens on average); TTFT median "
        f"{reuse['ttft_continuation_s']:.2f} s against {reuse['ttft_first_turn_s']:.2f} s for first turns.",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-bench-serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a bundle directory (e.g. llava-bench --preset ... --build-only's)")
    parser.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts (default 1,2,4,8)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the load test (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="tokens per text prompt (default 128)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per answer (default 128)")
    parser.add_argument("--load-chunk", type=int, default=32, help="prefill chunk of the load tests (default 32, the server's)")
    parser.add_argument("--prefill-chunk", default="16,32,128,100000", help="chunks for the interference test")
    parser.add_argument("--streams", default="1,4", help="text streams decoding during the image prefill (default 1,4)")
    parser.add_argument("--settle-s", type=float, default=3.0, help="seconds the streams decode before the image comes")
    parser.add_argument("--image-size", type=int, default=384, help="side of the square test image (default 384)")
    parser.add_argument("--conversations", type=int, default=4, help="conversations in the prefix replay (default 4)")
    parser.add_argument("--turns", type=int, default=3, help="turns per conversation (default 3)")
    parser.add_argument("--turn-tokens", type=int, default=16, help="tokens per answer in the replay (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument(
        "--vision-segments",
        type=int,
        default=CPU_VISION_SEGMENTS,
        help="segments of the vision graph (default %(default)s, llava-serve's on the CPU)",
    )
    parser.add_argument("--precision", help="the bundle's precision to run (default: the runtime's choice)")
    parser.add_argument("--form", choices=("standard", "onnxruntime"), help="the variants' form (default: the runtime's choice)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    add_standard_options(parser)
    return parser


def _bench(args) -> int:
    pipeline = Pipeline.load(
        args.bundle, threads=args.threads, precision=args.precision, form=args.form, vision_segments=args.vision_segments
    )
    say(f"{args.bundle.name}: {pipeline.selection.describe()}, {args.threads} threads")
    results = {"bundle": str(args.bundle), "precision": pipeline.selection.precision, "threads": args.threads}
    results["load"] = [measure_load(pipeline, int(c), args) for c in args.clients.split(",")]
    results["interference"] = [
        measure_interference(pipeline, int(streams), int(chunk), args)
        for streams in args.streams.split(",")
        for chunk in args.prefill_chunk.split(",")
    ]
    results["prefix_reuse"] = measure_prefix_reuse(pipeline, args)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), _bench, argv)


if __name__ == "__main__":
    raise SystemExit(main())
