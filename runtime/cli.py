"""`llava-run`: answer one prompt (with images) from a bundle."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import LlavaRtError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-run",
        description="Render one user turn (the images, the videos, then the text) with the bundle's chat template "
        "and print the answer.",
    )
    parser.add_argument("bundle", help="bundle directory written by llava-export")
    parser.add_argument("--prompt", required=True, help="the user's question")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several images")
    parser.add_argument(
        "--video", action="append", default=[], metavar="PATH", help="a video file (needs PyAV: llava-rt[video]); repeatable"
    )
    parser.add_argument(
        "--num-frames", type=int, default=8, metavar="N", help="frames sampled uniformly from each video (default: 8)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="most tokens to generate (default: 128)")
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads (default: all cores)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with the prompt, ids, text and timings")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise LlavaRtError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        from .pipeline import Pipeline

        pipeline = Pipeline.load(args.bundle, threads=args.threads)
        result = pipeline.generate(
            prompt=args.prompt,
            images=args.image,
            videos=args.video,
            num_frames=args.num_frames,
            max_new_tokens=args.max_new_tokens,
        )
    except LlavaRtError as exc:
        print(f"llava-run: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        fields = ("prompt", "input_tokens", "token_ids", "text", "timings_ms", "tokens_per_s")
        print(json.dumps({key: result.to_dict()[key] for key in fields}))
    else:
        print(result.text)
        timings = ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in result.timings_ms.items())
        print(
            f"[{result.input_tokens} prompt tokens, {len(result.token_ids)} generated; {timings}; "
            f"{result.tokens_per_s:.1f} tokens/s]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
