"""One TensorRT plan from one ONNX graph, on TensorRT 10 and 11: a strongly typed network (precision comes from the
graph; no FP16/INT8 builder flags, which 11 removed), one optimization profile, a workspace limit, a shared timing
cache, optional hardware and version compatibility, progress through an `IProgressMonitor`.

API as documented (docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/...):
Core/Builder.html (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`: required in 10, always on and deprecated in 11;
`create_network`, `create_optimization_profile`, `build_serialized_network`), Core/BuilderConfig.html
(`set_memory_pool_limit(MemoryPoolType.WORKSPACE)`, `create_timing_cache`/`set_timing_cache`/`get_timing_cache`,
`hardware_compatibility_level`, `BuilderFlag.VERSION_COMPATIBLE`, `progress_monitor`), Core/ProgressMonitor.html,
Core/OptimizationProfile.html (`set_shape`), parsers/Onnx/pyOnnx.html (`OnnxParser.parse_from_file`, which reads
external data beside the graph); for 11: api/migration/tensorrt-10x-to-11x-python-api-reference.html.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..runtime.backends.trt import compute_capability, import_tensorrt
from ..runtime.bundle import Bundle, load_bundle
from ..runtime.console import progress, say
from ..runtime.engine_plans import plan_key
from ..runtime.errors import LlavaRtError
from .plan import GraphPlan, Limits
from .store import bundle_lock, commit, remove_unlisted, write_atomically, write_plan


class BuildError(LlavaRtError):
    """TensorRT could not parse or build a graph."""


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings shared by every plan of one build."""

    workspace_gib: float | None = None  # None: TensorRT's default (the GPU's memory)
    hardware_compatibility: str = "none"  # or "ampere+"
    version_compatible: bool = False


def tensorrt_major(trt: Any) -> int:
    return int(trt.__version__.split(".")[0])


def _progress_monitor(trt: Any, label: str) -> Any:
    """An `IProgressMonitor` drawing one progress bar per build phase (on a terminal)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = progress(total=num_steps, desc=f"{label}: {phase_name}", unit="step")

        def step_complete(self, phase_name, step):
            self.bars[phase_name].update(1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.bars.pop(phase_name).close()

    return Monitor()


def build_serialized(
    trt: Any, onnx_file: Path, profile: dict[str, dict[str, list[int]]], options: BuildOptions, timing_cache: bytes, label: str
) -> tuple[bytes, bytes]:
    """(plan, updated timing cache) of one graph built with one optimization profile; `BuildError` when TensorRT
    refuses it."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if tensorrt_major(trt) >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise BuildError(
            f"TensorRT {trt.__version__} cannot parse {onnx_file.name}: {errors[0] if errors else 'no reason given'}"
        )
    config = builder.create_builder_config()
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    if options.hardware_compatibility == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    shapes = builder.create_optimization_profile()
    for name, ranges in profile.items():
        shapes.set_shape(name, ranges["min"], ranges["opt"], ranges["max"])
    config.add_optimization_profile(shapes)
    if not config.set_timing_cache(config.create_timing_cache(timing_cache), False):  # False: no cache of another GPU
        raise BuildError("the timing cache was made by another TensorRT version or GPU; give another --timing-cache")
    config.progress_monitor = _progress_monitor(trt, label)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT {trt.__version__} could not build {onnx_file.name} (its log above says why)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def build_plans(
    bundle: Bundle, precision: str, plans: list[GraphPlan], limits: Limits, options: BuildOptions, timing_cache: Path | None
) -> str:
    """Build every plan with this TensorRT on this GPU and record them in the bundle (see `store`); the plan key."""
    trt = import_tensorrt()
    capability = compute_capability()
    key = plan_key(trt.__version__, capability, precision)
    cache = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    with bundle_lock(bundle.path):
        manifest = load_bundle(bundle.path).manifest  # as it is now that no other build writes it
        committed = False
        try:
            entries = {}
            for number, plan in enumerate(plans, 1):
                say(f"[{number}/{len(plans)}] {plan.graph}: building {plan.onnx_file} for {key}")
                data, cache = build_serialized(trt, bundle.file(plan.onnx_file), plan.profile, options, cache, plan.graph)
                written = write_plan(bundle.path, key, plan.graph, data)
                entries[plan.graph] = {
                    **written,
                    "variant": plan.variant,
                    "graph": plan.onnx_file,
                    "graph_sha256": plan.graph_sha256,
                }
                entries[plan.graph]["profile"] = plan.profile
            if timing_cache is not None:
                write_atomically(timing_cache, cache)
            entry = {
                "precision": precision,
                "tensorrt": trt.__version__,
                "compute_capability": capability,
                "hardware_compatibility": options.hardware_compatibility,
                "version_compatible": options.version_compatible,
                "limits": asdict(limits),
                "plans": entries,
            }
            commit(bundle.path, manifest, key, entry)
            committed = True
        finally:
            if not committed:
                remove_unlisted(bundle.path, manifest)
    return key
