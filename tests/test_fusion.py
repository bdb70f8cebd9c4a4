"""The decoder graph's fused structure: what each opset writes, and that it computes what transformers does."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_generation_parity import MAX_NEW_TOKENS, reference_generate, user

from conftest import random_image
from llava_rt.engines.tensorrt_check import check_graphs
from llava_rt.export.exporter import export_bundle
from llava_rt.export.fusion import fuse_decoder
from llava_rt.export.weight_quantization import weight_matmuls
from llava_rt.runtime import Pipeline

# A Llama-style layer's seven projections: Q/K/V as one MatMul, O, gate/up as one, down; lm_head after the layers.
WEIGHT_MATMULS_PER_LAYER = 4


def _op_counts(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(path, load_external_data=False).graph.node)


def _weight_matmuls(path) -> int:
    return len(weight_matmuls(onnx.load(path, load_external_data=False).graph))


def _layers(variant) -> int:
    return variant.model.config.text_config.num_hidden_layers


def test_default_decoder_uses_opset_23_normalization_and_rotary(variant):
    layers, path = _layers(variant), variant.bundle / "decoder.onnx"
    counts = _op_counts(path)
    assert counts["RMSNormalization"] == 2 * layers + 1
    assert counts["RotaryEmbedding"] == 2 * layers
    assert not {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Neg"} & set(counts)
    assert counts["Split"] == 2 * layers
    assert _weight_matmuls(path) == WEIGHT_MATMULS_PER_LAYER * layers + 1


@pytest.fixture(scope="module")
def portable_bundle(tmp_path_factory, variants):
    """The Llama variant exported at `--decoder-opset 18` with its fp16 and int8 decoders."""
    variant = variants["llama"]
    bundle = tmp_path_factory.mktemp("portable") / "bundle"
    export_bundle(variant.checkpoint, bundle, precisions=("fp16", "int8"), decoder_opset=18, log=lambda message: None)
    return variant, bundle


def test_portable_decoders_parse_in_tensorrt_10_3_and_keep_fused_projections(portable_bundle):
    variant, bundle = portable_bundle
    decoders = [bundle / name for name in ("decoder.onnx", "decoder.fp16.onnx", "decoder.int8.onnx")]
    assert check_graphs(decoders, "10.3") == []
    assert check_graphs([variant.bundle / "decoder.onnx"], "10.3") != []  # the default opset 23 does not
    counts = _op_counts(bundle / "decoder.onnx")
    assert "RMSNormalization" not in counts and "RotaryEmbedding" not in counts
    assert counts["Split"] == 2 * _layers(variant)
    assert _weight_matmuls(bundle / "decoder.onnx") == WEIGHT_MATMULS_PER_LAYER * _layers(variant) + 1


def test_portable_decoder_greedy_ids_equal_transformers(portable_bundle):
    variant, bundle = portable_bundle
    conversation, image = user("What is shown in this image?", 1), random_image(50, 90, seed=4500)
    expected, _, _ = reference_generate(variant, [conversation], [[image]])
    result = Pipeline.load(bundle).generate(conversation, images=[image], max_new_tokens=MAX_NEW_TOKENS)
    assert result.token_ids == expected[0]


def _projection_graph(with_biases: bool) -> onnx.ModelProto:
    """x -> three MatMuls (with a bias Add each when `with_biases`) -> Relu each; y -> one more MatMul."""
    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal((8, n), np.float32) for i, n in enumerate((8, 4, 4))}
    weights["w_other"] = rng.standard_normal((6, 3), np.float32)
    nodes = [helper.make_node("MatMul", ["x", name], [f"m{i}"]) for i, name in enumerate(("w0", "w1", "w2"))]
    nodes.append(helper.make_node("MatMul", ["y", "w_other"], ["other"]))
    outputs = ["m0", "m1", "m2"]
    if with_biases:
        weights.update({f"b{i}": rng.standard_normal(n, np.float32) for i, n in enumerate((8, 4, 4))})
        nodes += [helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]) for i in range(3)]
        outputs = ["a0", "a1", "a2"]
    nodes += [helper.make_node("Relu", [name], [f"r{i}"]) for i, name in enumerate(outputs)]
    outputs = ["r0", "r1", "r2"]
    graph = helper.make_graph(
        nodes,
        "projections",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6]),
        ],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in (*outputs, "other")],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 8), np.float32), "y": rng.standard_normal((2, 6), np.float32)}
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("with_biases", [True, False], ids=["with biases", "without"])
def test_concat_projections_fuses_matmuls_reading_one_input(with_biases):
    original = _projection_graph(with_biases)
    model = ir.from_proto(original)
    assert fuse_decoder(model) == {"fused projections": 1}
    fused = ir.to_proto(model)
    counts = Counter(node.op_type for node in fused.graph.node)
    assert counts["MatMul"] == 2 and counts["Split"] == 1 and counts["Add"] == int(with_biases)
    for expected, actual in zip(_run(original), _run(fused)):
        np.testing.assert_array_equal(actual, expected)
