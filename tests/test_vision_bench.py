"""`python -m llava_rt.benchmarks.vision` end to end on a tiny checkpoint: both sides run the same tiles, every figure
present and positive (no timing assertions), bad arguments one line each."""

from __future__ import annotations

import json

from conftest import assert_one_line_error, run
from llava_rt.benchmarks.vision import main
from llava_rt.export.tiny_checkpoint import TinyOnevisionSpec, build_tiny_onevision_checkpoint


def test_vision_bench_times_both_sides_on_the_same_tiles_per_image_size(tmp_path, capsys):
    checkpoint = build_tiny_onevision_checkpoint(tmp_path / "checkpoint", TinyOnevisionSpec(tie_word_embeddings=True))
    out = tmp_path / "vision.json"
    argv = ["--checkpoint", str(checkpoint), "--precision", "fp32", "--image-sizes", "40,80", "--repeats", "2"]
    assert main([*argv, "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [result["image_size"] for result in results] == [40, 80]
    for result in results:
        sides = result["sides"]
        assert list(sides) == ["transformers", "llava-rt fp32"]
        assert len({side["tiles"] for side in sides.values()}) == 1  # the same work on both sides
        for side in sides.values():
            assert len(side["seconds"]) == 2 and min(side["seconds"]) > 0
    assert results[0]["sides"]["transformers"]["tiles"] < results[1]["sides"]["transformers"]["tiles"]  # 2 tiles, then 5
    table = capsys.readouterr().out
    assert "| 40 px | 2 |" in table and "| 80 px | 5 |" in table and "x) |" in table


def test_bad_arguments_give_one_line_errors(tmp_path):
    result = run("llava_rt.benchmarks.vision", "--checkpoint", str(tmp_path), "--precision", "int3")
    assert_one_line_error(result, "llava-bench-vision", "--precision takes a comma-separated list")
    result = run("llava_rt.benchmarks.vision", "--checkpoint", str(tmp_path), "--image-sizes", "384,big")
    assert_one_line_error(result, "llava-bench-vision", "--image-sizes takes comma-separated positive integers")
    result = run("llava_rt.benchmarks.vision", "--checkpoint", str(tmp_path), "--layers", "2")
    assert_one_line_error(result, "llava-bench-vision", "--layers takes a positive depth and only applies to --preset")
