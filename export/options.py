"""What `llava-export` accepts and what it needs installed; importable without the export extra."""

from __future__ import annotations

from collections.abc import Sequence

from ..runtime.errors import ExportError

# The precision variants an export can add; the fp32 graphs are in every bundle, as the reference.
VARIANT_PRECISIONS = ("fp16", "int8", "int4")
# ai.onnx opsets of the decoder graphs: 23 writes RMSNormalization and RotaryEmbedding (TensorRT parses them from
# 10.15); 18, every other graph's, spells them op by op, for TensorRT 10.3 (JetPack 6).
FUSED_OPSET = 23
PORTABLE_OPSET = 18
DECODER_OPSETS = (FUSED_OPSET, PORTABLE_OPSET)
# the `export` extra and the modules that show it is installed
EXTRA = ("export", ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors"))


def check_precisions(precisions: str | Sequence[str]) -> tuple[str, ...]:
    """The variant precisions asked for (a comma-separated string or a sequence; `fp32`, in every bundle, may be
    named too), in `VARIANT_PRECISIONS` order; `ExportError` for an unknown name."""
    names = precisions.split(",") if isinstance(precisions, str) else list(precisions)
    known = ("fp32", *VARIANT_PRECISIONS)
    for name in names:
        if not isinstance(name, str) or name.strip() not in known:
            raise ExportError(f"unknown precision {name!r} (choose from {', '.join(known)}, comma separated)")
    asked = {name.strip() for name in names}
    return tuple(precision for precision in VARIANT_PRECISIONS if precision in asked)
