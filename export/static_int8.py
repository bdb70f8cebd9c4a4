"""Static int8 copies of the vision tower and projector: one calibration on image tiles, two Q/DQ forms of each graph.

- `<graph>.int8.onnx`, for TensorRT (strongly typed networks take int8 only as explicit Q/DQ): symmetric int8, every
  zero point 0, weights per output channel, activations per tensor, biases left in float, `ai.onnx` operators only.
  onnxruntime's fused CPU kernels run it poorly (int8 x int8 saturates without VNNI): judge it in fake-quant.
- `<graph>.int8.ort.onnx`, for onnxruntime on the CPU: uint8 activations and per-channel int8 weights reduced to 7 bits
  (`reduce_range`), which the U8S8 kernels of CPUs without VNNI need to stay accurate; its attention and GELU are then
  fused into onnxruntime's contrib operators (`ort_fusion`).

Only the inputs of MatMul, Conv and Gemm with constant weights are quantized: Q/DQ on LayerNormalization, Softmax or
Add outputs (or on the MatMul outputs they read) destroys the features, and the attention MatMuls (activations times
activations, about a tenth of the work) stay float: quantizing them too costs the TensorRT form most of its drift (at
OneVision-0.5B's shapes, random weights: fake-quant cosine 0.99896 instead of 0.99975) and makes the onnxruntime form
no faster. Ranges are the MinMax of the tensors over the calibration tiles, computed once and shared by both forms
(the TensorRT form makes them symmetric).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import MinMaxCalibrater, QDQQuantizer, QuantType

from .drift import open_graph, run_graph
from .onnx_export import EXTERNAL_DATA_THRESHOLD
from .ort_fusion import fuse_for_onnxruntime

GRAPHS = ("vision", "projector")
QUANTIZED_OPS = ("MatMul", "Conv", "Gemm")


@dataclass(frozen=True)
class Int8Form:
    """One int8 form of a graph: the file suffix, the activation type and the quantizer's options."""

    suffix: str
    activations: QuantType
    reduce_range: bool
    options: dict
    fused: bool  # onnxruntime's own form: run through its fused kernels (drift too) and given its fusions, or fake-quant


# Weights symmetric; MatMul/Conv/Gemm outputs stay float (a Q/DQ there would feed the Add, LayerNorm... after them).
COMMON_OPTIONS = {"WeightSymmetric": True, "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)}
FORMS = {
    "int8": Int8Form(
        suffix=".int8.onnx",
        activations=QuantType.QInt8,
        reduce_range=False,
        options={**COMMON_OPTIONS, "ActivationSymmetric": True, "QuantizeBias": False},  # TensorRT takes float biases
        fused=False,
    ),
    "int8.ort": Int8Form(
        suffix=".int8.ort.onnx", activations=QuantType.QUInt8, reduce_range=True, options=COMMON_OPTIONS, fused=True
    ),
}


class _LowMemoryCalibrater(MinMaxCalibrater):
    """onnxruntime's MinMax calibrator, with its session set to free each activation once it is reduced.

    The calibrator adds a ReduceMin and a ReduceMax (each with a Reshape) per calibrated tensor, as graph outputs, each
    before the tensor's first reader. With onnxruntime's DEFAULT execution order those reductions run late and a run
    keeps nearly every activation alive: 4 tiles of the real SigLIP tower peak at 10.6 GB. PRIORITY_BASED order runs
    ready nodes lowest index first, so the reductions run early: 3.9 GB, the same ranges (onnxruntime 1.32; 1.22
    appended the reductions at the end, and the graph had to be reordered as well).
    """

    def create_inference_session(self):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as onnxruntime's own
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        self.infer_session = ort.InferenceSession(self.augmented_model_path, options, providers=self.execution_providers)


class _Feeds:
    """A calibration data reader over a list of feeds (onnxruntime's reader protocol: `get_next` until None)."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _io_names(path: Path) -> tuple[str, str]:
    """The single input and output names of a vision or projector graph."""
    graph = onnx.load(path, load_external_data=False).graph
    return graph.input[0].name, graph.output[0].name


def calibrate(path: Path, feeds: list[dict[str, np.ndarray]]):
    """MinMax ranges (onnxruntime `TensorsData`) of the tensors MatMul, Conv and Gemm read or write, over `feeds`."""
    with tempfile.TemporaryDirectory(prefix="llava-rt-calibration-") as scratch:
        calibrator = _LowMemoryCalibrater(
            path, list(QUANTIZED_OPS), str(Path(scratch) / "augmented.onnx"), use_external_data_format=True
        )
        calibrator.augment_graph()
        calibrator.create_inference_session()
        for feed in feeds:  # one feed per call: collected outputs are reduced to ranges after each (1.22 keeps them)
            calibrator.collect_data(_Feeds([feed]))
        ranges = calibrator.compute_data()
        del calibrator  # closes the session before its files are removed
    return ranges


def _keep_used_opsets(model: onnx.ModelProto) -> None:
    """Drop opset imports of domains no node uses (the TensorRT form must import `ai.onnx` only)."""
    used = {node.domain for node in model.graph.node} | {""}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _float_for_other_readers(model: onnx.ModelProto) -> None:
    """The quantizer points every reader of a quantized activation at its DequantizeLinear (a Shape reading the
    pixels, say); point those that are not MatMul, Conv or Gemm back at the float tensor, so only these read int8."""
    quantized = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    floats = {
        node.output[0]: quantized[node.input[0]]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in quantized
    }
    for node in model.graph.node:
        if node.op_type not in (*QUANTIZED_OPS, "QuantizeLinear", "DequantizeLinear"):
            node.input[:] = [floats.get(name, name) for name in node.input]


def weighted_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the MatMul, Conv and Gemm nodes whose second input (the weights) is a constant."""
    constants = {tensor.name for tensor in graph.initializer}
    return [node.name for node in graph.node if node.op_type in QUANTIZED_OPS and node.input[1] in constants]


def quantize(path: Path, ranges, form: Int8Form) -> Path:
    """Write `form` of the fp32 graph at `path` next to it, from calibrated `ranges`; returns the new file's path."""
    # The quantizer finds float tensors by their value_info; shapes are inferred before the weights are read, uncopied.
    model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
    onnx.load_external_data_for_model(model, str(path.parent))
    quantizer = QDQQuantizer(
        model,
        per_channel=True,
        reduce_range=form.reduce_range,
        weight_qType=QuantType.QInt8,
        activation_qType=form.activations,
        tensors_range=copy.deepcopy(ranges),  # the quantizer may adjust ranges in place; the other form needs them as is
        nodes_to_quantize=weighted_nodes(model.graph),
        nodes_to_exclude=[],
        op_types_to_quantize=list(QUANTIZED_OPS),
        extra_options=form.options,
    )
    quantized = quantizer.quantize_model()
    _float_for_other_readers(quantized)
    _keep_used_opsets(quantized)
    target = path.with_name(path.stem + form.suffix)
    large = quantized.ByteSize() > EXTERNAL_DATA_THRESHOLD
    quantizer.model.save_model_to_file(str(target), use_external_data_format=large)  # sorts nodes; data in <file>.data
    return target


class TileInputs:
    """Image tiles (`calibration.calibration_tiles`) and what the vision-side graphs read of them: the tiles for the
    vision tower, their fp32 vision features for the projector (and video pool). fp32 outputs are computed tile by
    tile (one tile's memory at a time) on first use and kept, so calibration and drift share one fp32 run."""

    def __init__(self, work: Path, tiles: np.ndarray):
        self.work, self.tiles = work, tiles
        self._fp32_outputs: dict[str, list[np.ndarray]] = {}

    def _count(self, count: int | None) -> int:
        return len(self.tiles) if count is None else min(count, len(self.tiles))

    def feeds(self, graph: str, count: int | None = None) -> list[dict[str, np.ndarray]]:
        """`graph`'s feeds for the first `count` tiles (all by default), one tile (a batch of one) per feed."""
        count = self._count(count)
        name = _io_names(self.work / f"{graph}.onnx")[0]
        if graph == "vision":
            return [{name: np.ascontiguousarray(self.tiles[i : i + 1])} for i in range(count)]
        return [{name: features} for features in self.fp32_outputs("vision", count)]

    def fp32_outputs(self, graph: str, count: int | None = None) -> list[np.ndarray]:
        """The fp32 graph `<graph>.onnx`'s output for each of the first `count` tiles."""
        count = self._count(count)
        done = self._fp32_outputs.setdefault(graph, [])
        if len(done) < count:
            path = self.work / f"{graph}.onnx"
            session, output = open_graph(path), _io_names(path)[1]
            done.extend(run_graph(session, feed, output) for feed in self.feeds(graph, count)[len(done) :])
        return done[:count]


def quantize_vision_graphs(
    inputs: TileInputs, log: Callable[[str], None], graphs: Iterable[str] = GRAPHS
) -> dict[str, dict[str, Path]]:
    """Calibrate each of `graphs` present as `<graph>.onnx` in the directory of `inputs` once on its tiles, then write
    both int8 forms next to it; returns `{graph: {form name: path}}` (form names are the keys of `FORMS`)."""
    written = {}
    for graph in graphs:
        path = inputs.work / f"{graph}.onnx"
        if not path.is_file():
            continue
        started = time.perf_counter()
        ranges = calibrate(path, inputs.feeds(graph))
        written[graph] = {name: quantize(path, ranges, form) for name, form in FORMS.items()}
        fusions = [fuse_for_onnxruntime(written[graph][name]) for name, form in FORMS.items() if form.fused]
        seconds = time.perf_counter() - started
        log(f"  {graph}: calibrated on {len(inputs.tiles)} tiles, int8 for TensorRT and onnxruntime written in {seconds:.0f}s")
        for counts in filter(None, fusions):
            log(f"    onnxruntime form fused: {', '.join(f'{count} {name}' for name, count in sorted(counts.items()))}")
    return written
