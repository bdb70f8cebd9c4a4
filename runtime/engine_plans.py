"""TensorRT plans of a bundle, checked before use without importing TensorRT: which plans fit this TensorRT version,
GPU and graphs (`select_plans`), and whether a request or a graph's input shapes fit the ranges they were built for.

A plan runs only on the TensorRT version that built it (a `version_compatible` plan: that version or a later one of
the same major) and on a GPU of the compute capability it was built on (an `ampere+` plan: any from 8.0 on).
Every refusal is one line naming the `llava-engines build` command that fixes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BundleError, InputError

if TYPE_CHECKING:
    from .bundle import Bundle

# The manifest's named dynamic axes -> the `llava-engines build` flag that sets their largest size. Video frames go
# through the vision graph as tiles do, so one limit covers both.
AXIS_FLAGS = {
    "batch": "--max-batch",
    "tiles": "--max-tiles",
    "frames": "--max-tiles",
    "sequence": "--max-context",
    "past_sequence": "--max-context",
    "total_sequence": "--max-context",
}
# What each flag's value must be for an axis of a given size: a decode step over a full cache of L tokens
# feeds L past slots plus the new token, so `total_sequence` reaches L + 1.
_NEEDED = {"total_sequence": lambda size: size - 1}
HARDWARE_COMPAT = ("none", "ampere+")
AMPERE = (8, 0)
_VERSION = re.compile(r"^\d+(\.\d+)*$")
_CAPABILITY = re.compile(r"^(\d+)\.(\d+)$")


def parse_version(version: str) -> tuple[int, ...]:
    """`"10.3.0.26"` -> `(10, 3, 0, 26)`; anything else is an `InputError`."""
    if not isinstance(version, str) or not _VERSION.match(version):
        raise InputError(f"a TensorRT version is numbers separated by dots (10.3.0), got {version!r}")
    return tuple(int(part) for part in version.split("."))


def parse_capability(capability: str) -> tuple[int, int]:
    """`"8.7"` -> `(8, 7)`; anything else is an `InputError`."""
    match = _CAPABILITY.match(capability) if isinstance(capability, str) else None
    if not match:
        raise InputError(f"a compute capability is MAJOR.MINOR (8.7, 9.0), got {capability!r}")
    return int(match[1]), int(match[2])


def plan_key(trt_version: str, capability: str, precision: str) -> str:
    """The plan directory under `BUNDLE/engines/` and the key of its manifest entry: `10.3.0.26-sm87-fp16`."""
    major, minor = parse_capability(capability)
    return f"{'.'.join(map(str, parse_version(trt_version)))}-sm{major}{minor}-{precision}"


def rebuild_command(bundle: Path | str, precision: str) -> str:
    return f"llava-engines build {bundle} --precision {precision}"


def _runs_here(entry: dict[str, Any], trt_version: tuple[int, ...], capability: tuple[int, int]) -> str | None:
    """Why a plan set cannot run on this TensorRT and GPU, or None when it can."""
    built = parse_version(entry["tensorrt"])
    if entry["version_compatible"]:
        if trt_version[0] != built[0] or trt_version < built:
            return f"built by TensorRT {entry['tensorrt']} (version compatible: later {built[0]}.x only)"
    elif trt_version != built:
        return f"built by TensorRT {entry['tensorrt']}"
    cc = parse_capability(entry["compute_capability"])
    if entry["hardware_compatibility"] == "ampere+":
        if capability < AMPERE:
            return f"built for Ampere or newer GPUs (compute capability 8.0+), not {capability[0]}.{capability[1]}"
    elif capability != cc:
        return f"built for compute capability {entry['compute_capability']}"
    return None


def _stale_graph(manifest: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """The first graph whose plan was built from another version of its ONNX file, if any."""
    for graph, plan in entry["plans"].items():
        current = manifest["files"].get(plan["graph"], {}).get("sha256")
        if current != plan["graph_sha256"]:
            return f"the {graph} plan was built from another {plan['graph']} than the bundle's"
    return None


@dataclass(frozen=True)
class EnginePlans:
    """One set of plans (one per graph) that runs on this TensorRT and GPU: `key` of `BUNDLE/engines/`, and its
    manifest entry (precision, versions, limits, per graph the plan file and profile)."""

    bundle: Path
    manifest: dict[str, Any]
    key: str
    entry: dict[str, Any]

    def plan_file(self, graph: str) -> Path:
        """The plan of one graph; the bundle's checksum table lists it, so `load_bundle` verified it."""
        if graph not in self.entry["plans"]:
            raise BundleError(f"the {self.key} plans have no {graph} plan; {self._rebuild()}")
        return self.bundle / self.entry["plans"][graph]["file"]

    def _rebuild(self, flag: str | None = None, value: int | None = None) -> str:
        """The command that rebuilds these plans with the same limits, `flag` raised to `value`."""
        limits = {f"--{name.replace('_', '-')}": v for name, v in self.entry["limits"].items() if name != "opt_context"}
        if flag is not None:
            limits[flag] = value
        options = "".join(f" {name} {v}" for name, v in limits.items())
        return f"rebuild with {rebuild_command(self.bundle, self.entry['precision'])}{options}"

    def check_request(self, batch: int = 1, tiles: int = 0, context: int = 1) -> None:
        """Refuse (`InputError`, one line naming the build flag to raise) a request of `batch` sequences, `tiles`
        image tiles or video frames in one vision call, and `context` tokens (prompt + new tokens) per sequence
        beyond the limits the plans were built with."""
        limits = self.entry["limits"]
        for what, value, name in (
            ("sequences", batch, "max_batch"),
            ("tiles", tiles, "max_tiles"),
            ("tokens", context, "max_context"),
        ):
            if value > limits[name]:
                flag = "--" + name.replace("_", "-")
                raise InputError(
                    f"{value} {what} exceed the {limits[name]} the TensorRT plans {self.key} were built for; "
                    f"{self._rebuild(flag, value)}"
                )

    def check_shapes(self, graph: str, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse input shapes of one graph outside its plan's optimization profile: one line naming the build flag
        to raise when a named axis is too large, or what is wrong otherwise."""
        plan = self.entry["plans"][graph]
        declared = {t["name"]: t["shape"] for t in self.manifest["graphs"][graph]["variants"][plan["variant"]]["inputs"]}
        for name, shape in shapes.items():
            ranges = plan["profile"][name]
            if len(shape) != len(ranges["min"]):
                raise InputError(f"{graph} input {name} has shape {list(shape)}, rank {len(ranges['min'])} expected")
            for dim, size in enumerate(shape):
                low, high, axis = ranges["min"][dim], ranges["max"][dim], declared[name][dim]
                if low <= size <= high:
                    continue
                where = f"{graph} input {name} has {axis if isinstance(axis, str) else f'dimension {dim}'} {size}"
                built = f"the TensorRT plans {self.key} take {low}..{high}"
                if size > high and axis in AXIS_FLAGS:
                    needed = _NEEDED.get(axis, lambda value: value)(size)
                    raise InputError(f"{where}, {built}; {self._rebuild(AXIS_FLAGS[axis], needed)}")
                raise InputError(f"{where}, {built}")


def select_plans(bundle: Bundle, precision: str, trt_version: str, compute_capability: str) -> EnginePlans:
    """The plans of a loaded `bundle` for `precision` that run on this TensorRT version and GPU (compute
    capability "MAJOR.MINOR") and were built from the bundle's graphs as they are; else `BundleError`, one line
    saying why and the command that rebuilds them."""
    version, capability = parse_version(trt_version), parse_capability(compute_capability)
    manifest = bundle.manifest
    candidates = {key: entry for key, entry in manifest.get("engines", {}).items() if entry["precision"] == precision}
    rebuild = rebuild_command(bundle.path, precision)
    if not candidates:
        raise BundleError(f"the bundle has no {precision} TensorRT plans; build them: {rebuild}")
    reasons = []
    for key, entry in candidates.items():
        reason = _runs_here(entry, version, capability) or _stale_graph(manifest, entry)
        if reason is None:
            return EnginePlans(bundle.path, manifest, key, entry)
        reasons.append(f"{key}: {reason}")
    here = f"TensorRT {trt_version} on compute capability {compute_capability}"
    raise BundleError(f"no {precision} TensorRT plan of the bundle runs with {here} ({'; '.join(reasons)}); rebuild: {rebuild}")


def plans_for(bundle: Bundle, precision: str, variants: dict[str, str]) -> EnginePlans:
    """The `precision` plans that run on the installed TensorRT and this GPU (`select_plans`), checked to be built
    from the graph `variants` a pipeline runs (`precision.select_variants`)."""
    from .backends.trt import compute_capability, import_tensorrt

    plans = select_plans(bundle, precision, import_tensorrt().__version__, compute_capability())
    for graph, variant in variants.items():
        built = plans.entry["plans"].get(graph, {}).get("variant")
        if built != variant:
            raise BundleError(
                f"the {plans.key} plan of {graph} was built from {built or 'no'} variant, this runtime runs {variant}; "
                f"rebuild: {rebuild_command(bundle.path, precision)}"
            )
    return plans
