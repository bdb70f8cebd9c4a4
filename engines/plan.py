"""The build plan of `llava-engines build`, computed from the manifest alone (no TensorRT): per graph the variant
that is built, and one optimization profile whose min/opt/max shapes come from the graph's named dynamic axes and
the limits.

Axis ranges (B = max batch, T = max tiles, L = max context, O = opt context):

- `batch` 1..B (opt B); `tiles` and video `frames` 1..T (opt T: the largest grid is the common case);
- `tokens` (projector tokens per tile or pooled frame): the model's sizes;
- `sequence` 1..L (opt 1), `past_sequence` 0..L (opt O), `total_sequence` 1..L+1 (opt O+1): one profile serves the
  prefill (no past) and the decode steps (one token over a KV cache of up to L slots), optimized for the steps,
  which take most of a generation's time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..runtime.engine_plans import plan_key
from ..runtime.errors import InputError
from ..runtime.manifest_schema import variant_key
from ..runtime.request import DEFAULT_NUM_FRAMES

ENGINE_PRECISIONS = ("fp16", "int8")
OPT_CONTEXT = 2048  # the default opt context, at most the model's


@dataclass(frozen=True)
class Limits:
    """The largest batch, tiles (or video frames) per vision call and context the plans accept; the context the
    decode steps are optimized for."""

    max_batch: int
    max_tiles: int
    max_context: int
    opt_context: int


def model_tiles(manifest: dict[str, Any]) -> int:
    """Tiles of the largest pinpoint grid plus the base tile (or the frames of a default video, if more)."""
    tile = manifest["packing"]["tile_size"]
    grid = max((height // tile) * (width // tile) for height, width in manifest["packing"]["image_grid_pinpoints"])
    return max(grid + 1, DEFAULT_NUM_FRAMES if manifest.get("video") else 0)


def resolve_limits(
    manifest: dict[str, Any],
    max_batch: int | None = None,
    max_tiles: int | None = None,
    max_context: int | None = None,
    opt_context: int | None = None,
) -> Limits:
    """The limits given, the model's where not: batch 1, `model_tiles`, the model's context, and an opt context of
    `OPT_CONTEXT` tokens or the max context if smaller. Bad values are `InputError`s naming the flag."""
    context = manifest["text"]["max_position_embeddings"]
    for flag, value in (
        ("--max-batch", max_batch),
        ("--max-tiles", max_tiles),
        ("--max-context", max_context),
        ("--opt-context", opt_context),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{flag} must be a positive integer, got {value!r}")
    if max_context is not None and max_context > context:
        raise InputError(f"--max-context {max_context} is beyond the model's context of {context} tokens")
    max_context = max_context or context
    opt_context = opt_context or min(OPT_CONTEXT, max_context)
    if opt_context > max_context:
        raise InputError(f"--opt-context {opt_context} is beyond the max context of {max_context} tokens")
    return Limits(max_batch or 1, max_tiles or model_tiles(manifest), max_context, opt_context)


def _axis_ranges(manifest: dict[str, Any], limits: Limits) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every named axis the bundles' graphs have."""
    batch, tiles, context, opt = limits.max_batch, limits.max_tiles, limits.max_context, limits.opt_context
    video = manifest.get("video") or {}
    tokens = [manifest["packing"]["tokens_per_tile"], *([video["tokens_per_frame"]] if video else [])]
    return {
        "batch": (1, batch, batch),
        "tiles": (1, tiles, tiles),
        "frames": (1, tiles, tiles),
        "tokens": (min(tokens), max(tokens), max(tokens)),
        "sequence": (1, 1, context),
        "past_sequence": (0, opt, context),
        "total_sequence": (1, opt + 1, context + 1),
    }


@dataclass(frozen=True)
class GraphPlan:
    """One plan to build: the graph, the variant it is built from (key, file, its sha256), and per input the
    profile's min/opt/max shapes."""

    graph: str
    variant: str
    onnx_file: str
    graph_sha256: str
    profile: dict[str, dict[str, list[int]]]


def graph_profile(
    manifest: dict[str, Any], inputs: list[dict[str, Any]], limits: Limits, where: str
) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes of a graph's inputs: fixed dims as declared, named axes from `_axis_ranges`."""
    ranges = _axis_ranges(manifest, limits)
    profile = {}
    for tensor in inputs:
        shape = {"min": [], "opt": [], "max": []}
        for dim in tensor["shape"]:
            if isinstance(dim, str) and dim in ranges:
                low, opt, high = ranges[dim]
            elif isinstance(dim, int) and dim > 0:
                low = opt = high = dim
            else:
                known = ", ".join(sorted(ranges))
                raise InputError(f"{where} input {tensor['name']} has axis {dim!r}; llava-engines knows {known}")
            for point, size in zip(("min", "opt", "max"), (low, opt, high)):
                shape[point].append(size)
        profile[tensor["name"]] = shape
    return profile


def build_plan(manifest: dict[str, Any], precision: str, limits: Limits) -> list[GraphPlan]:
    """One `GraphPlan` per graph: its standard-form `precision` variant, or its fp32 graph where it has none."""
    if precision not in ENGINE_PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    key = variant_key(precision, "standard")
    if not any(key in spec["variants"] for spec in manifest["graphs"].values()):
        raise InputError(
            f"this bundle has no standard-form {precision} graph; export one with llava-export --precision {precision}"
        )
    plans = []
    for graph, spec in manifest["graphs"].items():
        chosen = key if key in spec["variants"] else "fp32"
        entry = spec["variants"][chosen]
        profile = graph_profile(manifest, entry["inputs"], limits, f"{graph} {chosen}")
        plans.append(GraphPlan(graph, chosen, entry["file"], manifest["files"][entry["file"]]["sha256"], profile))
    return plans


def plan_directory(trt_version: str | None, capability: str | None, precision: str) -> str:
    """`engines/<trt-version>-sm<cc>-<precision>/`, with placeholders for what only the build decides."""
    if trt_version is not None and capability is not None:
        return f"engines/{plan_key(trt_version, capability, precision)}/"
    return f"engines/{trt_version or '<tensorrt-version>'}-sm{(capability or '<cc>').replace('.', '')}-{precision}/"


def describe(plans: list[GraphPlan], limits: Limits, precision: str, directory: str) -> list[str]:
    """The dry run's lines: limits, plan directory, then per graph its variant and per input min/opt/max."""
    said = ", ".join(f"{name.replace('_', '-')} {value}" for name, value in asdict(limits).items())
    lines = [f"build plan, precision {precision}: {said}", f"plan directory: {directory}"]
    for plan in plans:
        lines.append(f"  {plan.graph}: {plan.onnx_file} ({plan.variant}, strongly typed)")
        for name, shapes in plan.profile.items():
            if shapes["min"] != shapes["max"]:
                lines.append(f"    {name}: min {shapes['min']} opt {shapes['opt']} max {shapes['max']}")
            else:
                lines.append(f"    {name}: {shapes['min']}")
    return lines
