"""The decoder with int8 activations into its weight MatMuls, for onnxruntime on the CPU (`decoder.int8.ort.onnx`).

Each weight MatMul `x @ W` becomes a dynamic quantization of `x` per token and an integer product:

    scale = max(|x| over the row, tiny) / 127          one scale per token (each row of the last axis)
    q     = QuantizeLinear(x, scale, 128)               uint8, symmetric around the zero point 128; `block_size` is
                                                        the row's length, so each row is one block with its scale
    y     = MatMulIntegerToFloat(q, W, 1, w_scale, 128) * scale

`W` is int8 per output channel (`w_scale[N]`) in 7 bits (`WEIGHT_BITS`): x86 CPUs without VNNI multiply uint8 by int8
with a saturating 16-bit sum of pairs, which full-range int8 weights overflow. `MatMulIntegerToFloat` (onnxruntime's
contrib operator) applies the weight's scales as it writes its output; its activation scale is a scalar, so it gets 1
and the per-token scale is one Mul after it.

One scale per token, not per tensor as onnxruntime's `quantize_dynamic` (and its `DynamicQuantizeMatMul`) does: with
one per tensor a token's result depends on the other tokens of the run, so a request decoded in a batch would not get
the logits it gets alone (on the OneVision-0.5B preset one row's logits moved by up to 0.18 with another row beside
it), nor a prompt fed in chunks those it gets whole. Per token each row is quantized from its own values and the
integer product is exact, so rows are independent. The mask, the softmax and the attention products stay fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .weight_quantization import load_at_opset, quantize_weight, write_with_weight_matmuls_replaced

WEIGHT_BITS = 7  # int8 weights in [-64, 63]: a pair of uint8 x int8 products fits a signed 16-bit sum (2 * 255 * 64)
ACTIVATION_LEVELS = 127  # round(x / scale) in [-127, 127], stored with zero point 128
TINY = np.float32(1e-30)  # the smallest row maximum: a row of zeros gets a finite scale
QUANTIZE_OPSET = 21  # QuantizeLinear with `block_size`: one scale per row when the block is the whole row
MICROSOFT = "com.microsoft"


def _constants(graph: onnx.GraphProto) -> dict[str, str]:
    """The scalars every quantized MatMul shares, added to `graph` once; their names by role."""
    values = {
        "axes": np.array([-1], dtype=np.int64),
        "tiny": TINY,
        "levels": np.float32(ACTIVATION_LEVELS),
        "zero_point": np.uint8(128),
        "one": np.float32(1),
    }
    names = {role: f"int8_activations.{role}" for role in values}
    graph.initializer.extend(numpy_helper.from_array(np.asarray(value), names[role]) for role, value in values.items())
    return names


def _per_token_matmul(node: onnx.NodeProto, weight: np.ndarray, shared: dict[str, str]) -> tuple[list, list]:
    """The nodes replacing MatMul `node` (its output keeps its name) and the initializers they add."""
    x, (y,) = node.input[0], node.output
    name = node.name or y
    integers, scales = quantize_weight(weight, WEIGHT_BITS)
    w, w_scale = f"{name}.weight_int8", f"{name}.weight_scale"
    v = {step: f"{name}.{step}" for step in ("abs", "max", "clamped", "scale", "shape", "zero_point", "q", "float")}
    nodes = [
        helper.make_node("Abs", [x], [v["abs"]], f"{name}.abs"),
        helper.make_node("ReduceMax", [v["abs"], shared["axes"]], [v["max"]], f"{name}.reduce_max", keepdims=1),
        helper.make_node("Max", [v["max"], shared["tiny"]], [v["clamped"]], f"{name}.clamp"),
        helper.make_node("Div", [v["clamped"], shared["levels"]], [v["scale"]], f"{name}.scale"),
        helper.make_node("Shape", [v["scale"]], [v["shape"]], f"{name}.shape"),
        helper.make_node("Expand", [shared["zero_point"], v["shape"]], [v["zero_point"]], f"{name}.zero_points"),
        helper.make_node(
            "QuantizeLinear", [x, v["scale"], v["zero_point"]], [v["q"]], f"{name}.quantize", axis=-1, block_size=weight.shape[0]
        ),
        helper.make_node(
            "MatMulIntegerToFloat",
            [v["q"], w, shared["one"], w_scale, shared["zero_point"]],
            [v["float"]],
            f"{name}.matmul_integer",
            domain=MICROSOFT,
        ),
        helper.make_node("Mul", [v["float"], v["scale"]], [y], f"{name}.times_scale"),
    ]
    return nodes, [numpy_helper.from_array(integers, w), numpy_helper.from_array(scales, w_scale)]


def write_int8_activations(reference: Path, target: Path) -> Path:
    """Write the decoder at `reference` with every weight MatMul quantized per token to `target` (+ `<target>.data`);
    a decoder below `QUANTIZE_OPSET` goes to it (`load_at_opset`). The weights are read one at a time."""
    model = load_at_opset(reference, QUANTIZE_OPSET)
    if all(entry.domain != MICROSOFT for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MICROSOFT, 1))
    shared = _constants(model.graph)
    return write_with_weight_matmuls_replaced(
        model, reference, target, lambda node, weight: _per_token_matmul(node, weight, shared)
    )
