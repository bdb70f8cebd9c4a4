"""`llava-engines build BUNDLE --precision fp16|int8 [limits] [--dry-run]`: one TensorRT plan per graph into
`BUNDLE/engines/<trt-version>-sm<cc>-<precision>/`, recorded in the manifest. `llava-engines check BUNDLE`: each
plan that runs here against onnxruntime's fp32 graph on sample inputs.

Exit status: 0 on success, 1 when `check --min-cosine` finds an output below it, 2 on bad input or a missing
TensorRT (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..runtime.console import add_standard_options, require_extra, run_command, say
from ..runtime.engine_plans import HARDWARE_COMPAT, parse_capability, parse_version, select_plans
from ..runtime.errors import InputError
from .plan import ENGINE_PRECISIONS, build_plan, describe, plan_directory, resolve_limits

TENSORRT_EXTRA = ("tensorrt", ("tensorrt", "cuda.bindings"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-engines", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build one TensorRT plan per graph of a bundle")
    build.add_argument("bundle", help="bundle directory written by llava-export")
    build.add_argument("--precision", required=True, choices=ENGINE_PRECISIONS, help="the graph variants to build")
    limits = build.add_argument_group("limits (a request beyond them is refused, naming the flag to raise)")
    limits.add_argument("--max-batch", type=int, metavar="B", help="sequences decoded together (default: 1)")
    limits.add_argument(
        "--max-tiles",
        type=int,
        metavar="T",
        help="tiles or video frames per vision call (default: the largest grid + base)",
    )
    limits.add_argument("--max-context", type=int, metavar="L", help="prompt + new tokens (default: the model's context)")
    limits.add_argument("--opt-context", type=int, metavar="L", help="the context decoding is tuned for (default: 2048 or L)")
    build.add_argument("--workspace", type=float, metavar="GiB", help="builder workspace limit (default: TensorRT's)")
    build.add_argument("--timing-cache", type=Path, metavar="PATH", help="read and update this timing cache (faster rebuilds)")
    build.add_argument("--hardware-compat", choices=HARDWARE_COMPAT, default="none", help="ampere+: plans for any GPU from sm80")
    build.add_argument("--version-compatible", action="store_true", help="plans later TensorRT releases of the same major load")
    build.add_argument("--dry-run", action="store_true", help="print the build plan; needs no TensorRT")
    build.add_argument("--compute-capability", metavar="X.Y", help="with --dry-run: the GPU to name the plan directory for")
    build.add_argument("--trt-version", metavar="V", help="with --dry-run: the TensorRT version to name the plan directory for")
    check = commands.add_parser("check", help="compare each plan that runs here with onnxruntime fp32")
    check.add_argument("bundle", help="bundle directory with plans built by llava-engines build")
    check.add_argument("--precision", choices=ENGINE_PRECISIONS, help="only these plans (default: every precision built)")
    check.add_argument("--min-cosine", type=float, metavar="X", help="exit 1 when an output's cosine is below X")
    return add_standard_options(parser)


def _build(args: argparse.Namespace) -> int:
    from ..runtime.bundle import load_bundle

    if not args.dry_run and (args.compute_capability or args.trt_version):
        raise InputError(
            "--compute-capability and --trt-version name a dry run's plan directory; a build asks the GPU and TensorRT"
        )
    if args.workspace is not None and not args.workspace > 0:
        raise InputError(f"--workspace must be a positive number of GiB, got {args.workspace}")
    if args.timing_cache is not None and (args.timing_cache.is_dir() or not args.timing_cache.parent.is_dir()):
        raise InputError(f"--timing-cache {args.timing_cache}: not a file in an existing directory")
    if args.compute_capability:
        parse_capability(args.compute_capability)
    if args.trt_version:
        parse_version(args.trt_version)
    bundle = load_bundle(args.bundle)
    limits = resolve_limits(bundle.manifest, args.max_batch, args.max_tiles, args.max_context, args.opt_context)
    plans = build_plan(bundle.manifest, args.precision, limits)
    if args.dry_run:
        directory = plan_directory(args.trt_version, args.compute_capability, args.precision)
        if not (args.trt_version and args.compute_capability):
            directory += " (the TensorRT version and sm<cc> are decided at build time)"
        print("\n".join(describe(plans, limits, args.precision, directory)))
        return 0
    require_extra(*TENSORRT_EXTRA)
    from .builder import BuildOptions, build_plans

    options = BuildOptions(args.workspace, args.hardware_compat, args.version_compatible)
    key = build_plans(bundle, args.precision, plans, limits, options, args.timing_cache)
    print(f"{bundle.path}: {len(plans)} plans in engines/{key}/")
    return 0


def _check(args: argparse.Namespace) -> int:
    require_extra(*TENSORRT_EXTRA)
    import tensorrt

    from ..runtime.backends.trt import TensorRTSession, compute_capability
    from ..runtime.bundle import load_bundle
    from .compare import compare_graph

    bundle = load_bundle(args.bundle)
    built = sorted({entry["precision"] for entry in bundle.manifest.get("engines", {}).values()})
    precisions = [args.precision] if args.precision else built
    if not precisions:
        raise InputError(
            f"{bundle.path} has no TensorRT plans; build them with llava-engines build {bundle.path} --precision fp16"
        )
    capability, low = compute_capability(), []
    embed_tokens = bundle.array("embed_tokens")
    for precision in precisions:
        plans = select_plans(bundle, precision, tensorrt.__version__, capability)
        print(f"{plans.key} vs onnxruntime fp32:")
        for graph, plan in plans.entry["plans"].items():
            session = TensorRTSession(plans.plan_file(graph))
            reference = bundle.session(graph, "fp32")
            for diff in compare_graph(graph, plan, bundle.manifest, session.run, reference.run, embed_tokens):
                below = args.min_cosine is not None and diff.cosine < args.min_cosine
                low += [diff] if below else []
                print(f"  {diff.describe()}{'  (below --min-cosine)' if below else ''}")
            session.close()
    if low:
        say(f"{len(low)} output(s) below cosine {args.min_cosine}")
    return 1 if low else 0


def _main(args: argparse.Namespace) -> int:
    return _build(args) if args.command == "build" else _check(args)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
