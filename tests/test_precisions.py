"""A bundle with fp16, int8 and int4 variants, exported by `llava-export --precision fp16,int8,int4`: variants beside the
fp32 reference, described in the manifest as the graphs declare them, drift recorded, every variant run by the
pipeline, TensorRT's parser check. (Each kind of variant is also tested on every family by test_fp16,
test_static_int8 and test_weight_only.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from conftest import assert_one_line_error, random_image, run
from llava_rt.runtime import Pipeline
from llava_rt.runtime.bundle import sha256_file
from llava_rt.runtime.scheduler import Scheduler

PRECISIONS = ("fp16", "int8", "int4")


@pytest.fixture(scope="module")
def exported(variants, tmp_path_factory):
    """(bundle, manifest, stderr lines) of the tiny Mistral checkpoint exported with every precision."""
    out = tmp_path_factory.mktemp("precisions") / "bundle"
    checkpoint = str(variants["mistral"].checkpoint)
    done = run("llava_rt.export.cli", "--checkpoint", checkpoint, "--out", str(out), "--precision", ",".join(PRECISIONS))
    assert done.returncode == 0, done.stderr
    return out, json.loads((out / "manifest.json").read_text()), done.stderr.splitlines()


def _io(path):
    """A graph's inputs and outputs as onnx declares them: {name: (numpy dtype name, dims)}."""
    model = onnx.load(path, load_external_data=False)
    return {
        value.name: (
            onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name,
            [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim],
        )
        for value in [*model.graph.input, *model.graph.output]
    }


def test_variants_sit_beside_the_fp32_reference(exported):
    bundle, manifest, _ = exported
    graphs = manifest["graphs"]
    assert set(graphs["decoder"]["variants"]) >= {"fp32", "fp16", "int8", "int4"}
    assert set(graphs["vision"]["variants"]) == {"fp32", "fp16", "int8", "int8.ort"}
    assert set(graphs["projector"]["variants"]) == {"fp32", "fp16", "int8", "int8.ort"}
    for graph, spec in graphs.items():
        for key, entry in spec["variants"].items():
            expected = f"{graph}.onnx" if key == "fp32" else f"{graph}.{key}.onnx"
            assert entry["file"] == expected and entry["file"] in manifest["files"]
            assert sha256_file(bundle / entry["file"]) == manifest["files"][entry["file"]]["sha256"]


def test_manifest_dtypes_are_what_the_graphs_declare(exported):
    bundle, manifest, _ = exported
    for spec in manifest["graphs"].values():
        for entry in spec["variants"].values():
            declared = {t["name"]: (t["dtype"], t["shape"]) for t in [*entry["inputs"], *entry["outputs"]]}
            assert declared == _io(bundle / entry["file"]), entry["file"]


def test_fp16_graphs_take_fp16_and_return_fp32_logits(exported):
    _, manifest, _ = exported
    decoder = {t["name"]: t["dtype"] for t in manifest["graphs"]["decoder"]["variants"]["fp16"]["inputs"]}
    outputs = {t["name"]: t["dtype"] for t in manifest["graphs"]["decoder"]["variants"]["fp16"]["outputs"]}
    assert decoder["inputs_embeds"] == decoder["past_key_values.0.key"] == "float16"
    assert decoder["attention_mask"] == decoder["position_ids"] == "int64"
    assert outputs["logits"] == "float32" and outputs["new_key_values.0.key"] == "float16"


def test_drift_is_recorded_and_within_bounds(exported):
    _, manifest, lines = exported
    graphs = manifest["graphs"]
    for graph, spec in graphs.items():
        for key, entry in spec["variants"].items():
            if key != "fp32":
                assert entry["drift"]["finite"], (graph, key)
    assert graphs["decoder"]["variants"]["fp16"]["drift"]["cosine"] >= 0.999
    assert graphs["vision"]["variants"]["fp16"]["drift"]["cosine"] >= 0.9999
    assert graphs["vision"]["variants"]["int8"]["drift"]["run"] == "fake-quant"
    assert graphs["vision"]["variants"]["int8"]["drift"]["cosine"] >= 0.99
    assert graphs["vision"]["variants"]["int8.ort"]["drift"]["cosine"] >= 0.99
    assert graphs["decoder"]["variants"]["int8"]["drift"]["cosine"] >= 0.99
    pipeline = manifest["verification"]["pipeline_drift"]
    assert set(pipeline) == set(PRECISIONS)
    assert all(0 <= entry["token_agreement"] <= 1 and entry["new_tokens"] == 32 for entry in pipeline.values())
    assert any(line.startswith("  pipeline int8: ") for line in lines)
    assert any(line.startswith("  vision int8: ") and line.endswith("(fake-quant)") for line in lines)


@pytest.mark.parametrize("precision", ["fp32", *PRECISIONS])
@pytest.mark.parametrize("form", [None, "standard"])
def test_every_precision_and_form_generates(exported, precision, form):
    bundle, _, _ = exported
    pipeline = Pipeline.load(bundle, precision=precision, form=form)
    assert pipeline.selection.precision == precision
    result = pipeline.generate(prompt="What is shown?", images=[random_image(40, 60, seed=3)], max_new_tokens=4)
    assert len(result.token_ids) >= 1 and result.finish_reason in ("stop", "length")


def test_default_precision_on_the_cpu_is_int8_in_onnxruntime_form(exported):
    bundle, _, _ = exported
    selection = Pipeline.load(bundle).selection
    assert selection.precision == "int8" and selection.by_default
    assert selection.variants["vision"] == "int8.ort" and selection.variants["decoder"] == "int8.ort"


def test_a_batch_dependent_int8_decoder_is_named_by_the_scheduler(exported, caplog):
    """The int8 onnxruntime decoder is recorded as quantized per token; a bundle without that record (written before
    it, one scale per tensor) gets a warning when a scheduler batches its requests."""
    bundle, manifest, _ = exported
    assert manifest["graphs"]["decoder"]["variants"]["int8.ort"]["activation_scales"] == "per_token"
    pipeline = Pipeline.load(bundle)
    with caplog.at_level("WARNING", logger="llava_rt"):
        Scheduler(pipeline)
        assert not caplog.records
        del pipeline.manifest["graphs"]["decoder"]["variants"]["int8.ort"]["activation_scales"]
        Scheduler(pipeline)
    assert [record.getMessage().split(" ")[0] for record in caplog.records] == ["decoder.int8.ort.onnx"]
    assert "one scale per tensor" in caplog.records[0].getMessage()


def test_qdq_zero_points_of_the_standard_files_are_zero(exported):
    bundle, manifest, _ = exported
    for spec in manifest["graphs"].values():
        for entry in spec["variants"].values():
            if entry["form"] != "standard" or entry["precision"] not in ("int8", "int4"):
                continue
            model = onnx.load(bundle / entry["file"])
            values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
            nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
            assert nodes, entry["file"]
            for node in nodes:
                if len(node.input) > 2 and node.input[2]:
                    assert not np.any(values[node.input[2]]), (entry["file"], node.name)


def test_tensorrt_check_passes_except_opset_23_decoders_before_10_15(exported):
    """Every standard graph passes the check for TensorRT 10.15 and 11; for 10.3, whose parser documents opsets up to
    20, only the decoders (opset 23 by default) have findings, and the export says so in one line with the option
    that writes them for 10.3."""
    bundle, manifest, lines = exported
    results = manifest["verification"]["tensorrt"]
    assert set(results) == {"10.3", "10.15", "11"}
    assert results["10.15"]["passed"] and results["11"]["passed"], results
    flagged = {finding.split(": ", 1)[0] for finding in results["10.3"]["findings"]}
    assert flagged == {"decoder.onnx", "decoder.fp16.onnx", "decoder.int8.onnx", "decoder.int4.onnx"}
    [summary] = [line for line in lines if "TensorRT 10.3 ONNX parser" in line]
    assert "all in the opset-23 decoder graphs" in summary and "--decoder-opset 18" in summary
    assert not any(line.startswith("    decoder.") for line in lines)
    done = run("llava_rt.runtime.bundle_cli", "check", str(bundle), "--tensorrt", "--trt-version", "10.15")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every one passes" in done.stdout and "decoder int4: decoder.int4.onnx" in done.stdout
    done = run("llava_rt.runtime.bundle_cli", "check", str(bundle), "--tensorrt")
    assert done.returncode == 1 and "TensorRT 10.3 ONNX parser" in done.stdout
    assert len([line for line in done.stdout.splitlines() if line.startswith("decoder.")]) == len(results["10.3"]["findings"])


def test_tensorrt_check_fails_on_a_planted_operator(exported, tmp_path):
    bundle, _, _ = exported
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    model = onnx.load(copy / "projector.onnx")
    first = model.graph.node[0]
    model.graph.node.insert(1, onnx.helper.make_node("Unique", [first.output[0]], ["unique_out"], name="planted_unique"))
    onnx.save(model, copy / "projector.onnx")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["projector.onnx"] = {
        "sha256": sha256_file(copy / "projector.onnx"),
        "bytes": (copy / "projector.onnx").stat().st_size,
    }
    (copy / "manifest.json").write_text(json.dumps(manifest))
    done = run("llava_rt.runtime.bundle_cli", "check", str(copy), "--tensorrt", "--trt-version", "10.3")
    assert done.returncode == 1
    assert "projector.onnx: node planted_unique (Unique)" in done.stdout


def test_run_says_which_variants_it_runs(exported):
    bundle, _, _ = exported
    done = run("llava_rt.runtime.cli", str(bundle), "--prompt", "hi", "--max-new-tokens", "2", "--precision", "int4")
    assert done.returncode == 0, done.stderr
    assert "llava-run: precision int4 (as asked): vision fp32, projector fp32, decoder int4.ort" in done.stderr


def test_run_refuses_a_precision_the_bundle_lacks(variants):
    result = run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", "hi", "--precision", "int8")
    assert result.returncode == 2
    assert_one_line_error(result, "llava-run", "this bundle has no int8 variant (it has fp32)")
