"""One side answering one request in a process of its own, printing its peak resident memory (`llava-bench` runs this)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .machine import peak_rss_bytes
from .sides import BundleChoice, BundleSide, Request, TransformersSide, synthetic_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_rt.benchmarks.peak_memory")
    parser.add_argument("--path", required=True, type=Path, help="checkpoint (transformers) or bundle directory")
    parser.add_argument("--precision", help="the bundle's variants to run (absent: transformers runs the checkpoint)")
    parser.add_argument("--form", help="the variants' form (absent: the runtime's default on the CPU)")
    parser.add_argument("--request", required=True, type=Path, help="JSON: prompt, image_size, new_tokens")
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.request.read_text())
    request = Request(synthetic_image(spec["image_size"]), spec["prompt"], spec["new_tokens"])
    if args.precision is None:
        side = TransformersSide(args.path, args.threads)
    else:
        side = BundleSide(args.path, args.threads, BundleChoice(args.precision, args.form))
    side.run(request)
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
