"""Static check of an ONNX graph against one TensorRT version's ONNX parser: the nodes it would refuse or mis-handle.

What is checked (the data is in `tensorrt_support`):

- the ai.onnx opset is inside the version's documented range;
- every node is an ai.onnx operator the version imports (a call of a model-local function counts, its body is
  checked; the parser looks operators up by name only, so a contrib or custom-domain node is refused or, if it shares
  a name with an ai.onnx operator, imported with the wrong meaning);
- the data input of every operator has a type the version's table lists for it (floats, INT32/INT64, BOOL, UINT8;
  quantized types are checked at QuantizeLinear/DequantizeLinear only);
- QuantizeLinear/DequantizeLinear: a type the version quantizes to (INT8, FP8, INT4, FP4; UINT8 is read as INT8,
  which changes the meaning); zero points absent or constant zeros (TensorRT quantizes symmetrically); INT4 only as
  blocked DequantizeLinear of a constant weight (`block_size`); `block_size` only where opset 21 is in range;
- graph inputs, outputs, initializers, Constant/ConstantOfShape values and Cast targets of a type TensorRT has no
  tensors of (DOUBLE, which the parser silently casts to FLOAT; STRING; complex; UINT16/32/64; ...).

INT64: TensorRT >= 9 imports INT64 natively (onnx-tensorrt Changelog, 9.0 EA: no more automatic cast to INT32), so
INT64 constants keep their values, including out-of-INT32-range ones such as the INT64_MAX `ends` of a Slice. What
still bites is an INT64 tensor reaching an operator without INT64 support, which the per-operator type check
catches. The importers' few remaining INT32 reads are of axes (small in any valid graph) and of a Loop trip count,
where values >= INT32_MAX mean "unbounded", the meaning of the usual INT64_MAX sentinel; no value check is made.

Only graph structure is loaded; initializer data is read only for the (tiny) zero points, embedded or external.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from ..runtime.errors import InputError
from .tensorrt_support import DEFAULT_TRT_VERSION, FLOATS, INTEGERS, TRT_VERSIONS, TensorRTSupport, support_for

__all__ = ["DEFAULT_TRT_VERSION", "TRT_VERSIONS", "Finding", "check_graph", "check_graphs"]

AI_ONNX_DOMAINS = ("", "ai.onnx")
QUANTIZATION_OPS = ("QuantizeLinear", "DequantizeLinear")
# Types the per-operator table speaks about; others are quantized (checked at Q/DQ) or absent from TensorRT.
TABLE_TYPES = FLOATS | INTEGERS | {"BOOL", "UINT8"}
# ONNX opset that introduced `block_size` (and INT4/UINT4) in QuantizeLinear/DequantizeLinear.
BLOCKED_QUANTIZATION_OPSET = 21


@dataclass(frozen=True)
class Finding:
    """One thing TensorRT would refuse or mis-handle: where (graph file, node or tensor) and why, in one line."""

    graph: str
    node: str  # node name, or the tensor/model part the finding is about when `op_type` is empty
    op_type: str
    domain: str
    reason: str

    def __str__(self) -> str:
        if not self.op_type:
            return f"{self.graph}: {self.node}: {self.reason}"
        domain = "" if self.domain in AI_ONNX_DOMAINS else f", domain {self.domain}"
        return f"{self.graph}: node {self.node} ({self.op_type}{domain}): {self.reason}"


def check_graph(path_or_model: str | Path | onnx.ModelProto, trt_version: str = DEFAULT_TRT_VERSION) -> list[Finding]:
    """Every finding for one graph file (or loaded model) against TensorRT `trt_version` (one of `TRT_VERSIONS`)."""
    support = support_for(trt_version)
    graph = _Graph(path_or_model)
    findings = [*_opset_findings(graph, support), *_tensor_type_findings(graph, support)]
    for node in graph.nodes:
        findings += _node_findings(graph, node, support)
    return findings


def check_graphs(paths: Iterable[str | Path], trt_version: str = DEFAULT_TRT_VERSION) -> list[Finding]:
    """`check_graph` over several graph files, findings in file order."""
    return [finding for path in paths for finding in check_graph(path, trt_version)]


class _Graph:
    """A model's structure, every tensor's type, and its constants' values on demand."""

    def __init__(self, path_or_model: str | Path | onnx.ModelProto):
        if isinstance(path_or_model, onnx.ModelProto):
            self.model, self.name, self.base_dir = path_or_model, path_or_model.graph.name or "model", None
        else:
            path = Path(path_or_model)
            self.model, self.name, self.base_dir = onnx.load(path, load_external_data=False), path.name, path.parent
        self.functions = {(function.domain, function.name) for function in self.model.functions}
        self.nodes = _all_nodes(self.model)
        subgraphs = [inner for node in self.nodes for inner in _subgraphs(node)]
        self.initializers = {tensor.name: tensor for g in (self.model.graph, *subgraphs) for tensor in g.initializer}
        self.constants = {node.output[0]: node for node in self.nodes if node.op_type == "Constant" and node.output}
        self.types = _tensor_types(self.model)

    def type_of(self, tensor: str) -> str | None:
        """The ONNX type name of a tensor, None when unknown."""
        elem_type = self.types.get(tensor, TensorProto.UNDEFINED)
        return None if elem_type == TensorProto.UNDEFINED else TensorProto.DataType.Name(elem_type)

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.initializers or tensor in self.constants

    def constant_value(self, tensor: str):
        """The value of an initializer or Constant output (external data read for this tensor only), else None."""
        if tensor in self.constants:
            return _constant_node_value(self.constants[tensor])
        if tensor not in self.initializers:
            return None
        initializer = self.initializers[tensor]
        if initializer.data_location == TensorProto.EXTERNAL and self.base_dir is None:
            raise InputError(f"{self.name}: {tensor} is stored in external data; check the graph file, not a loaded model")
        return numpy_helper.to_array(initializer, base_dir=str(self.base_dir or ""))


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by a node's attributes (If branches, Loop/Scan bodies)."""
    graphs = []
    for attribute in node.attribute:
        graphs += [attribute.g] if attribute.type == AttributeProto.GRAPH else list(attribute.graphs)
    return graphs


def _all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node: the main graph's, local functions', and those of any subgraph within them."""
    nodes = [*model.graph.node, *(node for function in model.functions for node in function.node)]
    for node in nodes:  # the list grows while it is walked
        nodes += [inner for graph in _subgraphs(node) for inner in graph.node]
    return nodes


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor that type inference (or the model) knows."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graphs = [inferred.graph, *(graph for node in _all_nodes(inferred) for graph in _subgraphs(node))]
    types = {}
    for graph in graphs:
        for value in (*graph.input, *graph.output, *graph.value_info):
            types[value.name] = value.type.tensor_type.elem_type
        types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    return types


def _constant_node_value(node: onnx.NodeProto):
    """A Constant node's tensor value (the `value` attribute or a scalar/list one), None for sparse/string forms."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name in ("value_int", "value_float", "value_ints", "value_floats"):
            return np.asarray(onnx.helper.get_attribute_value(attribute))
    return None


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or f"<unnamed, output {node.output[0] if node.output else '?'}>"


def _finding(graph: _Graph, node: onnx.NodeProto, reason: str) -> Finding:
    return Finding(graph.name, _node_label(node), node.op_type, node.domain, reason)


def _opset_findings(graph: _Graph, support: TensorRTSupport) -> list[Finding]:
    low, high = support.opsets
    versions = [opset.version for opset in graph.model.opset_import if opset.domain in AI_ONNX_DOMAINS]
    if not versions:
        return [Finding(graph.name, "model", "", "", "no ai.onnx opset import")]
    if low <= versions[0] <= high:
        return []
    reason = f"ai.onnx opset {versions[0]} is outside TensorRT {support.version}'s range {low}-{high}"
    return [Finding(graph.name, "model", "", "", reason)]


def _missing_type_reason(type_name: str) -> str:
    if type_name == "DOUBLE":
        return "TensorRT has no DOUBLE tensors (its parser casts them to FLOAT)"
    return f"TensorRT has no {type_name} tensors"


def _tensor_type_findings(graph: _Graph, support: TensorRTSupport) -> list[Finding]:
    """Graph inputs, outputs and initializers of a type TensorRT lacks."""
    main = graph.model.graph
    tensors = [
        *((f"input {value.name}", value.type.tensor_type.elem_type) for value in main.input),
        *((f"output {value.name}", value.type.tensor_type.elem_type) for value in main.output),
        *((f"initializer {tensor.name}", tensor.data_type) for tensor in graph.initializers.values()),
    ]
    findings = []
    for label, elem_type in tensors:
        type_name = TensorProto.DataType.Name(elem_type)
        if elem_type != TensorProto.UNDEFINED and type_name not in support.tensor_types:
            findings.append(Finding(graph.name, label, "", "", f"{type_name}: {_missing_type_reason(type_name)}"))
    return findings


def _node_findings(graph: _Graph, node: onnx.NodeProto, support: TensorRTSupport) -> list[Finding]:
    if (node.domain, node.op_type) in graph.functions:
        return []  # TensorRT imports model-local functions; their bodies are among the nodes checked
    if node.domain not in AI_ONNX_DOMAINS:
        return [_finding(graph, node, f"not an ai.onnx operator TensorRT {support.version} parses")]
    if node.op_type not in support.operators:
        return [_finding(graph, node, f"ai.onnx operator TensorRT {support.version} does not parse")]
    if node.op_type in QUANTIZATION_OPS:
        return _quantization_findings(graph, node, support)
    return [*_produced_type_findings(graph, node, support), *_data_type_findings(graph, node, support)]


def _produced_type_findings(graph: _Graph, node: onnx.NodeProto, support: TensorRTSupport) -> list[Finding]:
    """A Cast target or a Constant/ConstantOfShape value of a type TensorRT lacks."""
    if node.op_type == "Cast":
        produced = TensorProto.DataType.Name(_attribute(node, "to"))
    elif node.op_type in ("Constant", "ConstantOfShape") and node.output:
        produced = graph.type_of(node.output[0])
    else:
        return []
    if produced is None or produced in support.tensor_types:
        return []
    return [_finding(graph, node, f"produces {produced}: {_missing_type_reason(produced)}")]


def _data_tensor(node: onnx.NodeProto) -> str | None:
    """The tensor whose type the operator table speaks about: the value for Constant/ConstantOfShape, Where's
    first branch, otherwise the first input."""
    if node.op_type in ("Constant", "ConstantOfShape"):
        return node.output[0] if node.output else None
    if node.op_type == "Where":
        return node.input[1]
    return node.input[0] if node.input else None


def _data_type_findings(graph: _Graph, node: onnx.NodeProto, support: TensorRTSupport) -> list[Finding]:
    tensor = _data_tensor(node)
    type_name = graph.type_of(tensor) if tensor else None
    allowed = support.data_types(node.op_type)
    if type_name not in TABLE_TYPES or type_name in allowed:
        return []
    reason = f"{tensor} is {type_name}; TensorRT {support.version}'s {node.op_type} takes {', '.join(sorted(allowed))}"
    return [_finding(graph, node, reason)]


def _quantized_type(graph: _Graph, node: onnx.NodeProto) -> str | None:
    """The quantized side's type: DequantizeLinear's input, QuantizeLinear's output."""
    return graph.type_of(node.input[0] if node.op_type == "DequantizeLinear" else node.output[0])


def _quantization_findings(graph: _Graph, node: onnx.NodeProto, support: TensorRTSupport) -> list[Finding]:
    reasons = []
    quantized = _quantized_type(graph, node)
    block_size = _attribute(node, "block_size", 0)
    if quantized == "UINT8":
        reasons.append("UINT8 quantization: TensorRT quantizes to INT8 and would read this UINT8 as INT8")
    elif quantized == "INT4" and node.op_type == "QuantizeLinear":
        reasons.append("INT4 QuantizeLinear: TensorRT takes INT4 only for weights, as DequantizeLinear of a constant")
    elif quantized == "INT4" and not graph.is_constant(node.input[0]):
        reasons.append(f"INT4 DequantizeLinear of {node.input[0]}, not a constant: TensorRT takes INT4 only for weights")
    elif quantized == "INT4" and not block_size:
        reasons.append("per-tensor/per-channel INT4: TensorRT takes INT4 weights only blocked (block_size)")
    elif quantized is not None and quantized not in support.quantized_types:
        known = ", ".join(sorted(support.quantized_types))
        reasons.append(f"{quantized} quantization: TensorRT {support.version} quantizes to {known}")
    if block_size and support.opsets[1] < BLOCKED_QUANTIZATION_OPSET:
        reasons.append(
            f"block_size is opset-{BLOCKED_QUANTIZATION_OPSET} blocked quantization, outside TensorRT "
            f"{support.version}'s opset range {support.opsets[0]}-{support.opsets[1]}"
        )
    reasons += _zero_point_reasons(graph, node)
    return [_finding(graph, node, reason) for reason in reasons]


def _zero_point_reasons(graph: _Graph, node: onnx.NodeProto) -> list[str]:
    zero_point = node.input[2] if len(node.input) > 2 else ""
    if not zero_point:
        return []
    value = graph.constant_value(zero_point)
    if value is None:
        return [f"zero point {zero_point} is not a constant: TensorRT needs zeros it can read at build time"]
    if (np.asarray(value).astype(np.float64) != 0).any():
        return [f"zero point {zero_point} is not all zeros: TensorRT quantizes symmetrically only"]
    return []
