"""`llava-bench`: transformers against llava-rt bundles on the same request, stage by stage, on the CPU or a GPU.

    llava-bench --preset llava-onevision-qwen2-0.5b-ov --precision fp32,fp16,int8,int4 --threads 2
    llava-bench --preset llava-onevision-qwen2-0.5b-ov --precision fp32,fp16 --device cuda

Builds the checkpoint (a preset at its true shapes with random weights) and exports one bundle holding every
asked precision, both cached under `--workdir` (`--build-only` stops there). The sides: transformers (the
reference: fp32 eager on the CPU; fp16 with SDPA attention on `--device cuda`), llava-rt per precision in the
runtime's default form, and in the standard (TensorRT) form too where that runs other variants. Per repeat each
side in turn is loaded, warmed up, measured and freed (the order alternates); peak memory (resident on the CPU,
held on the GPU) is measured with each side alone in a fresh process. Prints a Markdown table of medians with
their spread and the llava-rt / transformers ratios, and the drift from fp32 the export recorded; `--json` and
`--chart` save them.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ..export import options as export_options
from ..export.staging import built_once
from ..runtime.bundle import FORMAT_VERSION, MANIFEST_NAME
from ..runtime.chat import user_turn
from ..runtime.console import add_standard_options, run_command, say
from ..runtime.errors import LlavaRtError
from ..runtime.manifest_schema import PRECISIONS
from ..runtime.pipeline import Pipeline
from ..runtime.precision import bundle_precisions
from .drift import bundle_drift
from .machine import measure_bandwidth, measure_device_bandwidth
from .presets import PRESETS
from .report import REFERENCE, chart, ratios, report, summarize
from .sides import DEVICES, BundleChoice, BundleSide, Request, TransformersSide, bundle_choices, synthetic_image

DEFAULT_WORKDIR = Path.home() / ".cache" / "llava-rt" / "bench"
# the `bench` extra: the export extra (it runs transformers and exports bundles), torchvision (transformers'
# OneVision processor cannot be built without it) and matplotlib (the chart)
EXTRA = ("bench", (*export_options.EXTRA[1], "torchvision", "matplotlib"))


class BenchError(LlavaRtError):
    """Bad benchmark arguments."""


def _checkpoint(args) -> tuple[Path, Path, str]:
    """The checkpoint to benchmark, the cache folder for its bundles, and a label."""
    if args.checkpoint is not None:
        path = Path(args.checkpoint).resolve()
        if not path.is_dir():
            raise BenchError(f"checkpoint directory not found: {path}")
        key = f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        return path, args.workdir / key, path.name
    preset = PRESETS[args.preset]
    label = preset.name if args.layers is None else f"{preset.name}, {args.layers} decoder layers"
    root = args.workdir / (preset.name if args.layers is None else f"{preset.name}-{args.layers}L")

    def build(directory: Path) -> None:
        say(f"building {label} with random weights in {root / 'checkpoint'}")
        preset.checkpoint(directory, args.layers)

    return built_once(root / "checkpoint", build), root, label


def _bundle(checkpoint: Path, root: Path, precisions: list[str]) -> tuple[Path, dict[str, Any]]:
    """The cached bundle of `checkpoint` and its manifest; exported first, with every one of `precisions`, when missing,
    from an older format, or without one of them."""
    from ..export.exporter import export_bundle

    path = root / "bundle"
    manifest_file = path / MANIFEST_NAME
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format_version") == FORMAT_VERSION and set(precisions) <= set(bundle_precisions(manifest)):
            return path, manifest
    say(f"exporting {checkpoint} -> {path} ({', '.join(precisions)})")
    return path, export_bundle(checkpoint, path, precisions=precisions, force=True, log=say)


def _request(pipeline, args) -> tuple[Request, int]:
    """One image and a user prompt holding `--prompt-tokens` text tokens (image placeholder excluded), and the
    prompt's length once the image's tokens are in; rendered and tokenized by a loaded bundle's `pipeline`."""
    image_token = pipeline.tokens["image_token"]

    def text_tokens(words: int) -> tuple[str, int]:
        prompt = pipeline.render(user_turn(" ".join(["the"] * words), 1))
        return prompt, len(pipeline.tokenizer.encode(prompt)) - prompt.count(image_token)

    words = args.prompt_tokens
    prompt, count = text_tokens(words)
    for _ in range(8):
        if count == args.prompt_tokens or words < 1:
            break
        words = max(1, words + args.prompt_tokens - count)
        prompt, count = text_tokens(words)
    if count != args.prompt_tokens:
        raise BenchError(f"could not build a prompt of {args.prompt_tokens} text tokens (closest: {count})")
    image = synthetic_image(args.image_size)
    input_tokens = len(pipeline.prepare(prompt=prompt, images=[image], apply_chat_template=False).input_ids)
    return Request(image, prompt, args.new_tokens), input_tokens


def _peak_memory(name: str, choice: BundleChoice | None, path: Path, request_file: Path, threads: int, device: str) -> int:
    """Peak memory of a side answering the request alone in a fresh process (resident bytes on the CPU, bytes held on
    the GPU): transformers on the checkpoint at `path` (`choice` None), or llava-rt running `choice`'s variants of the
    bundle at `path`."""
    command = [sys.executable, "-m", "llava_rt.benchmarks.peak_memory", "--path", str(path)]
    command += ["--request", str(request_file), "--threads", str(threads), "--device", device]
    if choice is not None:
        command += ["--precision", choice.precision, *(["--form", choice.form] if choice.form else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"peak-memory run of {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return figures["device_bytes" if device == "cuda" else "peak_rss_bytes"]


def _measure(sides: dict[str, Callable[[], Any]], request: Request, args) -> tuple[dict[str, list], dict[str, int]]:
    """Each side's `--repeats` measured runs and its weight bytes per token. One side is in memory at a time (all of
    them at once would not fit beside each other at real sizes): per repeat, each side in turn is loaded, warmed up
    `--warmup` times, measured once and freed; the order alternates between repeats."""
    measured: dict[str, list] = {name: [] for name in sides}
    weight_bytes = {}
    for repeat in range(args.repeats):
        for name in list(sides) if repeat % 2 == 0 else reversed(sides):
            say(f"repeat {repeat + 1}/{args.repeats}: {name}")
            side = sides[name]()
            for _ in range(args.warmup):
                side.run(request)
            measured[name].append(side.run(request))
            weight_bytes[name] = side.weight_bytes_per_token
            del side
            gc.collect()  # freed before the next side loads, reference cycles included
    return measured, weight_bytes


def run_benchmark(args) -> dict[str, Any]:
    """Everything `llava-bench` measures, as one JSON-ready dict."""
    checkpoint, root, label = _checkpoint(args)
    bundle, manifest = _bundle(checkpoint, root, args.precision)
    device = args.device
    choices = bundle_choices(manifest, args.precision, device)
    request, input_tokens = _request(Pipeline.load(bundle, threads=args.threads), args)
    sides = {REFERENCE: partial(TransformersSide, checkpoint, args.threads, device)}
    sides |= {choice.name: partial(BundleSide, bundle, args.threads, choice) for choice in choices}
    measured, weight_bytes = _measure(sides, request, args)
    bandwidth = measure_device_bandwidth() if device == "cuda" else measure_bandwidth(args.threads)
    results: dict[str, dict[str, Any]] = {}
    for name, runs in measured.items():
        entry = {key: summarize([getattr(r, key) for r in runs]) for key in runs[0].__dataclass_fields__}
        entry["weight_bytes_per_token"] = weight_bytes[name]
        entry["roofline_fraction"] = summarize([r.decode_tokens_per_s * weight_bytes[name] / bandwidth for r in runs])
        results[name] = entry
    if args.memory:
        request_file = root / "request.json"
        spec = {"prompt": request.prompt, "image_size": args.image_size, "new_tokens": args.new_tokens}
        request_file.write_text(json.dumps(spec))
        runs = [(REFERENCE, None, checkpoint), *((choice.name, choice, bundle) for choice in choices)]
        key = "peak_device_mb" if device == "cuda" else "peak_rss_mb"
        for name, choice, path in runs:
            say(f"peak memory of {name} (separate process)")
            peak = _peak_memory(name, choice, path, request_file, args.threads, device)
            results[name][key] = summarize([peak / 2**20])
    return {
        "config": {
            "label": label,
            "checkpoint": str(checkpoint),
            "image_size": args.image_size,
            "prompt_tokens": args.prompt_tokens,
            "input_tokens": input_tokens,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "device": device,
            "repeats": args.repeats,
            "warmup": args.warmup,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "bandwidth_gb_per_s": bandwidth / 1e9,
            **({"gpu": _gpu_name()} if device == "cuda" else {}),
        },
        "sides": results,
        "ratios": ratios(results),
        "drift": bundle_drift(manifest, choices),
    }


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-bench", description=__doc__.split("\n\n")[0])
    add_checkpoint_options(parser)
    parser.add_argument("--precision", default="fp32", help=f"comma-separated precisions ({', '.join(PRECISIONS)})")
    parser.add_argument("--image-size", type=int, default=384, help="side of the square test image (default 384)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="text tokens in the prompt (default 512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated, EOS ignored (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where both sides run (default cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per side (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs after each load of a side (default 1)")
    parser.add_argument("--json", type=Path, help="write every figure and ratio here")
    parser.add_argument("--chart", type=Path, help="write a PNG chart of the ratios here")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    parser.add_argument("--build-only", action="store_true", help="build the checkpoint and bundle into --workdir, then stop")
    return add_standard_options(parser)


def add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    """What to benchmark (`--checkpoint` or `--preset`, `--layers`) and where its bundles are cached (`--workdir`)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a LLaVA-NeXT / OneVision / NeXT-Video checkpoint directory")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a real architecture with random weights")
    parser.add_argument("--layers", type=int, help="decoder depth of the preset (default: the real one)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache of checkpoints and bundles")


def check_checkpoint_options(args) -> None:
    """`BenchError` for a `--layers` that is not positive or comes with `--checkpoint`."""
    if args.layers is not None and (args.checkpoint is not None or args.layers < 1):
        raise BenchError("--layers takes a positive depth and only applies to --preset")


def parse_precisions(text: str) -> list[str]:
    """`--precision`'s comma-separated list, in the runtime's order; `BenchError` on an unknown or empty one."""
    asked = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in asked if p not in PRECISIONS]
    if unknown or not asked:
        given = ",".join(unknown) or "none"
        raise BenchError(f"--precision takes a comma-separated list of {', '.join(PRECISIONS)}, got {given}")
    return [p for p in PRECISIONS if p in asked]


def _validate(args) -> None:
    args.precision = parse_precisions(args.precision)
    check_checkpoint_options(args)
    for name in ("image_size", "prompt_tokens", "new_tokens", "threads", "repeats"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2:
        raise BenchError("--new-tokens must be at least 2 (decode speed is measured after the first token)")
    if args.warmup < 0:
        raise BenchError("--warmup must be at least 0")
    for option in ("json", "chart"):
        path = getattr(args, option)
        if path is not None and (path.is_dir() or not path.parent.is_dir()):
            raise BenchError(f"--{option} {path}: not a file in an existing directory")
    if args.device == "cuda":
        _check_cuda(args.memory)


def _check_cuda(memory: bool) -> None:
    """What `--device cuda` needs, checked before anything is built."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise BenchError(
            "--device cuda needs onnxruntime's CUDAExecutionProvider, which this onnxruntime lacks: "
            "pip uninstall onnxruntime && pip install onnxruntime-gpu"
        )
    if importlib.util.find_spec("cupy") is None:
        raise BenchError("--device cuda needs cupy (llava-rt's arrays on the GPU): pip install cupy-cuda13x")
    import torch

    if not torch.cuda.is_available():
        raise BenchError("--device cuda needs a CUDA GPU that torch can use (transformers' side runs on it)")
    if memory and shutil.which("nvidia-smi") is None:
        raise BenchError("--device cuda reads device memory with nvidia-smi, which is not on the PATH; or pass --no-memory")


def _bench(args: argparse.Namespace) -> int:
    _validate(args)
    if args.build_only:
        checkpoint, root, _ = _checkpoint(args)
        bundle, _ = _bundle(checkpoint, root, args.precision)
        say(f"built {checkpoint} and {bundle}")
        return 0
    result = run_benchmark(args)
    print(report(result))
    try:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if args.chart:
            chart(result, args.chart)
    except OSError as exc:
        raise BenchError(f"could not write the results: {exc}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), _bench, argv, extra=EXTRA)


if __name__ == "__main__":
    raise SystemExit(main())
