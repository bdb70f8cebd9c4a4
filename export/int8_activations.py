"""The decoder with int8 activations into its weight MatMuls, for onnxruntime on the CPU (`decoder.int8.ort.onnx`).

onnxruntime's dynamic quantization: each chosen MatMul's input is quantized to uint8 per run (DynamicQuantizeLinear,
one scale per tensor), its weight to int8 per output channel, and the product runs as MatMulInteger (onnxruntime
fuses them into DynamicQuantizeMatMul, or MatMulIntegerToFloat where one input feeds several MatMuls). Only the
MatMuls named are touched, the ones reading weights: the mask, the softmax and the attention products stay fp32.
The weights keep 7 bits (`reduce_range`): x86 CPUs without VNNI multiply uint8 by int8 with a saturating 16-bit sum,
which full-range int8 weights overflow (uint8 weights avoid it but run slower).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path


class _PreprocessingAdvice(logging.Filter):
    """Drops the quantizer's advice to pre-process the model (shape inference for ops it does not quantize here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextmanager
def _root_logger_left_alone():
    """The quantizer gives its advice with the module-level `logging.warning`, which configures the root logger (a
    stderr handler) when it has no handler: hold a NullHandler there meanwhile, and drop the advice itself."""
    root, placeholder, advice = logging.getLogger(), logging.NullHandler(), _PreprocessingAdvice()
    root.addHandler(placeholder)
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
        root.removeHandler(placeholder)


def write_int8_activations(reference: Path, target: Path, matmuls: list[str]) -> Path:
    """Write the decoder at `reference` with the MatMul nodes `matmuls` quantized to `target` (+ `<target>.data`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _root_logger_left_alone():
        quantize_dynamic(
            reference,
            target,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=matmuls,
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
        )
    return target
