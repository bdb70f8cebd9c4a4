"""The decoder graph's fused structure, written over the exporter's op-by-op graph in standard operators.

- Projections reading the same input (Q/K/V, gate/up) become one MatMul on their concatenated weights, its bias
  Adds one Add, and a Split hands each consumer its part (`concat_projections`; any opset).
- At opset 23, `RMSNormalization` and `RotaryEmbedding`: torch 2.14's exporter writes them itself for the families
  here, and onnxscript's ONNX fusions (`onnxscript.rewriter.onnx_fusions`) replace whatever RMSNorm arithmetic or
  rotate-half rotary embedding an exporter left op by op.

Concatenating weights leaves each output column's dot product as it was, so the graph computes what the exported
one does (the parity tests hold it to transformers' tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.optimizer import remove_unused_nodes
from onnxscript.rewriter import onnx_fusions

from .options import FUSED_OPSET


def _weight(node: ir.Node) -> np.ndarray | None:
    """The 2-D constant weight a MatMul multiplies by, or None."""
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    return weight.const_value.numpy()


def _bias(node: ir.Node) -> tuple[ir.Node, np.ndarray] | None:
    """The Add of a 1-D constant bias that alone consumes `node`'s output, and the bias; else None."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    bias = add.inputs[1 - uses[0].idx]
    if bias is None or bias.const_value is None or len(bias.const_value.shape) != 1:
        return None
    return add, bias.const_value.numpy()


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value


def _fuse_group(graph: ir.Graph, source: ir.Value, matmuls: list[ir.Node]) -> None:
    """One MatMul (+ one Add when every member has its bias) + Split in place of `matmuls`, all reading `source`."""
    weights = [_weight(node) for node in matmuls]
    biases = [_bias(node) for node in matmuls]
    with_bias = all(biases)
    name = matmuls[0].name or matmuls[0].outputs[0].name
    nodes = [ir.node("MatMul", [source, _constant(graph, f"{name}.fused_weight", np.concatenate(weights, axis=1))])]
    if with_bias:
        bias = _constant(graph, f"{name}.fused_bias", np.concatenate([b for _, b in biases]))
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], bias]))
    sizes = _constant(graph, f"{name}.split_sizes", np.array([w.shape[1] for w in weights], dtype=np.int64))
    nodes.append(ir.node("Split", [nodes[-1].outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(weights)))
    for node in nodes:
        node.name = f"{name}.fused_{node.op_type}"
    graph.insert_before(matmuls[0], nodes)
    replaced = [add for add, _ in biases] if with_bias else matmuls
    for old, part in zip(replaced, nodes[-1].outputs):
        part.shape, part.type = old.outputs[0].shape, old.outputs[0].type
        ir.convenience.replace_all_uses_with(old.outputs[0], part)


def concat_projections(graph: ir.Graph) -> int:
    """Fuse every group of two or more weight MatMuls reading the same value; returns the number of groups.
    Graph outputs are never a projection's output in the decoder (they come out of rotary, reshapes, lm_head)."""
    groups = 0
    sources = [*graph.inputs, *(output for node in graph for output in node.outputs)]
    for source in sources:
        matmuls = [use.node for use in source.uses() if use.node.op_type == "MatMul" and use.idx == 0]
        matmuls = [node for node in matmuls if _weight(node) is not None]
        if len(matmuls) > 1:
            _fuse_group(graph, source, matmuls)
            groups += 1
    return groups


def fuse_decoder(model: ir.Model) -> dict[str, int]:
    """Fuse `model` in place; returns how many of each fusion were applied. The unused nodes and weights are dropped."""
    counts = onnx_fusions.fuse(model) if model.opset_imports.get("") == FUSED_OPSET else {}
    counts = {name: count for name, count in counts.items() if count}
    counts["fused projections"] = concat_projections(model.graph)
    remove_unused_nodes(model)
    return counts


def decoder_export_options(opset: int, log: Callable[[str], None]) -> dict:
    """`export_onnx` keywords of a decoder graph at `opset`: the fusions as its rewrite, their counts logged."""

    def rewrite(model: ir.Model) -> None:
        counts = fuse_decoder(model)
        log("  decoder fusions: " + ", ".join(f"{count} {name}" for name, count in counts.items()))

    return {"opset": opset, "rewrite": rewrite}


def graph_opset(path: Path) -> int:
    """The ai.onnx opset a saved graph imports (its weights are not read)."""
    return model_opset(onnx.load(path, load_external_data=False))


def model_opset(model: onnx.ModelProto) -> int:
    """The ai.onnx opset `model` imports."""
    return next(opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx"))
