"""`llava-bundle check BUNDLE [--tensorrt]`: verify a bundle and list its graph variants; with `--tensorrt`, check
every standard-form graph statically against TensorRT's ONNX parser.

Exit status: 0 when everything passes, 1 when the TensorRT check has findings (printed one per line), 2 on bad
input (no such bundle, a bundle that does not verify, an unknown TensorRT version).
"""

from __future__ import annotations

import argparse
import sys

from .console import add_standard_options, require_extra, run_command
from .errors import InputError
from .manifest_schema import graph_variants

# what `--tensorrt` needs beyond the runtime: onnx, to read the graphs node by node
ENGINES_EXTRA = ("engines", ("onnx",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-bundle", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="verify a bundle (every checksum) and list its graph variants")
    check.add_argument("bundle", help="bundle directory written by llava-export")
    check.add_argument(
        "--tensorrt", action="store_true", help="also check every standard-form graph against TensorRT's ONNX parser"
    )
    check.add_argument(
        "--trt-version",
        default=None,
        metavar="V",
        help="the TensorRT version to check against: 10.3 (JetPack 6, the default), 10.15 or 11",
    )
    return add_standard_options(parser)


def _describe(manifest) -> list[str]:
    """One line per graph variant: file, form, IO dtypes and drift."""
    lines = []
    for graph, key, entry in graph_variants(manifest):
        dtypes = sorted({tensor["dtype"] for tensor in [*entry["inputs"], *entry["outputs"]]})
        drift = entry.get("drift")
        said = f", cosine vs fp32 {drift['cosine']:.5f}" if drift else ""
        lines.append(f"  {graph} {key}: {entry['file']} ({entry['form']}; {', '.join(dtypes)}{said})")
    return lines


def _check(args: argparse.Namespace) -> int:
    from .bundle import load_bundle

    if args.trt_version is not None and not args.tensorrt:
        raise InputError("--trt-version is used with --tensorrt only")
    if args.tensorrt:
        require_extra(*ENGINES_EXTRA)
        from ..engines.tensorrt_support import DEFAULT_TRT_VERSION, support_for

        version = support_for(args.trt_version or DEFAULT_TRT_VERSION).version
    bundle = load_bundle(args.bundle, verify="full")
    print(f"{bundle.path}: verified, format {bundle.manifest['format_version']}, {bundle.manifest['family']}")
    print("\n".join(_describe(bundle.manifest)))
    if not args.tensorrt:
        return 0
    from ..engines.tensorrt_check import check_graphs

    standard = [entry["file"] for _, _, entry in graph_variants(bundle.manifest) if entry["form"] == "standard"]
    findings = check_graphs([bundle.file(name) for name in standard], version)
    for finding in findings:
        print(finding)
    verdict = f"{len(findings)} finding(s)" if findings else "every one passes"
    print(f"TensorRT {version} ONNX parser, {len(standard)} standard-form graphs: {verdict}")
    return 1 if findings else 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _check, argv)


if __name__ == "__main__":
    sys.exit(main())
