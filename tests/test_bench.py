"""`llava-bench` end to end on a tiny checkpoint: every figure present and positive (no timing assertions)."""

from __future__ import annotations

import argparse
import json
from functools import partial

import pytest
from PIL import Image

import llava_rt.export.exporter
from conftest import _has_cuda_provider, assert_one_line_error, run
from llava_rt.benchmarks.cli import _bundle, _measure, main
from llava_rt.benchmarks.presets import PRESETS
from llava_rt.benchmarks.report import CUDA_NOTE, DRIFT_NOTES, METRICS, TENSORRT_NOTE, figure, ratios, report, summarize
from llava_rt.benchmarks.sides import bundle_choices
from llava_rt.export.staging import COMPLETE_MARK, built_once
from llava_rt.export.tiny_checkpoint import TinyOnevisionSpec, build_tiny_onevision_checkpoint
from llava_rt.runtime.bundle import FORMAT_VERSION, MANIFEST_NAME, load_bundle

STAGES = ("preprocess_ms", "vision_ms", "ttft_ms", "decode_tokens_per_s", "roofline_fraction", "peak_rss_mb")
INT8_SIDES = ("llava-rt int8", "llava-rt int8 standard")


def test_bench_runs_every_precision_and_form_and_reports_every_figure_and_drift(tmp_path, capsys):
    # a checkpoint of its own: the shared `onevision` fixture would also export and load bundles this test never uses
    checkpoint = build_tiny_onevision_checkpoint(tmp_path / "checkpoint", TinyOnevisionSpec(tie_word_embeddings=True))
    out = tmp_path / "bench.json"
    chart = tmp_path / "bench.png"
    argv = ["--checkpoint", str(checkpoint), "--precision", "int8,fp32", "--image-size", "48", "--prompt-tokens", "32"]
    argv += ["--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--workdir", str(tmp_path / "work")]
    assert main([*argv, "--build-only", "--json", str(out)]) == 0  # builds the bundle, measures nothing
    (manifest,) = (tmp_path / "work").rglob(MANIFEST_NAME)
    built = manifest.stat().st_mtime_ns
    assert not out.exists() and "| stage |" not in capsys.readouterr().out
    assert main([*argv, "--json", str(out), "--chart", str(chart)]) == 0
    assert manifest.stat().st_mtime_ns == built  # the bundle --build-only made is the one measured
    result = json.loads(out.read_text())
    assert result["config"]["device"] == "cpu" and "gpu" not in result["machine"]
    # one bundle with both precisions; int8 also in the standard (TensorRT) form, which runs other variants on the CPU
    bundle = manifest.parent
    assert bundle.name == "bundle"
    assert list(result["sides"]) == ["transformers", "llava-rt fp32", *INT8_SIDES]
    for name, side in result["sides"].items():
        for stage in STAGES:
            assert side[stage]["median"] > 0, (name, stage)
        assert side["weight_bytes_per_token"] > 0
    decoders = {"llava-rt fp32": "fp32", "llava-rt int8": "int8.ort", "llava-rt int8 standard": "int8"}
    for name, variant in decoders.items():  # each side reads its own decoder variant's weights
        assert result["sides"][name]["weight_bytes_per_token"] == load_bundle(bundle).graph_bytes("decoder", variant)
    for name in result["sides"]:
        if name != "transformers":
            assert set(result["ratios"][name]) == set(STAGES) - {"roofline_fraction"}

    drift = result["drift"]
    assert list(drift) == list(INT8_SIDES)  # the fp32 side is the reference: no drift
    default, standard = (drift[name] for name in INT8_SIDES)
    assert (default["precision"], default["form"], standard["form"]) == ("int8", None, "standard")
    assert {graph: entry["variant"] for graph, entry in default["graphs"].items()} == dict.fromkeys(default["graphs"], "int8.ort")
    assert {graph: entry["variant"] for graph, entry in standard["graphs"].items()} == dict.fromkeys(standard["graphs"], "int8")
    assert {"vision", "projector", "decoder"} <= set(default["graphs"])
    for side in (default, standard):
        for graph, entry in side["graphs"].items():
            assert 0 < entry["cosine"] <= 1 + 1e-6, (graph, entry)
        assert 0 <= side["graphs"]["decoder"]["top1_agreement"] <= 1
    assert default["graphs"]["vision"]["run"] == "onnxruntime" and standard["graphs"]["vision"]["run"] == "fake-quant"
    assert 0 <= default["pipeline"]["token_agreement"] <= 1 and default["pipeline"]["prompts"] > 0
    assert standard["pipeline"] is None  # the export measures the whole pipeline in the default form only

    assert result["machine"]["bandwidth_gb_per_s"] > 0
    assert result["config"]["input_tokens"] > 32
    printed = capsys.readouterr().out
    cpu_labels = [label for key, label, *_ in METRICS if key != "peak_device_mb"]  # device memory: on a GPU only
    assert all(label in printed for label in cpu_labels) and all(name in printed for name in INT8_SIDES)
    assert "device memory" not in printed and CUDA_NOTE not in printed
    assert "| drift from fp32 |" in printed and "fake-quant" in printed and "not measured" in printed
    assert all(note in printed for note in (TENSORRT_NOTE, *DRIFT_NOTES))
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width > 0


def _cached_bundle(root, precisions, format_version=FORMAT_VERSION):
    """A stand-in cached bundle: a manifest whose decoder has a variant of each of `precisions`."""
    variants = {precision: {"precision": precision} for precision in ("fp32", *precisions)}
    manifest = {"format_version": format_version, "graphs": {"decoder": {"variants": variants}}}
    (root / "bundle").mkdir(parents=True)
    (root / "bundle" / MANIFEST_NAME).write_text(json.dumps(manifest))
    return manifest


@pytest.mark.parametrize(
    ("cached", "format_version", "asked", "exported"),
    [
        (("int8",), FORMAT_VERSION, ["fp32", "int8"], None),
        (("fp16", "int8", "int4"), FORMAT_VERSION, ["int4"], None),
        (("int8",), FORMAT_VERSION, ["fp32", "int8", "int4"], ["fp32", "int8", "int4"]),
        (("int8",), FORMAT_VERSION - 1, ["int8"], ["int8"]),
    ],
)
def test_the_cached_bundle_is_reused_only_with_the_current_format_and_every_asked_precision(
    tmp_path, monkeypatch, cached, format_version, asked, exported
):
    manifest = _cached_bundle(tmp_path, cached, format_version)
    calls = []

    def export_bundle(checkpoint, out, precisions, force, log):
        calls.append(list(precisions))
        return {"exported": True}

    monkeypatch.setattr(llava_rt.export.exporter, "export_bundle", export_bundle)
    path, got = _bundle(tmp_path / "checkpoint", tmp_path, asked)
    assert path == tmp_path / "bundle"
    assert calls == ([] if exported is None else [exported])
    assert got == (manifest if exported is None else {"exported": True})


def test_sides_are_measured_one_in_memory_at_a_time_in_alternating_order():
    alive, events = set(), []

    class FakeSide:
        def __init__(self, name):
            self.name, self.weight_bytes_per_token = name, len(name)
            assert not alive, f"{name} loaded while {alive} still in memory"
            alive.add(name)

        def run(self, request):
            events.append(self.name)
            return request

        def __del__(self):
            alive.discard(self.name)

    sides = {name: partial(FakeSide, name) for name in ("transformers", "llava-rt fp32", "llava-rt int8")}
    measured, weight_bytes = _measure(sides, "request", argparse.Namespace(repeats=2, warmup=1))
    assert measured == dict.fromkeys(sides, ["request", "request"])
    assert weight_bytes == {name: len(name) for name in sides}
    order = [*sides, *reversed(sides)]
    assert events == [name for name in order for _ in range(2)]  # each load: one warm-up, one measured run


def test_on_cuda_each_precision_is_one_side_running_the_gpu_forms():
    variants = {key: {"precision": key.split(".")[0]} for key in ("fp32", "fp16", "int8", "int8.ort")}
    manifest = {"graphs": {graph: {"variants": variants} for graph in ("vision", "decoder")}}
    assert [choice.name for choice in bundle_choices(manifest, ["int8"])] == list(INT8_SIDES)
    cuda = bundle_choices(manifest, ["fp16", "int8"], "cuda")
    assert [(choice.name, choice.device) for choice in cuda] == [("llava-rt fp16", "cuda"), ("llava-rt int8", "cuda")]
    assert cuda[1].selection(manifest).variants == {"vision": "int8", "decoder": "int8"}  # no CPU-only kernels


def test_presets_name_the_real_architectures():
    assert {"llava-v1.6-mistral-7b", "llava-onevision-qwen2-0.5b-ov", "llava-next-video-7b"} <= set(PRESETS)
    ov = PRESETS["llava-onevision-qwen2-0.5b-ov"].spec
    assert (ov.text_hidden, ov.text_layers, ov.model_vocab_size, ov.image_size) == (896, 24, 152000, 384)


def test_bad_arguments_give_one_line_errors(tmp_path):
    for precision in ("fp64", "fp32,int3", ",", "int8 standard"):
        result = run("llava_rt.benchmarks.cli", "--checkpoint", str(tmp_path), "--precision", precision)
        assert result.returncode == 2
        assert_one_line_error(result, "llava-bench", "--precision")
    result = run("llava_rt.benchmarks.cli", "--checkpoint", str(tmp_path / "missing"))
    assert_one_line_error(result, "llava-bench", "checkpoint directory not found")
    result = run("llava_rt.benchmarks.cli", "--checkpoint", str(tmp_path), "--layers", "2")
    assert_one_line_error(result, "llava-bench", "--layers")
    result = run("llava_rt.benchmarks.cli", "--checkpoint", str(tmp_path), "--json", str(tmp_path / "missing" / "b.json"))
    assert_one_line_error(result, "llava-bench", "--json")


@pytest.mark.skipif(_has_cuda_provider(), reason="this onnxruntime has the CUDA provider")
def test_device_cuda_without_onnxruntime_gpu_is_one_line(tmp_path):
    result = run("llava_rt.benchmarks.cli", "--checkpoint", str(tmp_path), "--device", "cuda")
    assert result.returncode == 2
    assert_one_line_error(result, "llava-bench", "--device cuda needs onnxruntime's CUDAExecutionProvider")
    assert "pip install onnxruntime-gpu" in result.stderr


def test_report_on_cuda_says_how_each_side_runs_and_compares_device_memory():
    medians = {
        "transformers": {"decode_tokens_per_s": 50.0, "peak_device_mb": 2000.0},
        "llava-rt fp16": {"decode_tokens_per_s": 250.0, "peak_device_mb": 1500.0},
    }
    sides = {name: {key: summarize([value]) for key, value in entry.items()} for name, entry in medians.items()}
    result = {"config": {"device": "cuda"}, "sides": sides, "ratios": ratios(sides), "drift": {}}
    printed = report(result)
    assert CUDA_NOTE in printed and "SDPA" in CUDA_NOTE and "nvidia-smi" in CUDA_NOTE
    assert "| device memory held after the run (MiB), lower is better | 2000.0 | 1500.0 (0.75x) |" in printed
    assert "| decode (tok/s), higher is better | 50.0 | 250.0 (5.00x) |" in printed
    assert CUDA_NOTE not in report({**result, "config": {"device": "cpu"}})


class Interrupted(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("failure", [RuntimeError, Interrupted])
def test_a_failed_or_interrupted_cache_build_leaves_nothing_trusted(tmp_path, failure):
    """A cached checkpoint is built in a temporary sibling and renamed into place once complete."""
    cache = tmp_path / "cache"
    target = cache / "checkpoint"

    def half_build(directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise failure("stopped")

    with pytest.raises(failure):
        built_once(target, half_build)
    assert list(cache.iterdir()) == []

    def build(directory):
        (directory / "model.safetensors").write_bytes(b"whole")

    assert built_once(target, build) == target
    assert (target / "model.safetensors").read_bytes() == b"whole" and (target / COMPLETE_MARK).is_file()
    assert built_once(target, half_build) == target  # complete: trusted, not rebuilt
    assert sorted(p.name for p in cache.iterdir()) == ["checkpoint"]


def test_a_half_built_cache_from_an_older_version_is_rebuilt(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half")  # written in place, never marked complete
    built_once(target, lambda directory: (directory / "model.safetensors").write_bytes(b"whole"))
    assert (target / "model.safetensors").read_bytes() == b"whole"


def test_chart_labels_axes_and_annotates_ratios_with_units(tmp_path):
    medians = {
        "transformers": {"ttft_ms": 36208.9, "decode_tokens_per_s": 4.6, "roofline_fraction": 0.3},
        "llava-rt fp32": {"ttft_ms": 22204.2, "decode_tokens_per_s": 13.8, "roofline_fraction": 0.9},
    }
    sides = {name: {key: summarize([value]) for key, value in entry.items()} for name, entry in medians.items()}
    config = {"label": "tiny", "input_tokens": 100, "new_tokens": 8, "threads": 2, "repeats": 1}
    result = {"config": config, "sides": sides, "ratios": ratios(sides)}
    (axes,) = figure(result).axes
    assert axes.get_xscale() == "log" and "llava-rt / transformers" in axes.get_xlabel()
    ticks = [tick.get_text() for tick in axes.get_yticklabels()]
    assert ticks == ["time to first token (ms)\nlower is better", "decode (tok/s)\nhigher is better"]
    notes = {text.get_text() for text in axes.texts}
    assert {"0.61x (22204.2 vs 36208.9 ms)", "3.00x (13.8 vs 4.6 tok/s)"} <= notes
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["llava-rt fp32"]
    assert "tiny" in axes.get_title()
