"""Quantized copies of the fp32 decoder, written next to it: `quantize_decoder`.

The standard form (`decoder.<int8|int4>.onnx`) reads the weight of every MatMul that has one (the projections, the
MLP, lm_head) through a `DequantizeLinear` (opset 21), the ai.onnx form TensorRT builds as weight-only quantization:
int8 per output channel (`axis` 1 of the `[K, N]` weight), int4 in blocks of `INT4_BLOCK` rows along K (`axis` 0,
`block_size`); positive scales, no zero points. onnxruntime's CPU provider fuses each DQ -> MatMul into its
MatMulNBits kernel (`session.qdq_matmulnbits_accuracy_level`, default 4: int8 compute), int4 blocked and int8 per
channel alike (the int8 rule is newer than 1.22, which ran the DQ on every call). int8 also gets the
onnxruntime form `decoder.int8.ort.onnx`, int8 activations too (`int8_activations`): on the CPU it is the fast one.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper, version_converter

from .fusion import graph_opset
from .int8_activations import write_int8_activations

BITS = {"int8": 8, "int4": 4}
# Rows per int4 block: NVIDIA's TensorRT quantization docs list block sizes 64 and 128 for INT4 weights, and onnxruntime
# fuses blocks of 16 to 256 (powers of 2) into MatMulNBits.
INT4_BLOCK = 128
BLOCKED_OPSET = 21  # DequantizeLinear with INT4 weights and `block_size`; int8 per-channel needs only opset 13


def weight_matmuls(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The MatMuls whose B is a 2-D weight initializer; the attention products (two activations) are not among them."""
    weights = {tensor.name for tensor in graph.initializer if len(tensor.dims) == 2}
    return [node for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]


def quantize_weight(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integers (int8 or ml_dtypes.int4, zero point 0, the full signed range) and positive scales of a `[K, N]` weight:
    8 bits per column (scales `[N]`), 4 bits per block of `INT4_BLOCK` rows of a column (scales
    `[ceil(K / INT4_BLOCK), N]`). Each scale is the smallest that fits its group: the most negative weight may use
    -2^(bits-1), the most positive 2^(bits-1) - 1."""
    rows, columns = weight.shape
    groups = weight[None] if bits == 8 else np.pad(weight, ((0, -rows % INT4_BLOCK), (0, 0))).reshape(-1, INT4_BLOCK, columns)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scales = np.maximum(groups.max(axis=1) / high, groups.min(axis=1) / low)
    scales = np.where(scales > 0, scales, 1).astype(np.float32)
    integers = np.clip(np.rint(groups / scales[:, None]), low, high).reshape(-1, columns)[:rows]
    return integers.astype(np.int8 if bits == 8 else ml_dtypes.int4), scales[0] if bits == 8 else scales


def _dequantized_weights(model: onnx.ModelProto, base_dir: Path, bits: int) -> None:
    """Put a DequantizeLinear of its quantized weight before every weight MatMul, in place. Each MatMul gets its own
    DQ and quantized initializers: onnxruntime fuses a DQ -> MatMul only when the DQ feeds that one MatMul, and fails
    on DQs sharing initializers (microsoft/onnxruntime#28306); the decoder's MatMuls share no weight anyway."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    matmuls = {node.output[0] for node in weight_matmuls(graph)}
    attributes = {"axis": 1} if bits == 8 else {"axis": 0, "block_size": INT4_BLOCK}
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.output[0] in matmuls:
            integers, scales = quantize_weight(numpy_helper.to_array(initializers[node.input[1]], str(base_dir)), bits)
            dequantized = f"{node.output[0]}.weight"  # unique: a graph names each value once
            weight, scale = f"{dequantized}.q", f"{dequantized}.scale"
            graph.initializer.extend([numpy_helper.from_array(integers, weight), numpy_helper.from_array(scales, scale)])
            nodes.append(helper.make_node("DequantizeLinear", [weight, scale], [dequantized], f"{dequantized}.dq", **attributes))
            node.input[1] = dequantized
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def write_weight_only(reference: Path, target: Path, bits: int) -> Path:
    """Write the standard weight-only form of the decoder at `reference` to `target` (+ `<target>.data`).

    For int4 a model below `BLOCKED_OPSET` goes to it through onnx's version converter (which adapts any operator
    whose meaning changed; the decoder's ops only gained types); int8 keeps the reference's opset (18, from
    `llava-export --decoder-opset 18`, is one TensorRT 10.3 parses). The weights are read one at a time."""
    model = onnx.load(reference, load_external_data=False)
    if bits == 4 and graph_opset(reference) < BLOCKED_OPSET:
        model = version_converter.convert_version(model, BLOCKED_OPSET)
    _dequantized_weights(model, reference.parent, bits)
    external_data_helper.load_external_data_for_model(model, str(reference.parent))
    onnx.save_model(model, target, save_as_external_data=True, all_tensors_to_one_file=True, location=f"{target.name}.data")
    return target


def _data(path: Path) -> Path:
    return path.with_name(f"{path.name}.data")


def _size_mib(path: Path) -> float:
    return (path.stat().st_size + (_data(path).stat().st_size if _data(path).exists() else 0)) / 2**20


def quantize_decoder(reference: Path, precision: str, log: Callable[[str], None]) -> dict[str, Path]:
    """Write the `precision` ("int8" or "int4") copies of the fp32 decoder at `reference` next to it; returns
    `{variant key: path}`: `int4` (standard), or `int8` (standard) and `int8.ort` (int8 activations)."""
    if precision not in BITS:
        raise ValueError(f"the decoder is quantized to {' or '.join(BITS)}, not {precision!r}")

    def fresh(key: str) -> Path:
        """Where variant `key` goes, an earlier copy deleted (onnx would append to its data file)."""
        path = reference.with_name(f"{reference.stem}.{key}.onnx")
        for stale in (path, _data(path)):
            stale.unlink(missing_ok=True)
        return path

    written = {precision: write_weight_only(reference, fresh(precision), BITS[precision])}
    if precision == "int8":
        names = [node.name for node in weight_matmuls(onnx.load(reference, load_external_data=False).graph)]
        written["int8.ort"] = write_int8_activations(reference, fresh("int8.ort"), names)
    for key, path in written.items():
        _data(path).chmod(stat.S_IMODE(path.stat().st_mode))  # onnx writes external data owner-only
        log(f"  decoder {key}: {path.name}, {_size_mib(reference):.1f} MiB -> {_size_mib(path):.1f} MiB")
    return written
