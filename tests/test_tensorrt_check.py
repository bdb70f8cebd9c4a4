"""The static TensorRT check: exported graphs pass every version; planted incompatibilities are found by node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llava_rt.engines.tensorrt_check import DEFAULT_TRT_VERSION, TRT_VERSIONS, check_graph
from llava_rt.runtime.errors import InputError

# The documented ai.onnx opset ranges (onnx-tensorrt docs/operators.md headers; 11.0 before 11.5's opset 25).
MAX_OPSET = {"10.3": 20, "10.15": 24, "11": 24}
BLOCKED_INT4_VERSIONS = ("10.15", "11")  # opset 21 (block_size, INT4 Q/DQ) is in range


def make_model(nodes, inputs, outputs, initializers=(), opset=18, functions=(), domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "planted", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(domain, 1) for domain in domains)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def tensor(name, elem_type, shape):
    return helper.make_tensor_value_info(name, elem_type, shape)


def relu_model(opset=18) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [tensor("x", TensorProto.FLOAT, [2])],
        [tensor("y", TensorProto.FLOAT, [2])],
        opset=opset,
    )


def findings_by_node(model, version) -> dict[str, list[str]]:
    found = {}
    for finding in check_graph(model, version):
        found.setdefault(finding.node, []).append(finding.reason)
    return found


def int8_qdq_matmul(zero_point: int = 0, zero_dtype=np.int8) -> onnx.ModelProto:
    """x -> Q/DQ (per-tensor) -> MatMul with a DQ'd per-channel int8 weight, the usual explicit-quantization shape."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, size=(16, 8)).astype(np.int8)
    initializers = [
        numpy_helper.from_array(np.float32(0.02), "x_scale"),
        numpy_helper.from_array(np.array(zero_point, zero_dtype), "x_zero"),
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="/q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="/dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="/w_dq", axis=1),
        helper.make_node("MatMul", ["x_dq", "w"], ["y"], name="/matmul"),
    ]
    return make_model(nodes, [tensor("x", TensorProto.FLOAT, [4, 16])], [tensor("y", TensorProto.FLOAT, [4, 8])], initializers)


def blocked_int4_matmul(block_size: int = 32) -> onnx.ModelProto:
    """A weight-only INT4 MatMul: the constant weight is DQ'd with one scale per `block_size` rows (opset 21)."""
    rows, cols = 64, 8
    weight = np.random.default_rng(1).integers(-8, 8, size=(rows, cols))
    blocks = rows // block_size
    initializers = [
        helper.make_tensor("w_q", TensorProto.INT4, [rows, cols], weight.ravel().tolist()),
        numpy_helper.from_array(np.full((blocks, cols), 0.05, np.float32), "w_scale"),
        helper.make_tensor("w_zero", TensorProto.INT4, [blocks, cols], [0] * (blocks * cols)),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="/w_dq", axis=0, block_size=block_size),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="/matmul"),
    ]
    inputs, outputs = [tensor("x", TensorProto.FLOAT, [4, rows])], [tensor("y", TensorProto.FLOAT, [4, cols])]
    return make_model(nodes, inputs, outputs, initializers, opset=21)


def exported_graphs(bundle, with_video_pool: bool) -> list:
    names = ["vision", "projector", "decoder", *(["video_pool"] if with_video_pool else [])]
    paths = [bundle / f"{name}.onnx" for name in names]
    assert all(path.is_file() for path in paths), sorted(p.name for p in bundle.iterdir())
    return paths


@pytest.mark.parametrize("version", ["10.3", "10.15", "11"])
def test_every_exported_fp32_graph_passes(version, variants, onevision, next_video):
    bundles = [
        *((v.bundle, False) for v in variants.values()),
        *((v.bundle, False) for v in onevision.values()),
        *((v.bundle, True) for v in next_video.values()),
    ]
    checked = 0
    for bundle, with_video_pool in bundles:
        for path in exported_graphs(bundle, with_video_pool):
            findings = check_graph(path, version)
            if version == "10.3" and path.name == "decoder.onnx":  # opset 23 by default; --decoder-opset 18 is for 10.3
                assert findings[0].reason == "ai.onnx opset 23 is outside TensorRT 10.3's range 9-20"
                assert {finding.op_type for finding in findings[1:]} == {"RMSNormalization", "RotaryEmbedding"}
            else:
                assert findings == [], f"{bundle.name}: " + "; ".join(map(str, findings))
            checked += 1
    assert checked == 3 * 7 + 3  # 7 bundles of three graphs, and the 3 LLaVA-NeXT-Video video_pool graphs


def test_versions_and_default():
    assert TRT_VERSIONS == ("10.3", "10.15", "11")
    assert DEFAULT_TRT_VERSION == "10.3"


def test_unknown_version_is_an_input_error():
    with pytest.raises(InputError) as error:
        check_graph(relu_model(), "10.4")
    message = str(error.value)
    assert "\n" not in message and "10.4" in message
    assert all(version in message for version in ("10.3", "10.15", "11"))


@pytest.mark.parametrize("version", ["10.3", "10.15", "11"])
def test_opset_range(version):
    assert check_graph(relu_model(MAX_OPSET[version]), version) == []
    assert check_graph(relu_model(9), version) == []
    findings = check_graph(relu_model(MAX_OPSET[version] + 1), version)
    assert len(findings) == 1 and "opset" in findings[0].reason and findings[0].node == "model"


def test_contrib_operator_is_named_in_one_line(tmp_path):
    nodes = [
        helper.make_node(
            "MatMulNBits",
            ["x", "w", "scales"],
            ["y"],
            name="/attn/MatMul_3",
            domain="com.microsoft",
            K=32,
            N=8,
            bits=4,
            block_size=32,
        )
    ]
    initializers = [
        numpy_helper.from_array(np.zeros((8, 1, 16), np.uint8), "w"),
        numpy_helper.from_array(np.ones(8, np.float32), "scales"),
    ]
    model = make_model(
        nodes,
        [tensor("x", TensorProto.FLOAT, [1, 32])],
        [tensor("y", TensorProto.FLOAT, [1, 8])],
        initializers,
        domains=["com.microsoft"],
    )
    onnx.save(model, tmp_path / "vision.onnx")
    lines = [str(finding) for finding in check_graph(tmp_path / "vision.onnx", "10.3")]
    assert lines == [
        "vision.onnx: node /attn/MatMul_3 (MatMulNBits, domain com.microsoft): not an ai.onnx operator TensorRT 10.3 parses"
    ]


@pytest.mark.parametrize("version", ["10.3", "10.15", "11"])
def test_ai_onnx_operators_tensorrt_does_not_parse(version):
    # Both are "N" in every onnx-tensorrt operators.md consulted (release/10.1-GA and the 10.15 table).
    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="/unique"),
        helper.make_node("StringNormalizer", ["s"], ["t"], name="/normalize", case_change_action="LOWER"),
    ]
    inputs = [tensor("x", TensorProto.FLOAT, [5]), tensor("s", TensorProto.STRING, [3])]
    outputs = [tensor("u", TensorProto.FLOAT, [None]), tensor("t", TensorProto.STRING, [None])]
    found = findings_by_node(make_model(nodes, inputs, outputs), version)
    assert "does not parse" in " ".join(found["/unique"])
    assert "does not parse" in " ".join(found["/normalize"])
    assert "STRING" in " ".join(found["input s"])


@pytest.mark.parametrize("version", ["10.3", "10.15", "11"])
def test_clean_int8_qdq_matmul_passes(version):
    model = int8_qdq_matmul()
    onnx.checker.check_model(model, full_check=True)
    assert check_graph(model, version) == []


@pytest.mark.parametrize("version", ["10.3", "10.15", "11"])
def test_nonzero_zero_point(version):
    found = findings_by_node(int8_qdq_matmul(zero_point=3), version)
    assert set(found) == {"/q", "/dq"}
    assert all("zero point x_zero" in " ".join(reasons) for reasons in found.values())


@pytest.mark.parametrize("version", ["10.3", "10.15", "11"])
def test_uint8_qdq_pair(version):
    found = findings_by_node(int8_qdq_matmul(zero_point=0, zero_dtype=np.uint8), version)
    assert set(found) == {"/q", "/dq"}
    assert all("UINT8" in " ".join(reasons) for reasons in found.values())


def test_quantize_without_zero_point_is_uint8():
    # ONNX's QuantizeLinear without zero point or output_dtype produces UINT8, which TensorRT would read as INT8.
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale"], ["q"], name="/q"),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["y"], name="/dq"),
    ]
    model = make_model(
        nodes,
        [tensor("x", TensorProto.FLOAT, [4])],
        [tensor("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.float32(0.1), "scale")],
    )
    assert set(findings_by_node(model, "10.3")) == {"/q", "/dq"}


@pytest.mark.parametrize("version", BLOCKED_INT4_VERSIONS)
def test_blocked_int4_weight_passes(version):
    model = blocked_int4_matmul()
    onnx.checker.check_model(model, full_check=True)
    assert check_graph(model, version) == []


def test_blocked_int4_weight_is_beyond_10_3():
    found = findings_by_node(blocked_int4_matmul(), "10.3")
    assert "opset 21" in " ".join(found["model"])
    assert "block_size" in " ".join(found["/w_dq"])


@pytest.mark.parametrize("version", BLOCKED_INT4_VERSIONS)
def test_int4_on_an_activation(version):
    initializers = [numpy_helper.from_array(np.float32(0.1), "scale"), helper.make_tensor("zero", TensorProto.INT4, [], [0])]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["x_q"], name="/q"),
        helper.make_node("DequantizeLinear", ["x_q", "scale", "zero"], ["y"], name="/dq"),
    ]
    model = make_model(
        nodes, [tensor("x", TensorProto.FLOAT, [4, 8])], [tensor("y", TensorProto.FLOAT, [4, 8])], initializers, opset=21
    )
    found = findings_by_node(model, version)
    assert "not a constant" in " ".join(found["/dq"])
    assert "INT4" in " ".join(found["/q"])


@pytest.mark.parametrize("version", BLOCKED_INT4_VERSIONS)
def test_per_channel_int4_weight(version):
    initializers = [
        helper.make_tensor("w_q", TensorProto.INT4, [16, 8], [1] * 128),
        numpy_helper.from_array(np.full(8, 0.05, np.float32), "w_scale"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="/w_dq", axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="/matmul"),
    ]
    model = make_model(
        nodes, [tensor("x", TensorProto.FLOAT, [4, 16])], [tensor("y", TensorProto.FLOAT, [4, 8])], initializers, opset=21
    )
    assert list(findings_by_node(model, version)) == ["/w_dq"]


@pytest.mark.parametrize("version", ["10.3", "10.15", "11"])
def test_float64_input(version):
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], name="/cast", to=TensorProto.FLOAT),
        helper.make_node("Relu", ["x32"], ["y"], name="/relu"),
    ]
    model = make_model(nodes, [tensor("x", TensorProto.DOUBLE, [2])], [tensor("y", TensorProto.FLOAT, [2])])
    found = findings_by_node(model, version)
    assert list(found) == ["input x"] and "DOUBLE" in found["input x"][0]


def test_cast_to_a_type_tensorrt_lacks():
    nodes = [helper.make_node("Cast", ["x"], ["y"], name="/cast", to=TensorProto.UINT16)]
    model = make_model(nodes, [tensor("x", TensorProto.FLOAT, [2])], [tensor("y", TensorProto.UINT16, [2])])
    found = findings_by_node(model, "10.3")
    assert "UINT16" in " ".join(found["/cast"]) and "UINT16" in " ".join(found["output y"])


@pytest.mark.parametrize("version", ["10.3", "10.15", "11"])
def test_int64_into_an_operator_without_int64(version):
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], name="/int_matmul")]
    model = make_model(
        nodes,
        [tensor("a", TensorProto.INT64, [2, 2]), tensor("b", TensorProto.INT64, [2, 2])],
        [tensor("y", TensorProto.INT64, [2, 2])],
    )
    assert "INT64" in " ".join(findings_by_node(model, version)["/int_matmul"])


def test_integer_pow_arrived_after_10_3():
    # operators.md: Pow takes FP32/FP16/BF16 on release/10.1-GA; INT32/INT64 too by 10.15 (Changelog 10.8, 10.12).
    nodes = [helper.make_node("Pow", ["a", "b"], ["y"], name="/pow")]
    model = make_model(
        nodes, [tensor("a", TensorProto.INT64, [2]), tensor("b", TensorProto.INT64, [2])], [tensor("y", TensorProto.INT64, [2])]
    )
    assert list(findings_by_node(model, "10.3")) == ["/pow"]
    assert check_graph(model, "10.15") == [] and check_graph(model, "11") == []


@pytest.mark.parametrize("version", ["10.3", "10.15", "11"])
def test_int64_slice_ends_beyond_int32_pass(version):
    # TensorRT >= 9 imports INT64 natively: the exporters' INT64_MAX / INT64_MIN+1 "to the end" values keep their meaning.
    initializers = [
        numpy_helper.from_array(np.array([1, 0], np.int64), "starts"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max, -9223372036854775807], np.int64), "ends"),
        numpy_helper.from_array(np.array([1, 0], np.int64), "axes"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "steps"),
    ]
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"], name="/slice")]
    model = make_model(nodes, [tensor("x", TensorProto.FLOAT, [3, 4])], [tensor("y", TensorProto.FLOAT, [3, 4])], initializers)
    assert check_graph(model, version) == []


def test_local_functions_are_checked_by_their_bodies():
    def model_calling(op_type):
        body = helper.make_function(
            "custom",
            "Block",
            ["a"],
            ["b"],
            [helper.make_node(op_type, ["a"], ["b"], name="/inner")],
            [helper.make_opsetid("", 18)],
        )
        call = helper.make_node("Block", ["x"], ["y"], name="/block", domain="custom")
        inputs, outputs = [tensor("x", TensorProto.FLOAT, [4])], [tensor("y", TensorProto.FLOAT, [None])]
        return make_model([call], inputs, outputs, functions=[body], domains=["custom"])

    assert check_graph(model_calling("Relu"), "10.3") == []
    assert list(findings_by_node(model_calling("Unique"), "10.3")) == ["/inner"]


def test_external_zero_points_are_read(tmp_path):
    path = tmp_path / "quantized.onnx"
    onnx.save_model(
        int8_qdq_matmul(zero_point=5), path, save_as_external_data=True, location="quantized.onnx.data", size_threshold=0
    )
    stored = {tensor.name: tensor for tensor in onnx.load(path, load_external_data=False).graph.initializer}
    assert stored["x_zero"].data_location == TensorProto.EXTERNAL
    assert set(findings_by_node(path, "10.3")) == {"/q", "/dq"}


def test_weights_are_not_read(tmp_path):
    # Zero points embedded, everything larger external: with the weights' file gone the check still runs.
    path = tmp_path / "quantized.onnx"
    onnx.save_model(int8_qdq_matmul(), path, save_as_external_data=True, location="quantized.onnx.data", size_threshold=64)
    (tmp_path / "quantized.onnx.data").unlink()
    assert check_graph(path, "10.3") == []


def test_subgraph_nodes_are_checked():
    def branch(op_type, name):
        node = helper.make_node(op_type, ["x"], [f"{name}_out"], name=f"/{name}")
        return helper.make_graph([node], name, [], [tensor(f"{name}_out", TensorProto.FLOAT, [None])])

    if_node = helper.make_node(
        "If", ["cond"], ["y"], name="/if", then_branch=branch("Unique", "then"), else_branch=branch("Relu", "else")
    )
    inputs = [tensor("cond", TensorProto.BOOL, []), tensor("x", TensorProto.FLOAT, [4])]
    model = make_model([if_node], inputs, [tensor("y", TensorProto.FLOAT, [None])])
    assert list(findings_by_node(model, "10.3")) == ["/then"]
