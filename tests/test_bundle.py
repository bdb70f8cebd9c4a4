"""The bundle contract: manifest, graph rules, checksums, format version, atomic export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from llava_rt.export import exporter
from llava_rt.runtime import BundleError, ExportError, Pipeline, load_bundle
from llava_rt.runtime.bundle import sha256_file


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Verified-file stamps go to a per-test directory, never to the home directory."""
    monkeypatch.setenv("LLAVA_RT_CACHE_DIR", str(tmp_path / "cache"))


def test_manifest_describes_every_file_and_graph(variant):
    manifest = load_bundle(variant.bundle).manifest
    files = {p.name for p in variant.bundle.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert sha256_file(variant.bundle / name) == entry["sha256"]
    assert set(manifest["graphs"]) == {"vision", "projector", "decoder"}
    assert manifest["tokens"]["image_token_id"] == variant.model.config.image_token_id
    assert manifest["packing"]["feature_layers"] == (
        [variant.model.config.vision_feature_layer]
        if isinstance(variant.model.config.vision_feature_layer, int)
        else list(variant.model.config.vision_feature_layer)
    )
    assert all(diff <= 1e-4 for diff in manifest["verification"]["max_abs_diff"].values())


def test_graphs_use_standard_onnx_ops_and_named_axes(variant):
    manifest = load_bundle(variant.bundle).manifest
    for name, graph in manifest["graphs"].items():
        assert list(graph["variants"]) == ["fp32"]
        entry = graph["variants"]["fp32"]
        assert (entry["precision"], entry["form"], entry["file"]) == ("fp32", "standard", f"{name}.onnx")
        model = onnx.load(variant.bundle / entry["file"])
        assert {op.domain for op in model.opset_import} <= {"", "ai.onnx"}
        assert max(op.version for op in model.opset_import) >= 17
        assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    decoder = manifest["graphs"]["decoder"]["variants"]["fp32"]
    shapes = {value["name"]: value["shape"] for value in decoder["inputs"] + decoder["outputs"]}
    assert shapes["inputs_embeds"][:2] == ["batch", "sequence"]
    assert shapes["attention_mask"] == ["batch", "total_sequence"]
    assert shapes["past_key_values.0.key"][0] == "batch" and shapes["past_key_values.0.key"][2] == "past_sequence"
    assert shapes["new_key_values.0.key"][2] == "sequence"
    assert shapes["logits"] == ["batch", variant.model.config.text_config.vocab_size]


def test_token_embedding_table_is_not_duplicated_in_the_decoder(variant):
    """The table lives once, as embed_tokens.npy; the decoder graph only holds lm_head of that size."""
    config = variant.model.config.text_config
    decoder = onnx.load(variant.bundle / "decoder.onnx")
    table_sized = [t for t in decoder.graph.initializer if sorted(t.dims) == sorted([config.vocab_size, config.hidden_size])]
    assert len(table_sized) == 1  # lm_head (untied)
    table = np.load(variant.bundle / "embed_tokens.npy")
    np.testing.assert_array_equal(table, variant.model.get_input_embeddings().weight.detach().numpy())


def copy_bundle(variant, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(variant.bundle, target)
    return target


def test_modified_file_is_refused(variants, tmp_path):
    bundle = copy_bundle(variants["mistral"], tmp_path)
    data = bytearray((bundle / "tokenizer.json").read_bytes())
    data[10] = ord("X") if data[10] != ord("X") else ord("Y")
    (bundle / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for bundle file tokenizer.json"):
        Pipeline.load(bundle)


def test_newer_format_version_is_refused(variants, tmp_path):
    bundle = copy_bundle(variants["mistral"], tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] += 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer than this llava-rt supports"):
        load_bundle(bundle)


def test_missing_file_and_missing_manifest_are_refused(variants, tmp_path):
    bundle = copy_bundle(variants["mistral"], tmp_path)
    (bundle / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="bundle file missing"):
        load_bundle(bundle)
    with pytest.raises(BundleError, match="not a llava-rt bundle"):
        load_bundle(tmp_path)


def test_failed_verification_leaves_nothing(variants, tmp_path):
    """A graph off by more than the tolerance aborts the export; no bundle, no temp dir remains."""
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        exporter.export_bundle(variants["mistral"].checkpoint, out, tolerance=0.0, log=lambda m: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_interrupted_export_leaves_nothing(variants, tmp_path, monkeypatch):
    """Ctrl-C during the last graph (after two were written) leaves neither the bundle nor its temp dir."""
    real_export = exporter.export_onnx

    def interrupted_export(module, args, path, *rest, **options):
        if path.name == "decoder.onnx":
            raise KeyboardInterrupt
        return real_export(module, args, path, *rest, **options)

    monkeypatch.setattr(exporter, "export_onnx", interrupted_export)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(KeyboardInterrupt):
        exporter.export_bundle(variants["mistral"].checkpoint, out, log=lambda m: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_export_refuses_to_overwrite_without_force(variants):
    with pytest.raises(ExportError, match="--force"):
        exporter.export_bundle(variants["mistral"].checkpoint, variants["mistral"].bundle, log=lambda m: None)


def test_large_graphs_use_external_data(variants, tmp_path, monkeypatch):
    """Above the size threshold, weights go to `<graph>.onnx.data`, checksummed and loaded like the rest."""
    from llava_rt.export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "external"
    manifest = exporter.export_bundle(variants["mistral"].checkpoint, out, log=lambda m: None)
    for name in ("vision", "projector", "decoder"):
        assert manifest["graphs"][name]["variants"]["fp32"]["external_data"] == f"{name}.onnx.data"
        assert f"{name}.onnx.data" in manifest["files"]
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ask = dict(prompt="What is shown?", images=[image], max_new_tokens=6)
    assert Pipeline.load(out).generate(**ask).token_ids == Pipeline.load(variants["mistral"].bundle).generate(**ask).token_ids


def test_full_strategy_keeps_cls_in_the_vision_graph(tmp_path):
    """`full` keeps CLS: the vision graph returns every token of the chosen layer; anyres packing then
    cannot place the CLS token (transformers cannot either), which the runtime reports as an input error."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from llava_rt.export.tiny_checkpoint import TinySpec, build_tiny_checkpoint
    from llava_rt.runtime import InputError
    from llava_rt.runtime.backends import open_session

    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", TinySpec(vision_feature_select_strategy="full", seed=3))
    manifest = exporter.export_bundle(checkpoint, tmp_path / "bundle", log=lambda m: None)
    assert manifest["packing"]["tokens_per_tile"] == 16 + 1
    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    vision = open_session(tmp_path / "bundle" / "vision.onnx")
    actual = vision.run({"pixel_values": pixels.numpy()})["image_features"]
    assert actual.shape == tuple(expected.shape) == (3, 17, 32)
    assert np.abs(actual - expected.numpy()).max() <= 1e-5
    pipeline = Pipeline.load(tmp_path / "bundle")
    with pytest.raises(InputError, match="CLS token"):
        pipeline.generate(prompt="hi", images=[np.zeros((32, 32, 3), np.uint8)])
    assert pipeline.generate(prompt="hi", max_new_tokens=2).token_ids
