"""`llava-bench` end to end on a tiny checkpoint: every figure present and positive (no timing assertions)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import assert_one_line_error, run
from llava_rt.benchmarks.cli import main
from llava_rt.benchmarks.presets import PRESETS
from llava_rt.benchmarks.report import METRICS, figure, ratios, summarize
from llava_rt.export.staging import COMPLETE_MARK, built_once

STAGES = ("preprocess_ms", "vision_ms", "ttft_ms", "decode_tokens_per_s", "roofline_fraction", "peak_rss_mb")


def test_bench_runs_both_sides_and_reports_every_figure(onevision, tmp_path, capsys):
    checkpoint = onevision["ov-tied"].checkpoint
    out = tmp_path / "bench.json"
    chart = tmp_path / "bench.png"
    argv = ["--checkpoint", str(checkpoint), "--precision", "fp32,int8", "--image-size", "48", "--prompt-tokens", "32"]
    argv += ["--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--workdir", str(tmp_path / "work")]
    assert main([*argv, "--json", str(out), "--chart", str(chart)]) == 0
    result = json.loads(out.read_text())
    assert set(result["sides"]) == {"transformers", "bundle-fp32", "bundle-int8"}
    for name, side in result["sides"].items():
        for stage in STAGES:
            assert side[stage]["median"] > 0, (name, stage)
        assert side["weight_bytes_per_token"] > 0
    assert result["sides"]["bundle-int8"]["weight_bytes_per_token"] < result["sides"]["bundle-fp32"]["weight_bytes_per_token"]
    for name in ("bundle-fp32", "bundle-int8"):
        assert set(result["ratios"][name]) == set(STAGES) - {"roofline_fraction"}
    assert result["machine"]["bandwidth_gb_per_s"] > 0
    assert result["config"]["input_tokens"] > 32
    table = capsys.readouterr().out
    assert all(label in table for _, label, *_ in METRICS) and "bundle-int8" in table
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.width > 0


def test_presets_name_the_real_architectures():
    assert {"llava-v1.6-mistral-7b", "llava-onevision-qwen2-0.5b-ov", "llava-next-video-7b"} <= set(PRESETS)
    ov = PRESETS["llava-onevision-qwen2-0.5b-ov"].spec
    assert (ov.text_hidden, ov.text_layers, ov.model_vocab_size, ov.image_size) == (896, 24, 152000, 384)


def test_bad_arguments_give_one_line_errors(tmp_path):
    result = run("llava_rt.benchmarks.cli", "--checkpoint", str(tmp_path), "--precision", "fp64")
    assert_one_line_error(result, "llava-bench", "--precision")
    result = run("llava_rt.benchmarks.cli", "--checkpoint", str(tmp_path / "missing"))
    assert_one_line_error(result, "llava-bench", "checkpoint directory not found")
    result = run("llava_rt.benchmarks.cli", "--checkpoint", str(tmp_path), "--layers", "2")
    assert_one_line_error(result, "llava-bench", "--layers")
    result = run("llava_rt.benchmarks.cli", "--checkpoint", str(tmp_path), "--json", str(tmp_path / "missing" / "b.json"))
    assert_one_line_error(result, "llava-bench", "--json")


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
        "bundle-fp32": {"ttft_ms": 22204.2, "decode_tokens_per_s": 13.8, "roofline_fraction": 0.9},
    }
    sides = {name: {key: summarize([value]) for key, value in entry.items()} for name, entry in medians.items()}
    config = {"label": "tiny", "input_tokens": 100, "new_tokens": 8, "threads": 2, "repeats": 1}
    result = {"config": config, "sides": sides, "ratios": ratios(sides)}
    (axes,) = figure(result).axes
    assert axes.get_xscale() == "log" and "bundle / transformers" in axes.get_xlabel()
    ticks = [tick.get_text() for tick in axes.get_yticklabels()]
    assert ticks == ["time to first token (ms)\nlower is better", "decode (tok/s)\nhigher is better"]
    notes = {text.get_text() for text in axes.texts}
    assert {"0.61x (22204.2 vs 36208.9 ms)", "3.00x (13.8 vs 4.6 tok/s)"} <= notes
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["bundle-fp32"]
    assert "tiny" in axes.get_title()
