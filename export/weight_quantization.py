"""The quantized decoders' common ground: which MatMuls read a weight, symmetric integer weights with a scale per
column or per block of a column, and writing a graph with each weight MatMul replaced."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper, version_converter

from .fusion import model_opset

# What replaces one weight MatMul, given the node and its fp32 weight: the nodes (the MatMul's output keeps its name)
# and the initializers they add.
Replacement = Callable[[onnx.NodeProto, np.ndarray], tuple[list[onnx.NodeProto], list[onnx.TensorProto]]]

# Rows per int4 block: NVIDIA's TensorRT quantization docs list block sizes 64 and 128 for INT4 weights, and onnxruntime
# fuses blocks of 16 to 256 (powers of 2) into MatMulNBits.
INT4_BLOCK = 128


def load_at_opset(reference: Path, opset: int) -> onnx.ModelProto:
    """The graph at `reference`, without its weights, at `opset` or the newer one it imports: an older graph goes
    through onnx's version converter (which adapts any operator whose meaning changed; the decoder's ops only gained
    types)."""
    model = onnx.load(reference, load_external_data=False)
    return model if model_opset(model) >= opset else version_converter.convert_version(model, opset)


def weight_matmuls(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The MatMuls whose B is a 2-D weight initializer; the attention products (two activations) are not among them."""
    weights = {tensor.name for tensor in graph.initializer if len(tensor.dims) == 2}
    return [node for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]


def quantize_weight(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integers (int8, or ml_dtypes.int4 for 4 bits; zero point 0) and positive scales of a `[K, N]` weight: 8 or 7
    bits per column (scales `[N]`), 4 bits per block of `INT4_BLOCK` rows of a column (scales `[ceil(K / INT4_BLOCK),
    N]`). Each scale is the smallest that fits its group: the most negative weight may use -2^(bits-1), the most
    positive 2^(bits-1) - 1."""
    rows, columns = weight.shape
    groups = weight[None] if bits != 4 else np.pad(weight, ((0, -rows % INT4_BLOCK), (0, 0))).reshape(-1, INT4_BLOCK, columns)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scales = np.maximum(groups.max(axis=1) / high, groups.min(axis=1) / low)
    scales = np.where(scales > 0, scales, 1).astype(np.float32)
    integers = np.clip(np.rint(groups / scales[:, None]), low, high).reshape(-1, columns)[:rows]
    return integers.astype(np.int8 if bits != 4 else ml_dtypes.int4), scales[0] if bits != 4 else scales


def write_with_weight_matmuls_replaced(model: onnx.ModelProto, reference: Path, target: Path, replace: Replacement) -> Path:
    """Write `model` (the graph at `reference`, loaded without its weights) to `target` (+ `<target>.data`) with every
    weight MatMul replaced by what `replace` gives for it. The weights are read one at a time; initializers no node
    reads any more are dropped."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    matmuls = {node.output[0] for node in weight_matmuls(graph)}
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.output[0] not in matmuls:
            nodes.append(node)
            continue
        replacement, added = replace(node, numpy_helper.to_array(initializers[node.input[1]], str(reference.parent)))
        nodes.extend(replacement)
        graph.initializer.extend(added)
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    external_data_helper.load_external_data_for_model(model, str(reference.parent))
    onnx.save_model(model, target, save_as_external_data=True, all_tensors_to_one_file=True, location=f"{target.name}.data")
    return target
