"""The serving benchmark end to end on a tiny bundle: every figure present and sane (no timing assertions)."""

from __future__ import annotations

import json

from llava_rt.benchmarks.serving import main


def test_serving_benchmark_reports_load_interference_and_prefix_reuse(onevision, tmp_path, capsys):
    out = tmp_path / "serve.json"
    arguments = ["--clients", "1,2", "--requests", "2", "--prompt-tokens", "24", "--new-tokens", "6"]
    arguments += ["--prefill-chunk", "8,100000", "--streams", "1,2", "--settle-s", "0.2", "--image-size", "64"]
    arguments += ["--conversations", "2", "--turns", "2", "--turn-tokens", "4", "--threads", "1", "--json", str(out)]
    assert main([str(onevision["ov"].bundle), *arguments]) == 0
    results = json.loads(out.read_text())
    assert [row["clients"] for row in results["load"]] == [1, 2]
    for row in results["load"]:
        assert row["generated_tokens"] == row["clients"] * 2 * 6  # end-of-sequence held back: every answer is full
        assert row["tokens_per_s"] > 0 and row["ttft"]["p50_ms"] > 0 and row["inter_token"]["p99_ms"] > 0
    runs = [(row["streams"], row["prefill_chunk"]) for row in results["interference"]]
    assert runs == [(1, 8), (1, 100000), (2, 8), (2, 100000)]
    assert all(row["image_prompt_tokens"] > 0 and row["image_ttft_s"] > 0 for row in results["interference"])
    reuse = results["prefix_reuse"]
    assert reuse["continuations"] == reuse["continuations_from_cache"] == 2 and reuse["reused_tokens_mean"] > 0
    printed = capsys.readouterr().out
    assert "| clients | tok/s (all clients) |" in printed and "prefix reuse: 2 of 2 continued turns" in printed
