"""`llava-bench` end to end on a tiny checkpoint: every figure present and positive (no timing assertions)."""

from __future__ import annotations

import json

from PIL import Image

from conftest import assert_one_line_error, run
from llava_rt.benchmarks.cli import main
from llava_rt.benchmarks.presets import PRESETS
from llava_rt.benchmarks.report import METRICS

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
