"""fp16 copies of a bundle's graphs (`<graph>.fp16.onnx`), in the strongly typed form TensorRT 10/11 builds: the
precision of every tensor is written in the graph, with fp32 islands where fp16 is known to fail.

The graphs are exported from the model itself, converted to fp16, so PyTorch's dtype propagation types them. The
islands, and who makes them:

- LayerNorm (vision towers): `Fp32LayerNorm` casts the input to fp32, normalizes with fp32 weights, casts back.
- RMSNorm (decoders): transformers computes the statistics in fp32 and casts before the weight.
- Softmax: the vision towers' attention (`graphs.fp32_softmax_attention`: transformers' own fp32 softmax is exported
  as an fp16 one) and the decoder's (`graphs.split_cache_attention`, its float32 mask added to the scores cast to
  fp32) softmax in fp32.
- Rotary tables: the inverse frequencies stay fp32, from which transformers computes positions x frequencies, cos and
  sin in fp32, casting the tables to fp16.
- Logits are float32 (`graphs.DecoderWithCache`): they are sampled from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from ..runtime.errors import ExportError
from .drift import compare_outputs, open_graph, run_graph
from .fusion import decoder_export_options, graph_opset
from .graphs import (
    FP32_SOFTMAX_ATTENTION,
    PROJECTOR_IO,
    VIDEO_POOL_IO,
    VISION_IO,
    DecoderWithCache,
    Projector,
    VideoPooler,
    VisionFeatures,
    decoder_example,
    decoder_io,
    kv_cache_spec,
    register_attention_functions,
)
from .manifest import feature_layers
from .onnx_export import export_onnx
from .verify import Fp32Accumulation, decoder_logits

# Agreement of each fp16 graph (onnxruntime) with PyTorch running the same fp16 model. The two differ by rounding
# only (summation order, where each rounds to fp16): a few fp16 ulps (2^-10 relative) at the output's scale, and
# ~1e-3 at real shapes. A wrong export (a lost cast, mask or island) is off by O(1), or not finite.
MAX_RELATIVE_DIFF = 1e-2  # max |onnx - torch| / max |torch|
MIN_COSINE = 0.999  # worst per-vector (token features, logits row) cosine
# Nodes whose first input must be fp32: norm statistics, softmax, rotary tables.
FP32_ISLAND_OPS = ("LayerNormalization", "ReduceMean", "Softmax", "Cos", "Sin")
_VISION_SIDE = ("vision", "projector", "video_pool")


class Fp32LayerNorm(nn.Module):
    """A LayerNorm computed in fp32 whatever its input's dtype: input cast to fp32, normalized with the norm's fp32
    weights, cast back."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_states.float()).to(hidden_states.dtype)


def convert_to_fp16(model: nn.Module) -> None:
    """Convert `model` to fp16 in place, but for its fp32 islands: each LayerNorm is wrapped in an `Fp32LayerNorm`
    and keeps its fp32 weights, rotary embeddings keep their fp32 inverse frequencies, and the vision tower's attention
    becomes `graphs.fp32_softmax_attention`."""
    register_attention_functions()
    model.model.vision_tower.config._attn_implementation_internal = FP32_SOFTMAX_ATTENTION
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.LayerNorm):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Fp32LayerNorm(module))
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) or hasattr(module, "inv_freq"):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.half()


def lost_islands(graph: ir.Graph) -> list[str]:
    """The nodes of `FP32_ISLAND_OPS` whose input is not float32 (as the exporter typed it), as `op_type(input)`."""
    return [
        f"{node.op_type}({node.inputs[0].name})"
        for node in graph.all_nodes()
        if node.op_type in FP32_ISLAND_OPS and node.inputs[0].dtype != ir.DataType.FLOAT
    ]


def non_finite_fp16_constants(graph: ir.Graph) -> list[str]:
    """The fp16 initializers and Constant values of a graph holding inf or NaN (a finite fp16 value is within
    +-65504: a constant beyond fp16's range became an infinity)."""
    constants = {name: value.const_value for name, value in graph.initializers.items()}
    for node in graph.all_nodes():
        if node.op_type == "Constant" and "value" in node.attributes:
            constants[node.outputs[0].name] = node.attributes["value"].as_tensor()
    return [
        name
        for name, tensor in constants.items()
        if tensor is not None and tensor.dtype == ir.DataType.FLOAT16 and not np.isfinite(tensor.numpy()).all()
    ]


def _check_graph(path: Path) -> None:
    """`ExportError` unless the graph's fp32 islands are fp32 and its fp16 constants finite."""
    graph = ir.load(path).graph
    lost = lost_islands(graph)
    if lost:
        raise ExportError(f"{path.name} computes in fp16 what must be fp32: {', '.join(lost[:3])}; export aborted")
    overflowed = non_finite_fp16_constants(graph)
    if overflowed:
        raise ExportError(f"{path.name} has fp16 constants out of fp16 range: {', '.join(overflowed[:3])}; export aborted")


def _check(path: Path, actual: list[np.ndarray], expected: list[torch.Tensor], log: Callable[[str], None]) -> None:
    """`ExportError` unless the graph's outputs are finite and agree with PyTorch's (see `MAX_RELATIVE_DIFF`), and the
    graph passes `_check_graph`."""
    reference = [tensor.float().numpy() for tensor in expected]
    agreement = compare_outputs(reference, actual)
    scale = max(float(np.abs(array).max()) for array in reference)
    relative = agreement["max_abs_diff"] / max(scale, np.finfo(np.float32).tiny)
    log(
        f"  {path.name}: max |diff| vs PyTorch fp16 {relative:.1e} of max |output| {scale:.3g} (limit "
        f"{MAX_RELATIVE_DIFF:.0e}), worst cosine {agreement['min_cosine']:.5f} (limit {MIN_COSINE})"
    )
    if not agreement["finite"]:
        raise ExportError(f"{path.name} computes non-finite values (inf or NaN in fp16); export aborted")
    if not (relative <= MAX_RELATIVE_DIFF and agreement["min_cosine"] >= MIN_COSINE):
        raise ExportError(
            f"{path.name} differs from PyTorch fp16 by {relative:.2e} of the output's scale (limit {MAX_RELATIVE_DIFF:.0e}), "
            f"worst cosine {agreement['min_cosine']:.5f} (limit {MIN_COSINE}); export aborted"
        )
    _check_graph(path)


def _pair(sample: torch.Tensor) -> torch.Tensor:
    """A batch of two from one sample: the exporter specialises axes of size 1, so the traced batch is 2."""
    return torch.cat([sample, sample])


def _reference(module: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), Fp32Accumulation():
        return module(sample)


def _export_vision_side(model, work: Path, graphs: list[str], log: Callable[[str], None]) -> dict[str, Path]:
    """The vision, projector and video pooling graphs asked for, each checked on one tile (its features for the
    projector and pooling) against the fp16 model."""
    config = model.config
    vision = VisionFeatures(model.model.vision_tower, feature_layers(config), config.vision_feature_select_strategy)
    size = config.vision_config.image_size
    tile = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).half()
    features = _reference(vision, tile)
    steps = {
        "vision": (vision, VISION_IO, tile),
        "projector": (Projector(model.model.multi_modal_projector), PROJECTOR_IO, features),
    }
    if "video_pool" in graphs:
        steps["video_pool"] = (VideoPooler(model.model.vision_resampler), VIDEO_POOL_IO, features)
    written = {}
    for name in graphs:
        module, io, sample = steps[name]
        path = work / f"{name}.fp16.onnx"
        export_onnx(module, (_pair(sample),), path, io.inputs, io.outputs, io.axes)
        expected = features if name == "vision" else _reference(module, sample)
        actual = run_graph(open_graph(path), {io.inputs[0]: sample.numpy()}, io.outputs[0])
        _check(path, [actual], [expected], log)
        written[name] = path
    return written


def _export_decoder(model, work: Path, log: Callable[[str], None]) -> Path:
    """The decoder graph, checked through a left-padded prefill and two decode steps against the fp16 model. Its
    weights go to external data when the fp32 decoder's do (the tied embedding table is read from there); it is
    fused at the fp32 decoder's opset."""
    text_config = model.config.text_config
    kv_cache = kv_cache_spec(text_config)
    io = decoder_io(kv_cache)
    example = decoder_example(text_config.hidden_size, kv_cache, torch.float16, torch.Generator().manual_seed(0))
    path = work / "decoder.fp16.onnx"
    decoder = DecoderWithCache(model.model.language_model, model.lm_head)
    options = decoder_export_options(graph_opset(work / "decoder.onnx"), log)
    export_onnx(
        decoder, example, path, io.inputs, io.outputs, io.axes, external_data=(work / "decoder.onnx.data").is_file(), **options
    )
    with Fp32Accumulation():
        actual, expected = decoder_logits(path, model, kv_cache, torch.float16)
    _check(path, actual, expected, log)
    return path


def export_fp16_graphs(model, work: Path, graphs: list[str], log: Callable[[str], None] = print) -> dict[str, Path]:
    """Write `work/<graph>.fp16.onnx` for each of `graphs` (`vision`, `projector`, `video_pool`, `decoder`); returns
    their paths by graph. Inputs and outputs keep their fp32 names and axes; float ones are fp16 but `logits`.

    Converts `model` to fp16 in place (`convert_to_fp16`), so that real sizes never hold two copies of the weights:
    nothing may use it as an fp32 model afterwards. The fp32 graphs in `work` are not touched. Each graph is checked
    against PyTorch running the fp16 model, its fp32 islands and fp16 constants too (`_check`); `ExportError` when
    one fails.
    """
    convert_to_fp16(model)
    written = {}
    vision_side = [name for name in _VISION_SIDE if name in graphs]
    if vision_side:
        written.update(_export_vision_side(model, work, vision_side, log))
    if "decoder" in graphs:
        written["decoder"] = _export_decoder(model, work, log)
    return written
