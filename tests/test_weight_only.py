"""Quantized decoder copies: the standard weight-only forms (int8, int4) and the int8-activation onnxruntime form."""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from llava_rt.export.drift import decoder_drift, decoder_prompts, open_graph, run_graph
from llava_rt.export.fusion import graph_opset
from llava_rt.export.group_query_attention import add_onnxruntime_copies
from llava_rt.export.manifest import external_data_file
from llava_rt.export.weight_only import quantize_decoder
from llava_rt.export.weight_quantization import INT4_BLOCK, quantize_weight, weight_matmuls
from llava_rt.runtime.bundle import read_array
from llava_rt.runtime.kv_cache import KVCache

# Mistral (sliding window), Llama, and Qwen2 (projection biases, lm_head tied to the embeddings). NeXT-Video's decoder
# is a Llama too: its three bundles would add exports, not cases.
SOURCES = ("mistral", "llama", "ov-tied")
STANDARD = ("int8", "int4")
# 4 bits leave 16 levels per block of 128 random (Gaussian, outlier-free) weights (a whole column on these tiny
# decoders): each MatMul keeps a cosine of about 0.99 and the errors add up over the layers on logits that are nearly
# flat for random weights (0.82-0.99 on these decoders). The bound catches what breaks the weights (a wrong packing, sign
# or axis gives a cosine near 0), not the precision itself; int8 keeps 0.99.
MIN_COSINE = {"int8": 0.99, "int8.ort": 0.99, "int4": 0.8}


def _bundle(name, variants, onevision):
    return onevision[name].bundle if name in onevision else variants[name].bundle


@pytest.fixture(scope="module", params=SOURCES)
def quantized(request, variants, onevision, tmp_path_factory):
    """The source bundle's decoder copied to a temporary directory with its int8 and int4 copies written next to it,
    and each copy's drift from it."""
    bundle = _bundle(request.param, variants, onevision)
    directory = tmp_path_factory.mktemp(f"weight-only-{request.param}")
    for path in [*bundle.glob("decoder.onnx*"), *bundle.glob("embed_tokens.npy"), bundle / "manifest.json"]:
        shutil.copyfile(path, directory / path.name)
    reference = directory / "decoder.onnx"
    written = {
        key: path for precision in STANDARD for key, path in quantize_decoder(reference, precision, lambda message: None).items()
    }
    manifest = json.loads((bundle / "manifest.json").read_text())
    embed = read_array(bundle, manifest["arrays"]["embed_tokens"])
    drift = {
        key: decoder_drift(reference, path, embed, manifest["graphs"]["decoder"]["kv_cache"]) for key, path in written.items()
    }
    return reference, written, drift


def _graph(path):
    return onnx.load(path, load_external_data=False).graph


def _io(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [(value.name, value.type, value.shape) for value in [*session.get_inputs(), *session.get_outputs()]]


def test_variants_are_written_next_to_the_reference_with_its_inputs_and_outputs(quantized):
    reference, written, _ = quantized
    assert {key: path.name for key, path in written.items()} == {
        "int8": "decoder.int8.onnx",
        "int8.ort": "decoder.int8.ort.onnx",
        "int4": "decoder.int4.onnx",
    }
    for path in written.values():
        assert path.parent == reference.parent and path.with_name(f"{path.name}.data").is_file()
        assert _io(path) == _io(reference)


def test_variants_run_with_finite_logits_close_to_fp32(quantized):
    _, written, drift = quantized
    for key in written:
        assert drift[key]["finite"], key
        assert drift[key]["cosine"] >= MIN_COSINE[key], (key, drift[key])
        assert drift[key]["max_abs_diff"] > 0, key  # the weights did change
    assert drift["int4"]["cosine"] < drift["int8"]["cosine"]


def _producers(graph):
    return {output: node for node in graph.node for output in node.output}


def test_standard_forms_dequantize_every_weight_matmul(quantized):
    reference, written, _ = quantized
    weight_names = {node.name for node in weight_matmuls(_graph(reference))}
    assert weight_names
    for precision in STANDARD:
        model = onnx.load(written[precision])
        graph = model.graph
        # int4 needs opset 21 (INT4, block_size); int8 per-channel keeps the reference's (18 parses in TensorRT 10.3)
        opset = graph_opset(reference) if precision == "int8" else max(graph_opset(reference), 21)
        assert {(entry.domain, entry.version) for entry in model.opset_import} == {("", opset)}
        assert {node.domain for node in graph.node} <= {"", "ai.onnx"}
        assert "QuantizeLinear" not in {node.op_type for node in graph.node}
        initializers = {tensor.name: tensor for tensor in graph.initializer}
        producers = _producers(graph)
        dequantizers = [node for node in graph.node if node.op_type == "DequantizeLinear"]
        consumers = {output: [node for node in graph.node if output in node.input] for dq in dequantizers for output in dq.output}
        fed = {node.name for node in graph.node if node.op_type == "MatMul" and producers.get(node.input[1]) in dequantizers}
        assert fed == weight_names and len(dequantizers) == len(fed)
        assert all(len(nodes) == 1 for nodes in consumers.values())  # one DQ per MatMul, as onnxruntime's fusion needs
        for dq in dequantizers:
            weight, scale = initializers[dq.input[0]], initializers[dq.input[1]]
            attributes = {attribute.name: attribute.i for attribute in dq.attribute}
            rows, columns = weight.dims
            if precision == "int8":
                assert weight.data_type == onnx.TensorProto.INT8
                assert attributes == {"axis": 1} and list(scale.dims) == [columns]
            else:
                assert weight.data_type == onnx.TensorProto.INT4
                assert attributes == {"axis": 0, "block_size": INT4_BLOCK}
                assert list(scale.dims) == [-(-rows // INT4_BLOCK), columns]
            assert len(dq.input) == 2 or not numpy_helper.to_array(initializers[dq.input[2]]).any()
            assert (numpy_helper.to_array(scale) > 0).all()
        int4 = {tensor.name for tensor in graph.initializer if tensor.data_type == onnx.TensorProto.INT4}
        assert int4 == ({dq.input[0] for dq in dequantizers} if precision == "int4" else set())


def test_int8_activations_only_into_weight_matmuls(quantized):
    reference, written, _ = quantized
    fp32, graph = _graph(reference), _graph(written["int8.ort"])
    weights = {tensor.name for tensor in graph.initializer}
    integer = [node for node in graph.node if node.op_type == "MatMulIntegerToFloat"]
    assert len(integer) == len(weight_matmuls(fp32)) and all(node.input[1] in weights for node in integer)
    assert not [node for node in graph.node if node.op_type in ("MatMul", "DynamicQuantizeLinear") and node.input[1] in weights]
    # one scale per token: each QuantizeLinear takes its whole row as one block
    quantizers = [node for node in graph.node if node.op_type == "QuantizeLinear"]
    assert len(quantizers) == len(integer)
    for node in quantizers:
        attributes = {attribute.name: attribute.i for attribute in node.attribute}
        consumer = next(user for user in integer if user.input[0] == node.output[0])
        assert attributes == {"axis": -1, "block_size": graph_initializer_rows(graph, consumer.input[1])}
    # the attention products, the mask and the softmax are the fp32 graph's nodes, unchanged
    kept = [node for node in fp32.node if node.op_type in ("Softmax", "Where", "Add") or node.op_type == "MatMul"]
    kept = [node for node in kept if node.name not in {matmul.name for matmul in weight_matmuls(fp32)}]
    assert {node.op_type for node in kept} == {"Softmax", "Where", "Add", "MatMul"}
    nodes = {node.name: node for node in graph.node}
    for node in kept:
        assert node.name in nodes and nodes[node.name] == node, node.name
    producers = _producers(graph)
    quantizing = {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}
    assert not [node.name for node in kept for name in node.input if getattr(producers.get(name), "op_type", "") in quantizing]


def graph_initializer_rows(graph, name):
    return next(tensor.dims[0] for tensor in graph.initializer if tensor.name == name)


def test_int8_activations_keep_each_row_independent(quantized):
    """A row's logits are the same, to the bit, alone or beside another row ten times larger (a scale per tensor would
    let the larger row coarsen this one's quantization)."""
    reference, written, _ = quantized
    manifest = json.loads((reference.parent / "manifest.json").read_text())
    kv_cache = manifest["graphs"]["decoder"]["kv_cache"]
    embed = read_array(reference.parent, manifest["arrays"]["embed_tokens"])
    first, second = decoder_prompts(embed, kv_cache)[:2]
    session = open_graph(written["int8.ort"])
    alone = run_graph(session, first, "logits")
    length = first["inputs_embeds"].shape[1]
    pair = {
        "inputs_embeds": np.concatenate([first["inputs_embeds"], 10 * second["inputs_embeds"]]),
        "position_ids": np.concatenate([first["position_ids"], second["position_ids"]]),
        **KVCache(kv_cache, 2, np.float32).feeds(np.zeros((2, 0), np.int64), np.ones((2, length), np.int64)),
    }
    beside = run_graph(session, pair, "logits")
    assert np.array_equal(beside[:1], alone)
    assert not np.array_equal(beside[1:], alone)


def _fused_ops(path, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"optimized.{path.name}")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node]


@pytest.mark.parametrize("precision", STANDARD)
def test_onnxruntime_fuses_the_standard_form_into_matmulnbits(quantized, precision, tmp_path):
    reference, written, _ = quantized
    ops = _fused_ops(written[precision], tmp_path)
    assert ops.count("MatMulNBits") == len(weight_matmuls(_graph(reference)))
    assert "DequantizeLinear" not in ops


def test_onnxruntime_copies_run_group_query_attention_on_the_same_weights(quantized, tmp_path):
    reference, written, drift = quantized
    manifest = json.loads((reference.parent / "manifest.json").read_text())
    kv_cache, windows = manifest["graphs"]["decoder"]["kv_cache"], manifest["text"]["sliding_windows"]
    sources = {}
    for key, path in written.items():  # copies: the fixture's int8.ort is rewritten where it is
        for file in (path, path.with_name(f"{path.name}.data")):
            shutil.copyfile(file, tmp_path / file.name)
        sources[key] = tmp_path / path.name
    lines = []
    copies = add_onnxruntime_copies(sources, kv_cache, windows, lines.append)
    assert {key: path.name for key, path in copies.items()} == {
        "int8": "decoder.int8.onnx",
        "int8.ort": "decoder.int8.ort.onnx",
        "int4": "decoder.int4.onnx",
        "int4.ort": "decoder.int4.ort.onnx",
    }
    assert not (tmp_path / "decoder.int4.ort.onnx.data").exists()
    assert external_data_file(copies["int4.ort"]) == "decoder.int4.onnx.data"
    assert len(lines) == 2 and all("GroupQueryAttention" in line for line in lines)
    embed = read_array(reference.parent, manifest["arrays"]["embed_tokens"])
    for key, source in (("int4.ort", "int4"), ("int8.ort", "int8.ort")):
        graph = _graph(copies[key])
        assert [node.op_type for node in graph.node].count("GroupQueryAttention") == kv_cache["num_layers"]
        source_tensors = {tensor.name: tensor for tensor in _graph(written[source]).initializer}
        assert all(source_tensors[tensor.name] == tensor for tensor in graph.initializer)  # the same bytes, read in place
        # the same weights, so the same drift but for the rounding of the activations each run quantizes
        assert abs(decoder_drift(reference, copies[key], embed, kv_cache)["cosine"] - drift[source]["cosine"]) < 0.01


@pytest.mark.parametrize("bits", [8, 7, 4])
def test_quantize_weight_round_trip(bits):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((2 * INT4_BLOCK + 8, 5)).astype(np.float32)  # K not a multiple of the block
    weight[:, 3] = 0  # an all-zero column keeps a finite scale
    weight[:, 4] = -np.abs(weight[:, 4])  # an all-negative column
    integers, scales = quantize_weight(weight, bits)
    assert integers.dtype == (np.int8 if bits != 4 else ml_dtypes.int4) and integers.shape == weight.shape
    assert np.isfinite(scales).all() and (scales > 0).all()
    per_row = scales[None] if bits != 4 else np.repeat(scales, INT4_BLOCK, axis=0)[: len(weight)]
    assert np.all(np.abs(integers.astype(np.float32) * per_row - weight) <= per_row / 2 + 1e-6)
    # each group's extreme weight lands on an end of the signed range: no level is wasted
    ends = np.isin(integers.astype(np.int32), [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1])
    groups = ends[None] if bits != 4 else np.pad(ends, ((0, -len(weight) % INT4_BLOCK), (0, 0))).reshape(-1, INT4_BLOCK, 5)
    assert groups.any(axis=1)[:, [0, 1, 2, 4]].all() and not ends[:, 3].any()


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="int8 or int4"):
        quantize_decoder(tmp_path / "decoder.onnx", "fp16", lambda message: None)
