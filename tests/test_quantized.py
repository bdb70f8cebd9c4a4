"""Weight-only int8 / int4 decoders: exported beside the fp32 reference, drift reported, bundles generate."""

from __future__ import annotations

import onnx
import pytest

from conftest import random_image
from llava_rt.export.exporter import export_bundle
from llava_rt.runtime import ExportError, Pipeline


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, variants, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "bundle"
    manifest = export_bundle(variants["mistral"].checkpoint, out, precision=request.param, log=lambda m: None)
    return request.param, out, manifest


def test_quantized_decoder_beside_the_fp32_reference(quantized):
    precision, bundle, manifest = quantized
    decoder = manifest["graphs"]["decoder"]
    assert manifest["precision"] == precision
    assert decoder["file"] == f"decoder.{precision}.onnx" and decoder["reference"]["file"] == "decoder.onnx"
    ops = {(n.domain, n.op_type) for n in onnx.load(bundle / decoder["file"], load_external_data=False).graph.node}
    assert ("com.microsoft", "MatMulNBits") in ops
    reference_ops = {n.domain for n in onnx.load(bundle / "decoder.onnx", load_external_data=False).graph.node}
    assert reference_ops <= {"", "ai.onnx"}  # the shipped reference stays standard ONNX
    assert {decoder["file"], f"{decoder['file']}.data", "decoder.onnx"} <= set(manifest["files"])


def test_drift_and_size_are_reported(quantized):
    precision, _, manifest = quantized
    drift = manifest["verification"]["quantization"]
    assert drift["prompts"] == 8 and 0 <= drift["top1_agreement"] <= 1
    sizes = drift["decoder_bytes"]
    assert sizes[precision] < sizes["fp32"]
    if precision == "int8":
        assert drift["mean_cosine"] >= 0.99
    else:
        assert drift["mean_cosine"] > 0.9  # random weights are harsh on 4 bits; the figure is what the note reports


def test_quantized_bundle_generates(quantized, pipelines):
    precision, bundle, _ = quantized
    image = random_image(40, 60, seed=4)
    result = Pipeline.load(bundle).generate(prompt="What is shown?", images=[image], max_new_tokens=6)
    reference = pipelines["mistral"].generate(prompt="What is shown?", images=[image], max_new_tokens=6)
    assert result.input_tokens == reference.input_tokens and len(result.token_ids) >= 1
    if precision == "int8":
        assert result.token_ids[:2] == reference.token_ids[:2]


def test_precision_needs_an_fp32_export(variants, tmp_path):
    with pytest.raises(ExportError, match="--precision"):
        export_bundle(variants["mistral"].checkpoint, tmp_path / "b", dtype="fp16", precision="int4", log=lambda m: None)
    with pytest.raises(ExportError, match="--precision"):
        export_bundle(variants["mistral"].checkpoint, tmp_path / "b", precision="int2", log=lambda m: None)
    assert not (tmp_path / "b").exists()
