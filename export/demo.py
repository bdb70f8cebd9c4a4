"""`llava-demo`: the whole job on a built-in tiny checkpoint: build it, export it, draw an image, ask about it.

The checkpoint has random weights (no weights can be downloaded here), so the answer is gibberish;
what the demo shows is the path a real checkpoint takes, and its timings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

from ..runtime.console import add_standard_options, run_command, say
from ..runtime.errors import InputError
from .options import EXTRA
from .staging import staged_directory

DEFAULT_WORKDIR = Path.home() / ".cache" / "llava-rt" / "demo"
QUESTION = "What is shown in this image?"


def draw_image(path: Path) -> Path:
    """A 320x240 picture of a red square, a blue circle and a green triangle."""
    image = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 60, 110, 150), fill="red")
    draw.ellipse((130, 60, 220, 150), fill="blue")
    draw.polygon([(240, 150), (300, 150), (270, 60)], fill="green")
    image.save(path)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"where to put the checkpoint and bundle (default: {DEFAULT_WORKDIR})",
    )
    parser.add_argument("--max-new-tokens", type=int, default=24, help="most tokens to generate (default: 24)")
    return add_standard_options(parser)


def _workdir(path: Path) -> Path:
    """The work directory, created if needed; a path that is not a usable directory is an error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--workdir {path} cannot be used as a directory: {exc.strerror or exc}") from None
    return path


def _demo(args: argparse.Namespace) -> int:
    from ..runtime import Pipeline
    from .exporter import export_bundle
    from .tiny_checkpoint import build_tiny_checkpoint

    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    workdir = _workdir(args.workdir)
    checkpoint, bundle = workdir / "checkpoint", workdir / "bundle"
    started = time.perf_counter()
    say(f"building a tiny random-weight LLaVA-NeXT (Mistral) checkpoint in {checkpoint}")
    with staged_directory(checkpoint) as staging:
        build_tiny_checkpoint(staging)
    export_bundle(checkpoint, bundle, force=True, log=say)
    export_s = time.perf_counter() - started
    image = draw_image(workdir / "shapes.png")

    started = time.perf_counter()
    pipeline = Pipeline.load(bundle)
    load_s = time.perf_counter() - started
    result = pipeline.generate(prompt=QUESTION, images=[image], max_new_tokens=args.max_new_tokens)

    print(f"prompt:  {result.prompt!r}")
    print(f"image:   {image} (320x240 -> {result.input_tokens} prompt tokens)")
    print(f"answer:  {result.text!r}  (random weights: expect gibberish)")
    print(f"ids:     {result.token_ids}")
    print(
        f"timings: checkpoint + export {export_s:.1f} s, bundle load {load_s * 1e3:.0f} ms, "
        + ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in result.timings_ms.items())
        + f", {result.tokens_per_s:.0f} tokens/s"
    )
    print(f"again:   llava-run {bundle} --image {image} --prompt {QUESTION!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), _demo, argv, extra=EXTRA)


if __name__ == "__main__":
    sys.exit(main())
