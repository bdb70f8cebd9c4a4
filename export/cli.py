"""`llava-export`: checkpoint directory -> verified ONNX bundle."""

from __future__ import annotations

import argparse
import sys

from ..runtime.console import add_standard_options, one_line, run_command, say
from .options import DECODER_OPSETS, EXTRA, FUSED_OPSET, PORTABLE_OPSET, VARIANT_PRECISIONS
from .request_checks import check_export_options


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
    parser.add_argument(
        "--precision",
        default=None,
        metavar="LIST",
        help=f"precision variants to add, comma separated: {', '.join(VARIANT_PRECISIONS)} (fp16: every graph; int8: "
        "vision tower and projector as Q/DQ graphs calibrated on images, and the decoder; int4: the decoder). The fp32 "
        "graphs stay in every bundle as the reference; each variant's drift from them is measured and recorded",
    )
    parser.add_argument(
        "--calibration-images",
        metavar="DIR",
        help="images (any format Pillow reads) to calibrate int8 on, preprocessed as at run time; default: a small "
        "built-in set (images from your own domain calibrate better)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="X",
        help="largest max abs difference vs PyTorch an fp32 graph may show (default: 1e-4)",
    )
    parser.add_argument(
        "--decoder-opset",
        type=int,
        choices=DECODER_OPSETS,
        default=FUSED_OPSET,
        help=f"ai.onnx opset of the decoder graphs: {FUSED_OPSET} (default) writes RMSNormalization and RotaryEmbedding, "
        f"which TensorRT parses from 10.15; {PORTABLE_OPSET} spells them op by op, for TensorRT 10.3 (JetPack 6). Both "
        "fuse the Q/K/V and gate/up projections",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it is a bundle or an empty directory (nothing else)"
    )
    return add_standard_options(parser)


def _export(args: argparse.Namespace) -> int:
    precisions = () if args.precision is None else args.precision
    # what can be checked without torch, first (export_bundle checks it again, for its library callers)
    check_export_options(args.checkpoint, args.out, precisions, args.calibration_images, args.force, args.decoder_opset)
    from .exporter import export_bundle

    manifest = export_bundle(
        args.checkpoint,
        args.out,
        precisions=precisions,
        calibration_images=args.calibration_images,
        force=args.force,
        tolerance=args.tolerance,
        decoder_opset=args.decoder_opset,
        log=say,
    )
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in manifest["verification"]["max_abs_diff"].items())
    print(f"bundle written to {one_line(args.out)} (max abs diff vs PyTorch: {diffs})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _export, argv, extra=EXTRA)


if __name__ == "__main__":
    sys.exit(main())
