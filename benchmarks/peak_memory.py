"""One side answering one request in a process of its own, printing its peak memory (`llava-bench` runs this): peak
resident bytes on the CPU; on a GPU, the device memory the process holds after the run (what the device's memory in
use grew by from before the side was loaded: onnxruntime's arena and torch's cache keep what they grew to)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .machine import device_memory_used_bytes, peak_rss_bytes
from .sides import DEVICES, BundleChoice, BundleSide, Request, TransformersSide, synthetic_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_rt.benchmarks.peak_memory")
    parser.add_argument("--path", required=True, type=Path, help="checkpoint (transformers) or bundle directory")
    parser.add_argument("--precision", help="the bundle's variants to run (absent: transformers runs the checkpoint)")
    parser.add_argument("--form", help="the variants' form (absent: the runtime's default on the CPU)")
    parser.add_argument("--request", required=True, type=Path, help="JSON: prompt, image_size, new_tokens")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    args = parser.parse_args(argv)
    spec = json.loads(args.request.read_text())
    request = Request(synthetic_image(spec["image_size"]), spec["prompt"], spec["new_tokens"])
    before = device_memory_used_bytes() if args.device == "cuda" else 0
    if args.precision is None:
        side = TransformersSide(args.path, args.threads, args.device)
    else:
        side = BundleSide(args.path, args.threads, BundleChoice(args.precision, args.form, args.device))
    side.run(request)
    if args.device == "cuda":
        print(json.dumps({"device_bytes": device_memory_used_bytes() - before}))
    else:
        print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
