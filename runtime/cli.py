"""`llava-run`: answer one prompt (with images and videos) from a bundle, or chat at a terminal."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from .backends import BACKENDS, DEVICES
from .console import Terminated, add_standard_options, one_line, run_command, say
from .errors import LlavaRtError
from .image_processing import MAX_IMAGE_PIXELS
from .manifest_schema import FORMS, PRECISIONS
from .request import DEFAULT_MAX_NEW_TOKENS, DEFAULT_NUM_FRAMES

INTERACTIVE_HELP = """commands:
  /image PATH   attach an image to the next message (repeatable)
  /video PATH   attach a video to the next message (repeatable)
  /reset        forget the conversation (the system prompt stays)
  /help         show this help
  /quit         leave (or Ctrl-D; Ctrl-C at the prompt)
Ctrl-C during an answer stops it and keeps the conversation."""
RESULT_FIELDS = ("prompt", "input_tokens", "token_ids", "text", "finish_reason", "timings_ms", "tokens_per_s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-run",
        description="Render one user turn (the images, the videos, then the text) with the bundle's chat template "
        "and print the answer; or chat with --interactive.",
    )
    parser.add_argument("bundle", help="bundle directory written by llava-export")
    parser.add_argument("--prompt", help="the user's question (required unless --interactive, where it is the first turn)")
    parser.add_argument("--system", metavar="TEXT", help="a system prompt before the conversation")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several images")
    parser.add_argument(
        "--video", action="append", default=[], metavar="PATH", help="a video file (needs PyAV: llava-rt[video]); repeatable"
    )
    parser.add_argument(
        "--num-frames",
        type=int,
        default=DEFAULT_NUM_FRAMES,
        metavar="N",
        help=f"frames sampled uniformly from each video (default: {DEFAULT_NUM_FRAMES})",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"most tokens to generate; the model's context may end the answer sooner (default: {DEFAULT_MAX_NEW_TOKENS})",
    )
    search = parser.add_argument_group(
        "generation",
        "Unset options take the checkpoint's generation config, then transformers' defaults (greedy; when sampling: "
        "temperature 1, top-k 50, top-p 1). Giving --temperature, --top-k, --top-p or --min-p turns sampling on.",
    )
    search.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    search.add_argument("--temperature", type=float, metavar="T", help="softmax temperature (> 0; 0 means greedy)")
    search.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens (0: off)")
    search.add_argument(
        "--top-p", type=float, metavar="P", help="keep the smallest set of tokens with probability >= P, in (0, 1]"
    )
    search.add_argument("--min-p", type=float, metavar="P", help="drop tokens less likely than P x the most likely one")
    search.add_argument("--repetition-penalty", type=float, metavar="R", help="penalize tokens already in the sequence (1: off)")
    search.add_argument("--min-new-tokens", type=int, metavar="N", help="hold end-of-sequence back until N new tokens")
    search.add_argument("--seed", type=int, metavar="N", help="random seed: the same seed reproduces a sampled answer")
    search.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text; repeatable")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated (with --json: JSON lines)")
    parser.add_argument("--interactive", action="store_true", help="chat at the terminal, reusing the KV cache across turns")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="graph variants to run (default: the best the bundle has for the backend and device; said on stderr)",
    )
    parser.add_argument(
        "--form",
        choices=FORMS,
        default=None,
        help="run this form of each variant where the bundle has it: standard (what TensorRT builds) or onnxruntime's "
        "own (default: the backend's preferred form)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="onnxruntime",
        help="what runs the graphs: onnxruntime (default), or the TensorRT plans `llava-engines build` wrote into the "
        "bundle (on a GPU; needs llava-rt[tensorrt])",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        help="where onnxruntime runs the graphs: the CPU (default), an NVIDIA GPU through its CUDA provider, or its "
        "TensorRT provider (engines cached in the bundle's engines/ folder); cuda and tensorrt need onnxruntime-gpu "
        "and llava-rt[gpu]. TensorRT plans run on cuda",
    )
    parser.add_argument(
        "--provider-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option for the device's onnxruntime provider, passed through (e.g. trt_fp16_enable=True); repeatable",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="onnxruntime intra-op threads per graph (default: onnxruntime's, one per physical core)",
    )
    parser.add_argument(
        "--verify",
        choices=("auto", "full"),
        default="auto",
        help="bundle checksums: re-hash only files changed since they were last verified (auto, the default) or all (full)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        metavar="N",
        help=f"refuse an image or video frame with more pixels, before decoding it (default: {MAX_IMAGE_PIXELS})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the prompt, ids, text, finish reason and timings "
        "(with --stream: one object per text piece first)",
    )
    return add_standard_options(parser)


def _request_fields(args) -> dict:
    """The generation arguments every turn shares: frames, length and search options."""
    keys = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "min_new_tokens", "seed")
    fields = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if args.stop:
        fields["stop"] = tuple(args.stop)
    return {"num_frames": args.num_frames, "max_new_tokens": args.max_new_tokens, **fields}


def _print_timings(result) -> None:
    timings = ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in result.timings_ms.items() if not stage.startswith("feature"))
    reused = f", {result.reused_tokens} reused from the cache" if result.reused_tokens else ""
    print(
        f"[{result.input_tokens} prompt tokens{reused}, {len(result.token_ids)} generated ({result.finish_reason}); "
        f"{timings}; {result.tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )


def _answer(pipeline, args) -> int:
    """One request: the system prompt (if any) and one user turn; printed as text, a stream or JSON."""
    from .chat import user_turn
    from .request import Request

    messages = user_turn(args.prompt, len(args.image), len(args.video))
    if args.system is not None:
        messages.insert(0, {"role": "system", "content": args.system})
    run = pipeline.start(Request.build(messages, images=args.image, videos=args.video, **_request_fields(args)))
    for _, piece in run:
        if piece and args.stream:
            print(json.dumps({"text": piece}) if args.json else piece, end="\n" if args.json else "", flush=True)
    result = run.results[0]
    if args.json:
        print(json.dumps({key: result.to_dict()[key] for key in RESULT_FIELDS}))
        return 0
    print(result.text if not args.stream else "")
    _print_timings(result)
    return 0


def _interactive(pipeline, args) -> int:
    """Chat at the terminal; each turn's answer is streamed. Line editing and history come from readline."""
    import readline  # noqa: F401  (importing it gives input() line editing and history)

    from .chat_session import ChatSession

    sys.stdin.reconfigure(errors="surrogateescape")  # undecodable bytes reach the tokenizer's check, not a traceback
    session = ChatSession(pipeline, system=args.system)
    fields = _request_fields(args)
    images, videos = list(args.image), list(args.video)
    pending = [args.prompt] if args.prompt else []
    print("llava-run: chatting; /help for commands", file=sys.stderr)
    while True:
        try:
            line = (pending.pop() if pending else input("> ")).strip()
        except Terminated:
            raise
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            session.reset()
            print("llava-run: conversation reset", file=sys.stderr)
        elif command in ("/image", "/video") and argument.strip():
            (images if command == "/image" else videos).append(argument.strip())
        elif line.startswith("/"):
            print(INTERACTIVE_HELP, file=sys.stderr)
        elif line:
            _interactive_turn(session, line, images, videos, fields)
            images, videos = [], []


def _interactive_turn(session, text: str, images: list, videos: list, fields: dict) -> None:
    """Stream one answer; Ctrl-C ends it early and keeps the turn, an error is one line and drops it."""
    turn = None
    try:
        turn = session.stream(text, images=images, videos=videos, **fields)
        for piece in turn:
            print(piece, end="", flush=True)
        print()
        _print_timings(turn.result)
    except Terminated:
        raise
    except KeyboardInterrupt:
        if turn is None:  # still preparing the turn: nothing was said yet
            print("\nllava-run: interrupted; the message was not sent", file=sys.stderr)
            return
        turn.close()
        print("\nllava-run: answer interrupted (kept in the conversation)", file=sys.stderr)
    except LlavaRtError as exc:
        print(f"llava-run: error: {one_line(exc)}", file=sys.stderr)


def _main(args) -> int:
    if args.prompt is None and not args.interactive:
        raise LlavaRtError("--prompt is required (or use --interactive)")
    from .backends import parse_provider_options
    from .pipeline import Pipeline
    from .precision import bundle_precisions
    from .request import Request

    # The request's own fields are checked before the (possibly long) bundle load, its ranges right after.
    probe = Request.build(prompt=args.prompt or "", images=args.image, videos=args.video, **_request_fields(args))
    from PIL import Image

    # Pillow warns about large images as it opens them; the size limit above refuses them on its own line.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    pipeline = Pipeline.load(
        args.bundle,
        threads=args.threads,
        verify=args.verify,
        max_image_pixels=args.max_image_pixels,
        precision=args.precision,
        form=args.form,
        backend=args.backend,
        device=args.device or ("cuda" if args.backend == "tensorrt" else "cpu"),
        provider_options=parse_provider_options(args.provider_option),
    )
    if bundle_precisions(pipeline.manifest) != ["fp32"]:  # a choice was made: say which
        say(f"llava-run: {pipeline.selection.describe()}")
    pipeline.show_progress = True
    pipeline.search_options(probe.search)
    return _interactive(pipeline, args) if args.interactive else _answer(pipeline, args)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
