"""`llava-export`: checkpoint directory -> verified ONNX bundle."""

from __future__ import annotations

import argparse
import sys

from ..runtime.console import add_standard_options, one_line, run_command, say
from .options import DTYPES, EXTRA, PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-export",
        description="Export a local LLaVA-NeXT checkpoint (no network) into a llava-rt bundle: "
        "vision, projector and KV-cache decoder ONNX graphs, verified against PyTorch.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json, processor configs)"
    )
    parser.add_argument("--out", required=True, help="bundle directory to create")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="precision of the exported graphs (default: fp32)")
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default=None,
        help="also write a weight-only quantized decoder (block-wise MatMulNBits) and run it; "
        "the fp32 decoder stays as the reference and the drift is reported",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="X",
        help="largest max abs difference vs PyTorch a graph may show (default: 1e-4 for fp32, 2e-2 for fp16)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it is a bundle or an empty directory (nothing else)"
    )
    return add_standard_options(parser)


def _export(args: argparse.Namespace) -> int:
    from .exporter import export_bundle

    manifest = export_bundle(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        force=args.force,
        tolerance=args.tolerance,
        precision=args.precision,
        log=say,
    )
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in manifest["verification"]["max_abs_diff"].items())
    print(f"bundle written to {one_line(args.out)} (max abs diff vs PyTorch: {diffs})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _export, argv, extra=EXTRA)


if __name__ == "__main__":
    sys.exit(main())
