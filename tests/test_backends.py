"""onnxruntime sessions: the optimized-graph cache is written once, reused, and gives the same outputs."""

from __future__ import annotations

import shutil

import pytest

from llava_rt.runtime import Pipeline
from llava_rt.runtime.bundle import OPTIMIZED_CACHE_DIR
from llava_rt.runtime.errors import BundleError


def test_optimized_graphs_are_cached_and_reused(variants, tmp_path):
    bundle = shutil.copytree(variants["mistral"].bundle, tmp_path / "bundle")
    plain = Pipeline.load(bundle).generate(prompt="Hello there", max_new_tokens=6)
    first = Pipeline.load(bundle, cache_optimized_graphs=True)
    cached = sorted(p.name for p in (bundle / OPTIMIZED_CACHE_DIR).glob("*.onnx"))
    assert [name.split(".")[0] for name in cached] == ["decoder", "projector", "vision"]
    stamps = {p: p.stat().st_mtime_ns for p in (bundle / OPTIMIZED_CACHE_DIR).iterdir()}
    second = Pipeline.load(bundle, cache_optimized_graphs=True)
    assert {p: p.stat().st_mtime_ns for p in (bundle / OPTIMIZED_CACHE_DIR).iterdir()} == stamps  # read, not rewritten
    for pipeline in (first, second):
        result = pipeline.generate(prompt="Hello there", max_new_tokens=6)
        assert result.token_ids == plain.token_ids
    Pipeline.load(bundle)  # the cache folder does not disturb the checksum verification


def test_unwritable_cache_is_a_clear_error(variants, tmp_path):
    bundle = shutil.copytree(variants["mistral"].bundle, tmp_path / "bundle")
    (bundle / OPTIMIZED_CACHE_DIR).write_text("not a folder")
    with pytest.raises(BundleError, match="cannot create the optimized-graph cache"):
        Pipeline.load(bundle, cache_optimized_graphs=True)
    assert Pipeline.load(bundle).generate(prompt="Hi", max_new_tokens=2).token_ids  # without the cache it still loads
