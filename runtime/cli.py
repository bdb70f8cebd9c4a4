"""`llava-run`: answer one prompt (with images and videos) from a bundle, or chat at a terminal."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import InputError, LlavaRtError

INTERACTIVE_HELP = "type a message; /image PATH and /video PATH attach media to the next message; /reset; /quit"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-run",
        description="Render one user turn (the images, the videos, then the text) with the bundle's chat template "
        "and print the answer; or chat with --interactive.",
    )
    parser.add_argument("bundle", help="bundle directory written by llava-export")
    parser.add_argument("--prompt", help="the user's question (required unless --interactive)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several images")
    parser.add_argument(
        "--video", action="append", default=[], metavar="PATH", help="a video file (needs PyAV: llava-rt[video]); repeatable"
    )
    parser.add_argument(
        "--num-frames", type=int, default=8, metavar="N", help="frames sampled uniformly from each video (default: 8)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="most tokens to generate (default: 128)")
    search = parser.add_argument_group(
        "generation",
        "Unset options take the checkpoint's generation config, then transformers' defaults (greedy; when sampling: "
        "temperature 1, top-k 50, top-p 1). Giving --temperature, --top-k, --top-p or --min-p turns sampling on.",
    )
    search.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    search.add_argument("--temperature", type=float, metavar="T", help="softmax temperature (> 0)")
    search.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens (0: off)")
    search.add_argument(
        "--top-p", type=float, metavar="P", help="keep the smallest set of tokens with probability >= P, in (0, 1]"
    )
    search.add_argument("--min-p", type=float, metavar="P", help="drop tokens less likely than P x the most likely one")
    search.add_argument("--repetition-penalty", type=float, metavar="R", help="penalize tokens already in the sequence (1: off)")
    search.add_argument("--min-new-tokens", type=int, metavar="N", help="hold end-of-sequence back until N new tokens")
    search.add_argument("--seed", type=int, metavar="N", help="random seed: the same seed reproduces a sampled answer")
    search.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text; repeatable")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--interactive", action="store_true", help="chat at the terminal, reusing the KV cache across turns")
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads (default: all cores)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with the prompt, ids, text and timings")
    return parser


def _search_options(args) -> dict:
    keys = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "min_new_tokens", "seed")
    options = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if args.stop:
        options["stop"] = tuple(args.stop)
    return options


def _print_timings(result) -> None:
    timings = ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in result.timings_ms.items() if not stage.startswith("feature"))
    reused = f", {result.reused_tokens} reused from the cache" if result.reused_tokens else ""
    print(
        f"[{result.input_tokens} prompt tokens{reused}, {len(result.token_ids)} generated; {timings}; "
        f"{result.tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )


def _interactive(pipeline, args, search: dict) -> int:
    from .chat_session import ChatSession

    session = ChatSession(pipeline)
    images, videos = list(args.image), list(args.video)
    print(f"llava-run: {INTERACTIVE_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return 0
        if command == "/reset":
            session.reset()
        elif command in ("/image", "/video"):
            (images if command == "/image" else videos).append(rest.strip())
        elif line:
            try:
                for piece in session.stream(
                    line, images=images, videos=videos, num_frames=args.num_frames, max_new_tokens=args.max_new_tokens, **search
                ):
                    print(piece, end="", flush=True)
                print()
                _print_timings(session.last_result)
            except InputError as exc:
                print(f"llava-run: error: {exc}", file=sys.stderr)
            images, videos = [], []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise LlavaRtError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        if args.prompt is None and not args.interactive:
            raise LlavaRtError("--prompt is required (or use --interactive)")
        from .pipeline import Pipeline

        pipeline = Pipeline.load(args.bundle, threads=args.threads)
        search = _search_options(args)
        pipeline.search_options(**search)  # validate before any work
        if args.interactive:
            return _interactive(pipeline, args, search)
        ask = dict(prompt=args.prompt, images=args.image, videos=args.video, num_frames=args.num_frames)
        if args.stream and not args.json:
            for piece in pipeline.stream(**ask, max_new_tokens=args.max_new_tokens, **search):
                print(piece, end="", flush=True)
            print()
            return 0
        result = pipeline.generate(**ask, max_new_tokens=args.max_new_tokens, **search)
    except LlavaRtError as exc:
        print(f"llava-run: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        fields = ("prompt", "input_tokens", "token_ids", "text", "timings_ms", "tokens_per_s")
        print(json.dumps({key: result.to_dict()[key] for key in fields}))
    else:
        print(result.text)
        _print_timings(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
