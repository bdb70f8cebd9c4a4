"""The onnxruntime copy of a decoder: its attention as onnxruntime's `GroupQueryAttention`, over the KV cache in place.

The standard decoder spells attention out over the runtime's preallocated cache (`graphs.split_cache_attention`):
about 25 nodes per layer, and the new keys and values come out for the runtime to copy into its buffers. Here each
layer's attention becomes one `com.microsoft.GroupQueryAttention`, onnxruntime's fused CPU kernel (the one
onnxruntime-genai's decoders run). It reads the past from the bound buffers and writes the new tokens' keys and values
into them itself (the runtime binds each `present.*` output to the buffer it feeds as that `past_key_values.*` input):

- `seqlens_k` `[B]` int32: per row, the tokens in the cache after this run, minus one;
- `total_sequence_length` scalar int32: the longest row's count after this run;
- `query_seqlens` `[B]` int32: per row, how many of the fed tokens are real (0: a row left as it is).

Each row holds its tokens from slot 0 (no padding in the cache), so positions are slot indices and a sliding window
counts slots as transformers counts positions (onnxruntime 1.32's `local_window_size` is the window itself: each query
sees that many keys, itself included; tested against transformers with prompts longer than the window). The rotary
embedding stays the standard `RotaryEmbedding` of the fed `position_ids`, applied to the projections before the
heads are split. Only the graph's structure changes: the weights are the source graph's, and its external data file is
shared, not copied.

No maintained fusion recognises this attention (onnxscript's GQA fusion matches transformers' concatenating cache),
so the rewrite is ours: it finds each layer by the graph's inputs and outputs (`past_key_values.{i}.*` and
`new_key_values.{i}.*`) and checks the shape of what it replaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..runtime.kv_cache import IN_PLACE_INPUTS, new_names, past_names, present_names

MICROSOFT = "com.microsoft"


class UnsupportedDecoder(ValueError):
    """The decoder graph lacks the structure the rewrite needs (an opset-18 graph spells the rotary out op by op)."""


@dataclass
class _Layer:
    """What one layer's attention reads and where its result goes."""

    query: str  # [B, S, heads * D], before the rotary embedding
    key: str
    value: str
    query_rotary: onnx.NodeProto  # the rotary embeddings, of the heads split out
    key_rotary: onnx.NodeProto
    output: str  # [B, S, heads * D], the value the output projection reads
    heads: int
    kv_heads: int


class _Graph:
    """Producers and consumers of a graph's values."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {name: node for node in graph.node for name in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def made_by(self, value: str, *op_types: str) -> onnx.NodeProto:
        """The node making `value`, checked to be of one of `op_types`."""
        node = self.producer.get(value)
        if node is None or node.op_type not in op_types:
            raise UnsupportedDecoder(f"{value} is not made by {' or '.join(op_types)}")
        return node

    def only_use(self, value: str, op_type: str) -> onnx.NodeProto:
        """The one node of `op_type` reading `value`."""
        nodes = [node for node in self.consumers.get(value, []) if node.op_type == op_type]
        if len(nodes) != 1:
            raise UnsupportedDecoder(f"{value} is not read by exactly one {op_type}")
        return nodes[0]

    def heads_input(self, value: str) -> str:
        """`x` of `Transpose(Reshape(x))`: the projection before its heads were split and moved."""
        return self.made_by(self.made_by(value, "Transpose").input[0], "Reshape").input[0]


def _attribute(node: onnx.NodeProto, name: str) -> int:
    """An integer attribute of `node`."""
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _layer(graph: _Graph, past_key: str, past_value: str, new_key: str, new_value: str) -> _Layer:
    """Follow one layer's attention from its cache inputs and outputs."""
    key_rotary = graph.made_by(new_key, "RotaryEmbedding")
    value = graph.heads_input(new_value)
    key = graph.heads_input(key_rotary.input[0])
    # scores against the past: MatMul(Reshape(query after rotary), Transpose(past key))
    scores = graph.consumers[graph.only_use(past_key, "Transpose").output[0]][0]
    query_rotary = graph.made_by(graph.made_by(scores.input[0], "Reshape").input[0], "RotaryEmbedding")
    query = graph.heads_input(query_rotary.input[0])
    # the output: Add(probs @ past value, probs @ new value) -> Reshape -> Transpose -> Reshape
    summed = graph.only_use(graph.only_use(past_value, "MatMul").output[0], "Add")
    output = summed.output[0]
    for op_type in ("Reshape", "Transpose", "Reshape"):
        output = graph.only_use(output, op_type).output[0]
    heads = [_attribute(node, "num_heads") for node in (query_rotary, key_rotary)]
    return _Layer(query, key, value, query_rotary, key_rotary, output, *heads)


def _sorted_live_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, each after the nodes it reads (the new ones were appended at the end)."""
    producer = {name: node for node in graph.node for name in node.output}
    live, pending = set(), [producer[output.name] for output in graph.output if output.name in producer]
    while pending:
        node = pending.pop()
        if id(node) not in live:
            live.add(id(node))
            pending += [producer[name] for name in node.input if name in producer]
    available = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer} | {""}
    ordered, waiting = [], [node for node in graph.node if id(node) in live]
    while waiting:
        ready = [node for node in waiting if all(name in available for name in node.input)]
        if not ready:
            raise UnsupportedDecoder(f"{waiting[0].name} reads a value nothing makes")
        for node in ready:
            available.update(node.output)
        ordered += ready
        placed = {id(node) for node in ready}
        waiting = [node for node in waiting if id(node) not in placed]
    return ordered


def rewrite_attention(model: onnx.ModelProto, kv_cache: dict[str, int], windows: list[int | None]) -> onnx.ModelProto:
    """`model` (a decoder of the bundle contract, any precision) with every layer's attention as GroupQueryAttention
    and the in-place cache contract (see the module docstring); changed in place and returned. `windows`: each
    layer's sliding window, None for full attention."""
    graph = model.graph
    if "attention_mask" not in {value.name for value in graph.input}:
        raise UnsupportedDecoder("the decoder has no attention_mask input (already rewritten?)")
    links = _Graph(graph)
    pasts, news, presents = past_names(kv_cache), new_names(kv_cache), present_names(kv_cache)
    renamed, added = {}, []
    for index, window in enumerate(windows):
        layer = _layer(links, *pasts[2 * index : 2 * index + 2], *news[2 * index : 2 * index + 2])
        query, key, output = f"gqa.{index}.query", f"gqa.{index}.key", f"gqa.{index}.output"
        for source, target, original in ((layer.query, query, layer.query_rotary), (layer.key, key, layer.key_rotary)):
            rotary = onnx.NodeProto()  # the same embedding (its num_heads attribute lets it split the heads itself)
            rotary.CopyFrom(original)
            rotary.input[0], rotary.output[0], rotary.name = source, target, f"{target}.rotary"
            added.append(rotary)
        added.append(
            helper.make_node(
                "GroupQueryAttention",
                # inputs 7-15 (rotary tables, position ids, bias, sinks, KV quantization scales, QK norms) unused
                [query, key, layer.value, *pasts[2 * index : 2 * index + 2], *IN_PLACE_INPUTS[:2], *[""] * 9, IN_PLACE_INPUTS[2]],
                [output, *presents[2 * index : 2 * index + 2]],
                f"gqa.{index}",
                domain=MICROSOFT,
                num_heads=layer.heads,
                kv_num_heads=layer.kv_heads,
                local_window_size=window or -1,
            )
        )
        renamed[layer.output] = output
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    graph.node.extend(added)
    past_type = next(value.type for value in graph.input if value.name == pasts[0])
    outputs = [value for value in graph.output if value.name not in set(news)]
    outputs += [helper.make_value_info(name, past_type) for name in presents]
    inputs = [value for value in graph.input if value.name != "attention_mask"]
    inputs += [
        helper.make_tensor_value_info(IN_PLACE_INPUTS[0], TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info(IN_PLACE_INPUTS[1], TensorProto.INT32, []),
        helper.make_tensor_value_info(IN_PLACE_INPUTS[2], TensorProto.INT32, ["batch"]),
    ]
    for field, values in (("output", outputs), ("input", inputs)):
        graph.ClearField(field)
        getattr(graph, field).extend(values)
    nodes = _sorted_live_nodes(graph)
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    initializers = [tensor for tensor in graph.initializer if tensor.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)
    graph.ClearField("value_info")  # shapes inferred for the replaced nodes; onnxruntime infers its own
    if not any(opset.domain == MICROSOFT for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MICROSOFT, 1))
    return model


def write_group_query_attention(source: Path, target: Path, kv_cache: dict[str, int], windows: list[int | None]) -> Path:
    """Write `source`'s decoder with GroupQueryAttention to `target`, in the same directory: the graph only, its
    weights read from `source`'s external data file."""
    if source.parent != target.parent:
        raise ValueError("the copy shares the source's external data, so it is written beside it")
    model = rewrite_attention(onnx.load(source, load_external_data=False), kv_cache, windows)
    onnx.save_model(model, target)
    return target


def add_onnxruntime_copies(
    written: dict[str, Path], kv_cache: dict[str, int], windows: list[int | None], log: Callable[[str], None]
) -> dict[str, Path]:
    """The quantized decoders `written` (`{variant key: path}`, from `weight_only.quantize_decoder`) with each
    precision's onnxruntime copy in this form: `int8.ort` (int8 activations) rewritten where it is, `int4.ort` beside
    `int4`. A decoder without the structure (`--decoder-opset 18`) keeps its copies as they are, and the log says so."""
    copies = dict(written)
    for precision in sorted({key.partition(".")[0] for key in written}):
        source = written.get(f"{precision}.ort", written[precision])
        stem = written[precision].name.removesuffix(f".{precision}.onnx")
        target = source.with_name(f"{stem}.{precision}.ort.onnx")
        try:
            copies[f"{precision}.ort"] = write_group_query_attention(source, target, kv_cache, windows)
        except UnsupportedDecoder as exc:
            log(f"  decoder {precision}.ort: attention left as it is ({exc}; GroupQueryAttention needs the opset-23 graph)")
            continue
        log(f"  decoder {precision}.ort: {target.name}, {len(windows)} GroupQueryAttention, weights read from {source.name}.data")
    return copies
