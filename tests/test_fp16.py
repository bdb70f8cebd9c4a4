"""fp16 graphs (export/fp16.py) for the three families: finite and close to fp32, padding and fully masked rows handled,
fp32 islands and fp16 constants as TensorRT's strongly typed networks need them, IO dtypes as decided."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llava_rt.export.checkpoint import load_model, read_checkpoint
from llava_rt.export.drift import decoder_drift, graph_drift, graph_outputs, open_graph, run_graph
from llava_rt.export.fp16 import export_fp16_graphs, lost_islands, non_finite_fp16_constants
from llava_rt.export.graphs import kv_cache_spec
from llava_rt.runtime.errors import ExportError
from llava_rt.runtime.kv_cache import KVCache, new_names

# case -> (session fixture, variant, graphs exported in fp16)
CASES = {
    "next-mistral": ("variants", "mistral", ["vision", "projector", "decoder"]),  # CLIP, Mistral (sliding window)
    "onevision-tied": ("onevision", "ov-tied", ["vision", "projector", "decoder"]),  # SigLIP, Qwen2, tied embeddings
    "next-video-conv": ("next_video", "conv", ["video_pool", "decoder"]),  # conv pooling, Llama
    "next-video-average": ("next_video", "average", ["video_pool"]),
    "next-video-max": ("next_video", "max", ["video_pool"]),
}
OUTPUTS = {"vision": "image_features", "projector": "image_embeds", "video_pool": "pooled_features"}
FLOAT, FLOAT16, INT64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64


@dataclass
class Fp16Case:
    work: Path  # a copy of the fp32 bundle, with the fp16 graphs written next to its graphs
    written: dict[str, Path]
    embed: np.ndarray  # the fp32 embedding table
    kv_cache: dict[str, int]
    rope_theta: float


@pytest.fixture(scope="module")
def cases(request, tmp_path_factory) -> dict[str, Fp16Case]:
    built = {}
    for case, (fixture, name, graphs) in CASES.items():
        variant = request.getfixturevalue(fixture)[name]
        work = tmp_path_factory.mktemp(case)
        shutil.copytree(variant.bundle, work, dirs_exist_ok=True)
        model = load_model(read_checkpoint(variant.checkpoint), torch.float32)
        embed = model.get_input_embeddings().weight.detach().numpy().copy()
        written = export_fp16_graphs(model, work, graphs, log=lambda message: None)
        text_config = model.config.text_config
        built[case] = Fp16Case(work, written, embed, kv_cache_spec(text_config), text_config.rope_parameters["rope_theta"])
    return built


def _fp16_graphs(cases):
    return [(case, graph, path) for case, built in cases.items() for graph, path in built.written.items()]


def _value_types(path: Path) -> dict[str, int]:
    """Element type of every value of a graph, by ONNX shape inference."""
    graph = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False)).graph
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.input, *graph.value_info, *graph.output]}
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    return types


def test_graphs_are_written_beside_the_untouched_fp32_ones(cases, variants, onevision, next_video):
    fixtures = {"variants": variants, "onevision": onevision, "next_video": next_video}
    for case, (fixture, name, graphs) in CASES.items():
        built = cases[case]
        assert built.written == {graph: built.work / f"{graph}.fp16.onnx" for graph in graphs}
        bundle = fixtures[fixture][name].bundle
        for original in bundle.iterdir():
            assert (built.work / original.name).read_bytes() == original.read_bytes(), original.name
    # the fp16 decoder keeps its weights in external data exactly when the fp32 one does (tied embeddings)
    external = {
        case: (built.work / "decoder.fp16.onnx.data").is_file() for case, built in cases.items() if "decoder" in built.written
    }
    assert external == {case: (cases[case].work / "decoder.onnx.data").is_file() for case in external}
    assert set(external.values()) == {True, False}


def test_io_dtypes_names_and_axes(cases):
    """Float inputs and outputs are fp16 but the logits (float32); ids stay int64; names and named axes are the fp32
    graph's."""
    for case, graph, path in _fp16_graphs(cases):
        fp16, fp32 = (onnx.load(p, load_external_data=False).graph for p in (path, path.with_name(f"{graph}.onnx")))
        for values16, values32 in ((fp16.input, fp32.input), (fp16.output, fp32.output)):
            assert [v.name for v in values16] == [v.name for v in values32], (case, graph)
            for v16, v32 in zip(values16, values32):
                dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (v16, v32)]
                assert dims[0] == dims[1], (case, graph, v16.name)
                expected = {"logits": FLOAT, "attention_mask": INT64, "position_ids": INT64}.get(v16.name, FLOAT16)
                assert v16.type.tensor_type.elem_type == expected, (case, graph, v16.name)


def test_vision_side_features_close_to_fp32(cases):
    rng = np.random.default_rng(0)
    for case, built in cases.items():
        vision_side = [graph for graph in built.written if graph != "decoder"]
        size = onnx.load(built.work / "vision.onnx").graph.input[0].type.tensor_type.shape.dim[2].dim_value
        tiles = [rng.standard_normal((1, 3, size, size)).astype(np.float32) for _ in range(2)]
        vision = open_graph(built.work / "vision.onnx")
        features = [run_graph(vision, {"pixel_values": tile}, "image_features") for tile in tiles]
        feeds = {graph: [{"image_features": f} for f in features] for graph in ("projector", "video_pool")}
        feeds["vision"] = [{"pixel_values": tile} for tile in tiles]
        for graph in vision_side:
            references = graph_outputs(built.work / f"{graph}.onnx", feeds[graph], OUTPUTS[graph])
            drift = graph_drift(references, built.written[graph], feeds[graph], OUTPUTS[graph])
            assert drift["finite"], (case, graph)
            assert drift["min_cosine"] >= 0.9999, (case, graph, drift)


def test_decoder_logits_close_to_fp32(cases):
    for case, built in cases.items():
        if "decoder" in built.written:
            drift = decoder_drift(built.work / "decoder.onnx", built.written["decoder"], built.embed, built.kv_cache)
            assert drift["finite"], case
            assert drift["min_cosine"] >= 0.999, (case, drift)


def _generate(session, kv_cache: dict[str, int], prompt: np.ndarray, mask: np.ndarray, tokens: np.ndarray) -> list[dict]:
    """A prefill of `prompt` (`[B, S, H]`, `mask` `[B, S]`), then one decode step per `tokens` entry (`[B, 1, H]`),
    through the runtime's preallocated fp16 `KVCache` (spare capacity masked); every step's outputs."""
    kv = KVCache(kv_cache, len(prompt), np.float16)
    embeds, positions = prompt, np.maximum(mask.cumsum(-1) - 1, 0)
    names = [output.name for output in session.get_outputs()]
    outputs = []
    for step in range(len(tokens) + 1):
        if step:
            embeds = tokens[step - 1]
            mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        feeds = kv.feeds(mask[:, : kv.length], mask[:, kv.length :])
        result = dict(zip(names, session.run(None, {"inputs_embeds": embeds, "position_ids": positions, **feeds})))
        kv.reserve(mask.shape[1] + 4)
        kv.append({name: result[name] for name in new_names(kv_cache)})
        outputs.append(result)
    return outputs


def test_left_padding_and_fully_masked_rows(cases):
    """A batch of a full row, a left-padded row and a row masked entirely (every query of it a fully masked row):
    everything finite, and the padded row computes what it computes alone, unpadded."""
    for case, built in cases.items():
        if "decoder" not in built.written:
            continue
        session = open_graph(built.written["decoder"])
        ids = np.random.default_rng(1).integers(0, len(built.embed), size=(3, 3, 7))
        prompt, tokens = built.embed[ids[0]].astype(np.float16), built.embed[ids[1:, :, :1]].astype(np.float16)
        mask = np.array([[1] * 7, [0, 0, 0, 1, 1, 1, 1], [0] * 7], np.int64)
        batch = _generate(session, built.kv_cache, prompt, mask, tokens)
        alone = _generate(session, built.kv_cache, prompt[1:2, 3:], mask[1:2, 3:], tokens[:, 1:2])
        for step, (padded, unpadded) in enumerate(zip(batch, alone)):
            assert all(np.isfinite(value).all() for value in padded.values()), (case, step)
            new = 4 if step == 0 else 1
            for name, value in unpadded.items():
                ours = padded[name][1:2] if name == "logits" else padded[name][1:2, :, -new:]
                scale = float(np.abs(value).max())
                assert np.abs(ours.astype(np.float32) - value).max() <= 2e-3 * scale, (case, step, name)


def test_norms_softmax_and_rotary_tables_compute_in_fp32(cases):
    """The input of every LayerNormalization, ReduceMean (RMSNorm statistics spelled out), Softmax, Cos and Sin is
    float32, every RMSNormalization computes its statistics in float32 (`stash_type`), and each graph has the ones its
    family needs."""
    needed = {
        "vision": {"LayerNormalization", "Softmax"},
        "decoder": {"RMSNormalization", "Softmax", "Cos", "Sin"},
        "projector": set(),
        "video_pool": set(),
    }
    for case, graph, path in _fp16_graphs(cases):
        types = _value_types(path)
        nodes = onnx.load(path, load_external_data=False).graph.node
        island = [node for node in nodes if node.op_type in {"LayerNormalization", "ReduceMean", "Softmax", "Cos", "Sin"}]
        norms = [node for node in nodes if node.op_type == "RMSNormalization"]
        assert needed[graph] <= {node.op_type for node in island + norms}, (case, graph)
        assert [node.name for node in island if types.get(node.input[0]) != FLOAT] == [], (case, graph)
        stash_types = {attribute.i for node in norms for attribute in node.attribute if attribute.name == "stash_type"}
        assert stash_types <= {FLOAT} and len(stash_types) == bool(norms), (case, graph)
        for node in island:
            if node.op_type == "LayerNormalization":
                assert [types.get(name) for name in node.input[1:]] == [FLOAT] * (len(node.input) - 1), (case, node.name)


def test_rotary_frequencies_stay_fp32(cases):
    """The decoders hold the rotary inverse frequencies as float32 values, not fp16-rounded ones."""
    for case, built in cases.items():
        if "decoder" in built.written:
            dim = built.kv_cache["head_dim"]
            expected = 1.0 / built.rope_theta ** (np.arange(0, dim, 2) / dim)
            initializers = onnx.load(built.written["decoder"]).graph.initializer
            fp32 = [numpy_helper.to_array(tensor) for tensor in initializers if tensor.data_type == FLOAT]
            assert any(array.shape == expected.shape and np.allclose(array, expected, rtol=1e-6) for array in fp32), case


def test_fp16_constants_within_fp16_range(cases):
    """fp16 holds the weights (all but the LayerNorms' and rotary frequencies), and every fp16 constant is finite and
    within +-65504."""
    for case, graph, path in _fp16_graphs(cases):
        model = onnx.load(path)
        tensors = [*model.graph.initializer]
        tensors += [attribute.t for node in model.graph.node if node.op_type == "Constant" for attribute in node.attribute]
        arrays = [(tensor.name, tensor.data_type, numpy_helper.to_array(tensor)) for tensor in tensors]
        fp16 = [(name, array) for name, dtype, array in arrays if dtype == FLOAT16]
        floats = sum(array.size for _, dtype, array in arrays if dtype in (FLOAT, FLOAT16))
        assert sum(array.size for _, array in fp16) >= 0.9 * floats, (case, graph)
        for name, array in fp16:
            assert np.isfinite(array).all() and np.abs(array).max(initial=0) <= 65504, (case, graph, name)


def test_export_checks_flag_an_fp16_softmax_and_an_infinite_constant():
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["p"]), helper.make_node("Add", ["p", "c"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", FLOAT16, [2, 3])],
        [helper.make_tensor_value_info("y", FLOAT16, [2, 3])],
        [numpy_helper.from_array(np.array([np.inf, 1, 2], np.float16), "c")],
    )
    broken = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])).graph
    assert lost_islands(broken) == ["Softmax(x)"]
    assert non_finite_fp16_constants(broken) == ["c"]


def test_a_failed_check_is_a_one_line_export_error(variants, tmp_path, monkeypatch):
    monkeypatch.setattr("llava_rt.export.fp16.MIN_COSINE", 1.5)  # no graph can agree that well
    model = load_model(read_checkpoint(variants["llama"].checkpoint), torch.float32)
    with pytest.raises(ExportError, match=r"^projector\.fp16\.onnx differs from PyTorch fp16 by .*; export aborted$"):
        export_fp16_graphs(model, tmp_path, ["projector"], log=lambda message: None)
