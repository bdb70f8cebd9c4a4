"""Static int8 vision tower and projector: one calibration, a TensorRT form and an onnxruntime form, and their drift."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import random_image
from llava_rt.export.calibration import MAX_TILES, MAX_TILES_PER_IMAGE, calibration_tiles
from llava_rt.export.drift import graph_drift, open_graph, run_graph
from llava_rt.export.static_int8 import FORMS, QUANTIZED_OPS, TileInputs, quantize_vision_graphs
from llava_rt.runtime import ExportError
from llava_rt.runtime.backends import BackendConfig
from llava_rt.runtime.backends.onnxrt import OnnxRuntimeSession
from llava_rt.runtime.graph_segments import load_segmented

FAMILIES = ("next", "onevision", "next_video")


def _bundle_inputs(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    return manifest, np.load(bundle / "image_newline.npy")


@pytest.fixture(scope="module")
def quantized(variants, onevision, next_video, tmp_path_factory):
    """One bundle of each family: its fp32 vision graphs copied to a scratch directory, quantized, drift measured."""
    bundles = {"next": variants["llama"].bundle, "onevision": onevision["ov"].bundle, "next_video": next_video["average"].bundle}
    results = {}
    for family, bundle in bundles.items():
        work = tmp_path_factory.mktemp(f"int8-{family}")
        for name in ("vision.onnx", "projector.onnx"):
            shutil.copyfile(bundle / name, work / name)
        log = []
        inputs = TileInputs(work, calibration_tiles(*_bundle_inputs(bundle), None, log.append))
        written = quantize_vision_graphs(inputs, log.append)
        drift = {graph: _drift(inputs, graph, files) for graph, files in written.items()}
        results[family] = dict(work=work, tiles=inputs.tiles, written=written, drift=drift, log=log)
    return results


def _drift(inputs, graph, files):
    """Each form's drift on every tile: the TensorRT form in fake-quant, the onnxruntime form fused."""
    references, feeds = inputs.fp32_outputs(graph), inputs.feeds(graph)
    output = onnx.load(inputs.work / f"{graph}.onnx").graph.output[0].name
    return {form: graph_drift(references, path, feeds, output, FORMS[form].fused) for form, path in files.items()}


@pytest.fixture(params=FAMILIES)
def family(request, quantized):
    return quantized[request.param]


def _files(family, form: str):
    return [(family["work"] / f"{graph}.onnx", files[form]) for graph, files in family["written"].items()]


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def test_both_forms_of_both_graphs_are_written(family):
    assert set(family["written"]) == {"vision", "projector"}
    for graph, files in family["written"].items():
        assert {name: path.name for name, path in files.items()} == {
            "int8": f"{graph}.int8.onnx",
            "int8.ort": f"{graph}.int8.ort.onnx",
        }
    assert any("built-in" in line and "--calibration-images" in line for line in family["log"])


def test_features_stay_close_to_fp32(family):
    for graph, drift in family["drift"].items():
        assert drift["int8"]["run"] == "fake-quant" and drift["int8.ort"]["run"] == "onnxruntime"
        for form in FORMS:
            assert drift[form]["finite"], (graph, form)
            assert drift[form]["samples"] == len(family["tiles"])
            assert drift[form]["cosine"] >= 0.99, (graph, form, drift[form])


def test_both_forms_run_fused_on_the_cpu_without_nan(family):
    tile = family["tiles"][:2]
    for form in FORMS:
        vision = open_graph(family["written"]["vision"][form])
        features = run_graph(vision, {"pixel_values": tile}, "image_features")
        embeds = run_graph(open_graph(family["written"]["projector"][form]), {"image_features": features}, "image_embeds")
        assert np.isfinite(features).all() and np.isfinite(embeds).all()
        assert embeds.shape[:2] == features.shape[:2] == (2, features.shape[1])


def test_both_forms_split_into_segments_give_the_same_features(family):
    """The server runs the vision graph as segments (`graph_segments`): a quantized graph's DequantizeLinear of each
    weight is copied into the segments that use it rather than passed between them, and the output is the whole
    graph's, bit for bit."""
    tile = family["tiles"][:1]
    for form in FORMS:
        path = family["written"]["vision"][form]
        graph = onnx.load(path).graph
        weights = {tensor.name for tensor in graph.initializer}
        dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
        segmented = load_segmented(path, 3, lambda file, index: OnnxRuntimeSession(file, BackendConfig()))
        got = segmented.run({"pixel_values": tile})["image_features"]
        assert dequantized and len(segmented.reads) == 3, form
        assert not dequantized & {name for names in segmented.reads for name in names}, form
        assert np.array_equal(got, run_graph(open_graph(path), {"pixel_values": tile}, "image_features")), form


def test_tensorrt_form_is_symmetric_int8_with_zero_zero_points(family):
    for _, path in _files(family, "int8"):
        model = onnx.load(path)
        initializers = {t.name: t for t in model.graph.initializer}
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq
        for node in qdq:
            zero_point = initializers[node.input[2]]
            assert zero_point.data_type == onnx.TensorProto.INT8, node.name
            assert not numpy_helper.to_array(zero_point).any(), node.name
            scale = numpy_helper.to_array(initializers[node.input[1]])
            if node.input[0] in initializers:  # a weight: one scale per output channel
                assert scale.ndim == 1 and scale.size > 1, node.name
            else:  # an activation: one scale
                assert scale.size == 1, node.name


def test_tensorrt_form_uses_standard_onnx_only(family):
    for _, path in _files(family, "int8"):
        model = onnx.load(path)
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        assert [(o.domain, o.version >= 13) for o in model.opset_import] == [("", True)]
        onnx.checker.check_model(model)


def test_onnxruntime_form_has_uint8_activations_and_int8_weights(family):
    for _, path in _files(family, "int8.ort"):
        model = onnx.load(path)
        initializers = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear":
                weight = node.input[0] in initializers
                expected = onnx.TensorProto.INT8 if weight else onnx.TensorProto.UINT8
                assert initializers[node.input[2]].data_type == expected, node.name


def test_onnxruntime_form_runs_attention_and_tanh_gelu_in_contrib_operators(family):
    """Every attention layer of the vision tower (one Softmax each in fp32) is one MultiHeadAttention in the onnxruntime
    form, and every tanh GELU (SigLIP's; CLIP's quick GELU onnxruntime fuses itself) one FastGelu; the export says so."""
    reference = Counter(node.op_type for node in onnx.load(family["work"] / "vision.onnx").graph.node)
    fused = onnx.load(family["written"]["vision"]["int8.ort"])
    ops = Counter(node.op_type for node in fused.graph.node)
    assert reference["Softmax"] > 0 and ops["MultiHeadAttention"] == reference["Softmax"] and ops["Softmax"] == 0
    assert ops["FastGelu"] == reference["Tanh"] and ops["Tanh"] == 0
    assert {o.domain for o in fused.opset_import} == {"", "com.microsoft"}
    expected = ", ".join(f"{ops[op]} {op}" for op in ("FastGelu", "MultiHeadAttention") if ops[op])
    assert f"    onnxruntime form fused: {expected}" in family["log"]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_only_weighted_matmul_conv_and_gemm_read_int8(family, form):
    for _, path in _files(family, form):
        graph = onnx.load(path).graph
        consumers = _consumers(graph)
        dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        constants = {t.name for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "QuantizeLinear":
                assert {c.op_type for c in consumers[node.output[0]]} == {"DequantizeLinear"}
            if node.op_type == "DequantizeLinear":
                readers = {c.op_type for c in consumers[node.output[0]]}
                assert readers <= set(QUANTIZED_OPS), (node.name, readers)
        matmuls = [n for n in graph.node if n.op_type in QUANTIZED_OPS]
        for node in matmuls:  # int8 weights and inputs, or (attention) float activations only
            weighted = dequantized.get(node.input[1]) in constants
            assert (node.input[0] in dequantized) == weighted, node.name
        assert any(n.op_type == "MatMul" and n.input[0] in dequantized for n in matmuls)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_inputs_and_outputs_are_those_of_the_fp32_graph(family, form):
    def signature(values):
        return [
            (v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values
        ]

    for reference, path in _files(family, form):
        fp32, int8 = onnx.load(reference).graph, onnx.load(path).graph
        assert signature(int8.input) == signature(fp32.input)
        assert signature(int8.output) == signature(fp32.output)
        assert signature(int8.input)[0][1] == onnx.TensorProto.FLOAT
        assert {"tiles"} <= {d for _, _, dims in signature(int8.input) for d in dims if isinstance(d, str)}


def _write_images(directory, sizes):
    directory.mkdir(parents=True, exist_ok=True)
    for i, (height, width) in enumerate(sizes):
        random_image(height, width, seed=i).save(directory / f"image{i}.png")


def test_tile_inputs_run_fp32_vision_once_per_tile(onevision, tmp_path):
    bundle = onevision["ov"].bundle
    for name in ("vision.onnx", "projector.onnx"):
        shutil.copyfile(bundle / name, tmp_path / name)
    tiles = calibration_tiles(*_bundle_inputs(bundle), None, lambda message: None)
    inputs = TileInputs(tmp_path, tiles)
    first = inputs.feeds("projector", 2)
    assert [feed["image_features"].shape[0] for feed in first] == [1, 1]
    everything = inputs.feeds("projector")
    assert len(everything) == len(tiles) and all(a["image_features"] is b["image_features"] for a, b in zip(first, everything))
    vision = open_graph(tmp_path / "vision.onnx")
    expected = run_graph(vision, {"pixel_values": tiles[-1:]}, "image_features")
    np.testing.assert_array_equal(everything[-1]["image_features"], expected)
    assert len(inputs.fp32_outputs("projector", 100)) == len(tiles)


def test_calibration_directory_skips_unreadable_files_with_a_count(onevision, tmp_path):
    _write_images(tmp_path / "nested", [(50, 70), (90, 40)])
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "nested" / "image0.png").read_bytes()[:60])
    (tmp_path / "notes.txt").write_text("not an image, not counted")
    log = []
    tiles = calibration_tiles(*_bundle_inputs(onevision["ov"].bundle), tmp_path, log.append)
    assert tiles.dtype == np.float32 and tiles.shape[1:] == (3, 40, 40) and len(tiles) > 2
    assert len(log) == 1 and "of 2 images" in log[0] and "skipped 2 unusable image files" in log[0], log


def test_calibration_tiles_are_bounded(onevision, tmp_path):
    _write_images(tmp_path, [(120, 120)] * 12)  # 10 tiles each under the tiny OneVision pinpoints, 8 kept: 96 in all
    tiles = calibration_tiles(*_bundle_inputs(onevision["ov"].bundle), tmp_path, lambda message: None)
    assert 12 * MAX_TILES_PER_IMAGE > MAX_TILES and len(tiles) == MAX_TILES


def test_calibration_directory_without_usable_images_is_refused(onevision, tmp_path):
    inputs = _bundle_inputs(onevision["ov"].bundle)
    with pytest.raises(ExportError, match="is not a directory"):
        calibration_tiles(*inputs, tmp_path / "missing", print)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ExportError, match="no image files"):
        calibration_tiles(*inputs, tmp_path, print)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ExportError, match="none of the 1 image files") as error:
        calibration_tiles(*inputs, tmp_path, print)
    assert "\n" not in str(error.value)
