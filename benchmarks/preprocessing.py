"""Video frame preprocessing: llava-rt's `VideoProcessor` against transformers' `LlavaNextVideoVideoProcessor`.

    python -m llava_rt.benchmarks.preprocessing --frames 8 --height 1080 --width 1920 --repeats 5

Both sides get the same uint8 frames and LLaVA-NeXT-Video's configuration (shortest edge 336, center crop 336,
bicubic, CLIP normalization). Prints one line with both medians and their ratio, after checking that the two
outputs agree.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np

from ..runtime.video import VideoProcessor

SIZE, CLIP_MEAN, CLIP_STD = 336, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _median_s(run: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Median wall time of `repeats` calls, and the last call's output."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    from transformers import LlavaNextVideoVideoProcessor

    frames = np.random.default_rng(0).integers(0, 256, (args.frames, args.height, args.width, 3), dtype=np.uint8)
    crop = {"height": SIZE, "width": SIZE}
    reference = LlavaNextVideoVideoProcessor(size={"shortest_edge": SIZE}, crop_size=crop)
    ours = VideoProcessor(
        size={"shortest_edge": SIZE},
        resample=3,
        rescale_factor=1 / 255,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_center_crop=True,
        crop_size=crop,
    )
    ours_s, ours_out = _median_s(lambda: ours.preprocess(frames), args.repeats)
    ref_s, ref_out = _median_s(lambda: reference(videos=[frames], return_tensors="np")["pixel_values_videos"][0], args.repeats)
    diff = float(np.abs(ours_out - ref_out).max())
    print(
        f"preprocess {args.frames} frames {args.width}x{args.height} -> {SIZE}x{SIZE} (median of {args.repeats}, "
        f"{torch.get_num_threads()} torch threads): llava-rt {ours_s * 1e3:.0f} ms, transformers {ref_s * 1e3:.0f} ms, "
        f"llava-rt/transformers {ours_s / ref_s:.2f}x, max |diff| {diff:.1e}"
    )


if __name__ == "__main__":
    main()
