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

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .int8_activations import write_int8_activations
from .weight_quantization import INT4_BLOCK, Replacement, load_at_opset, quantize_weight, write_with_weight_matmuls_replaced

BITS = {"int8": 8, "int4": 4}
BLOCKED_OPSET = 21  # DequantizeLinear with INT4 weights and `block_size`
PER_CHANNEL_OPSET = 13  # DequantizeLinear with `axis`, enough for int8 per channel


def _dequantized(bits: int) -> Replacement:
    """A weight MatMul's replacement in the standard form: a DequantizeLinear of its quantized weight, then the MatMul.
    Each MatMul gets its own DQ and quantized initializers: onnxruntime fuses a DQ -> MatMul only when the DQ feeds that
    one MatMul, and fails on DQs sharing initializers (microsoft/onnxruntime#28306); the decoder's MatMuls share no
    weight anyway."""
    attributes = {"axis": 1} if bits == 8 else {"axis": 0, "block_size": INT4_BLOCK}

    def replace(node: onnx.NodeProto, weight: np.ndarray) -> tuple[list, list]:
        integers, scales = quantize_weight(weight, bits)
        dequantized = f"{node.output[0]}.weight"  # unique: a graph names each value once
        quantized, scale = f"{dequantized}.q", f"{dequantized}.scale"
        dq = helper.make_node("DequantizeLinear", [quantized, scale], [dequantized], f"{dequantized}.dq", **attributes)
        node.input[1] = dequantized
        return [dq, node], [numpy_helper.from_array(integers, quantized), numpy_helper.from_array(scales, scale)]

    return replace


def write_weight_only(reference: Path, target: Path, bits: int) -> Path:
    """Write the standard weight-only form of the decoder at `reference` to `target` (+ `<target>.data`).

    For int4 a model below `BLOCKED_OPSET` goes to it (`load_at_opset`); int8 keeps the reference's opset (18, from
    `llava-export --decoder-opset 18`, is one TensorRT 10.3 parses). The weights are read one at a time."""
    model = load_at_opset(reference, BLOCKED_OPSET if bits == 4 else PER_CHANNEL_OPSET)
    return write_with_weight_matmuls_replaced(model, reference, target, _dequantized(bits))


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
        written["int8.ort"] = write_int8_activations(reference, fresh("int8.ort"))
    for key, path in written.items():
        _data(path).chmod(stat.S_IMODE(path.stat().st_mode))  # onnx writes external data owner-only
        log(f"  decoder {key}: {path.name}, {_size_mib(reference):.1f} MiB -> {_size_mib(path):.1f} MiB")
    return written
