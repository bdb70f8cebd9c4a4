"""The vision side alone against transformers, at several image sizes: `python -m llava_rt.benchmarks.vision`.

    python -m llava_rt.benchmarks.vision --preset llava-onevision-qwen2-0.5b-ov --image-sizes 384,768 --precision fp32,int8

One square synthetic image per size; its tiles follow from the size and the checkpoint's grid (the OneVision preset:
384 px gives 2 tiles, 768 px 5; the LLaVA-NeXT presets' CLIP-L at 336 px: 336 px gives 3, 672 px 5). Each side turns
it into image features: transformers' `get_image_features` (tower + projector; fp32 eager, `--threads` torch
threads) on its processor's pixels, and per precision and form (the sides llava-bench runs) the bundle's vision
graphs (tower + projector, then packing) on the runtime's pixels; preprocessing is outside the timing on both
sides. The sides run one after the other, each alone in memory (a warm-up run, then `--repeats` timed runs per
image); medians with their spread, and each side's ratio to transformers. The checkpoint and
bundle come from llava-bench's cache (`--workdir`), built when missing.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from ..runtime.console import add_standard_options, run_command, say
from ..runtime.manifest_schema import PRECISIONS
from .cli import BenchError, _bundle, _checkpoint, add_checkpoint_options, check_checkpoint_options, parse_precisions
from .sides import BundleSide, TransformersSide, bundle_choices, synthetic_image


def transformers_run(side: TransformersSide, image) -> tuple[Callable[[], object], int]:
    """A call computing the image's features with transformers, and its number of tiles."""
    inputs = side.processor.image_processor(images=[image], return_tensors="pt")
    return partial(side.image_features, inputs), int(inputs["pixel_values"].shape[1])


def bundle_run(side: BundleSide, image) -> tuple[Callable[[], object], int]:
    """A call computing the image's features with the bundle's vision graphs, and its number of tiles."""
    pipeline = side.pipeline
    (media,) = pipeline.prepare(prompt=pipeline.tokens["image_token"], images=[image], apply_chat_template=False).media
    return lambda: pipeline.features([media]), len(media.pixels)


def measure(sides: dict[str, Callable[[], object]], images: dict[int, object], repeats: int) -> list[dict]:
    """Each side alone in memory, one after the other (no side's weights or threads stay resident during another's
    runs): built by its factory in `sides`, then per image a warm-up run and `repeats` timed ones, then freed. Per
    image size: each side's seconds per run and the tiles it ran."""
    results = [{"image_size": size, "sides": {}} for size in images]
    for name, build in sides.items():
        side = build()
        for result, image in zip(results, images.values()):
            run, tiles = (transformers_run if name == "transformers" else bundle_run)(side, image)
            run()
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - started)
            result["sides"][name] = {"tiles": tiles, "seconds": seconds}
        del side, run
        gc.collect()
    return results


def report(results: list[dict]) -> str:
    """A Markdown table: per image size, each side's median ms (± half the spread) and its ratio to transformers."""
    names = list(results[0]["sides"])
    lines = ["| image | tiles | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for result in results:
        sides = result["sides"]
        reference = np.median(sides["transformers"]["seconds"])
        cells = []
        for name in names:
            values = np.array(sides[name]["seconds"]) * 1e3
            cell = f"{np.median(values):.0f} ±{(values.max() - values.min()) / 2:.0f}"
            cells.append(cell if name == "transformers" else f"{cell} ({np.median(values) / 1e3 / reference:.2f}x)")
        tiles = sides[names[-1]]["tiles"]
        lines.append(f"| {result['image_size']} px | {tiles} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-bench-vision", description=__doc__.split("\n\n")[0])
    add_checkpoint_options(parser)  # the vision tower keeps its depth whatever --layers says
    parser.add_argument("--precision", default="fp32,int8", help=f"comma-separated precisions ({', '.join(PRECISIONS)})")
    parser.add_argument("--image-sizes", default="384,768", help="sides of the square test images (default 384,768)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and image (default 3)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    return add_standard_options(parser)


def _bench(args) -> int:
    check_checkpoint_options(args)
    precisions = parse_precisions(args.precision)
    sizes = [int(size) for size in args.image_sizes.split(",") if size.strip().isdigit() and int(size) > 0]
    if not sizes or len(sizes) != len(args.image_sizes.split(",")):
        raise BenchError(f"--image-sizes takes comma-separated positive integers (e.g. 384,768), got {args.image_sizes}")
    if args.repeats < 1 or args.threads < 1:
        raise BenchError("--repeats and --threads must be at least 1")
    checkpoint, root, label = _checkpoint(args)
    bundle, manifest = _bundle(checkpoint, root, precisions)
    say(f"{label}: images of {args.image_sizes} px, each side alone in turn")
    sides = {"transformers": partial(TransformersSide, checkpoint, args.threads)}
    for choice in bundle_choices(manifest, precisions):
        sides[choice.name] = partial(BundleSide, bundle, args.threads, choice)
    results = measure(sides, {size: synthetic_image(size) for size in sizes}, args.repeats)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": label, "threads": args.threads, "results": results}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), _bench, argv)


if __name__ == "__main__":
    raise SystemExit(main())
