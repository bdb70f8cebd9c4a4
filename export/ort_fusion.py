"""onnxruntime's fused CPU kernels for the onnxruntime copies of the vision-side graphs (`<graph>.int8.ort.onnx`).

onnxscript's onnxruntime fusions (`onnxscript.rewriter.ort_fusions`, maintained beside torch's exporter) rewrite the
attention into `MultiHeadAttention`, with the Q/K/V biases folded in, and the tanh GELU into `FastGelu`, both
onnxruntime contrib operators (`com.microsoft`). The standard forms (`.onnx`, `.int8.onnx`) stay as they are for
TensorRT. Left out on purpose, measured on SigLIP (OneVision-0.5B) at 2 tiles in int8: the `Attention` fusion, which
takes the Q/K/V projections inside it as float weights (6.2 s instead of 4.5 s), and `SkipLayerNormalization`, no
faster. The quantized projections and the float attention between them are untouched by the fusions kept.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import onnx_ir as ir
from onnxscript.optimizer import optimize
from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

# In order: attention is first recognised as scaled dot-product attention, which becomes MultiHeadAttention.
FUSIONS = (
    lambda model: fuse_sdpa(model, apply_shape_inference=True),
    fuse_mha1,
    fuse_mha2,
    fuse_mha_scale,
    fuse_mha_bias,
    replace_sdpa_by_mha,
    fuse_gelu,
)


def fuse_for_onnxruntime(path: Path) -> dict[str, int]:
    """Rewrite the graph at `path` (and its external data, if any) with the fusions above; returns how many of each
    onnxruntime contrib operator the graph then has."""
    model = ir.load(path)
    for fuse in FUSIONS:
        fuse(model)
    optimize(model)  # inlines what a fusion left as a function and drops the nodes no longer used
    data = path.with_name(f"{path.name}.data")
    with tempfile.TemporaryDirectory(dir=path.parent) as staging:  # the model reads `data` lazily until it is saved
        staged = Path(staging) / path.name
        ir.save(model, staged, external_data=data.name if data.exists() else None)
        if data.exists():
            os.replace(staged.with_name(data.name), data)
        os.replace(staged, path)
    return dict(Counter(node.op_type for node in model.graph.all_nodes() if node.domain == "com.microsoft"))
