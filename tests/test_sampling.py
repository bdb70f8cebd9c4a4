"""Sampling equal to transformers' logits processors; seeds, stop strings, streaming and the feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import random_image
from llava_rt.runtime import InputError
from llava_rt.runtime.feature_cache import FeatureCache
from llava_rt.runtime.sampling import SearchOptions, choose_tokens, process_logits

SETTINGS = [
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_p=0.8),
    dict(min_p=0.1),
    dict(repetition_penalty=1.3),
    dict(temperature=1.3, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(temperature=0.5, top_p=0.5, repetition_penalty=0.8),
]


def transformers_processors(options: SearchOptions) -> LogitsProcessorList:
    """The list transformers' `generate` builds for these options, in its order."""
    processors = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(options.temperature))
    if options.top_k:
        processors.append(TopKLogitsWarper(options.top_k))
    if options.top_p < 1.0:
        processors.append(TopPLogitsWarper(options.top_p))
    if options.min_p is not None:
        processors.append(MinPLogitsWarper(options.min_p))
    return processors


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_processed_distributions_equal_transformers(settings):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4, 300)).astype(np.float32)
    history = rng.integers(0, 300, size=(4, 25))
    options = SearchOptions(do_sample=True, top_k=settings.get("top_k", 0), **{k: v for k, v in settings.items() if k != "top_k"})
    options = options.resolve({})
    ours = process_logits(logits, list(history), options)
    expected = transformers_processors(options)(torch.from_numpy(history), torch.from_numpy(logits.copy()))
    ours_probs = torch.softmax(torch.from_numpy(ours), dim=-1).numpy()
    expected_probs = torch.softmax(expected, dim=-1).numpy()
    assert np.abs(ours_probs - expected_probs).max() <= 1e-6
    assert np.array_equal(np.isinf(ours), np.isinf(expected.numpy()))


def test_top_k_one_equals_greedy(pipelines):
    pipeline = pipelines["mistral"]
    image = random_image(40, 60, seed=1)
    greedy = pipeline.generate(prompt="What is shown?", images=[image], max_new_tokens=8)
    sampled = pipeline.generate(prompt="What is shown?", images=[image], max_new_tokens=8, top_k=1, temperature=1.7, seed=3)
    assert sampled.token_ids == greedy.token_ids


def test_seed_reproduces_and_different_seeds_differ(pipelines):
    pipeline = pipelines["llama"]
    ask = dict(prompt="Describe the picture in detail.", max_new_tokens=12, temperature=1.5)
    first, again = pipeline.generate(seed=7, **ask), pipeline.generate(seed=7, **ask)
    assert first.token_ids == again.token_ids and first.text == again.text
    others = {tuple(pipeline.generate(seed=seed, **ask).token_ids) for seed in range(1, 6)}
    assert len(others | {tuple(first.token_ids)}) > 1


def test_stop_string_ends_the_text_before_it(pipelines):
    pipeline = pipelines["mistral"]
    full = pipeline.generate(prompt="Hello world!", max_new_tokens=16)
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = pipeline.generate(prompt="Hello world!", max_new_tokens=16, stop=[stop])
    assert cut.text == full.text[: full.text.index(stop)]
    assert len(cut.token_ids) < len(full.token_ids)
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids


def test_stream_concatenates_to_the_text(pipelines, onevision, ov_pipelines):
    """Byte-level pieces of multi-byte characters are never split: the concatenation equals the full text."""
    for pipeline in (pipelines["mistral"], ov_pipelines["ov"]):
        for seed in range(3):
            ask = dict(prompt="Hello world!", max_new_tokens=30, temperature=2.0, seed=seed)
            pieces = list(pipeline.stream(**ask))
            assert "".join(pieces) == pipeline.generate(**ask).text
            assert all("\ufffd" not in piece for piece in pieces[:-1]) or "\ufffd" in pipeline.generate(**ask).text


def test_generation_config_defaults_apply(pipelines):
    pipeline = pipelines["mistral"]
    assert pipeline.search_options().do_sample is False
    assert pipeline.search_options(temperature=0.5).do_sample is True
    assert pipeline.search_options(temperature=0.5).top_k == 50  # transformers' default when unset


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(do_sample=True, temperature=float("nan")), "temperature must be > 0"),
        (dict(temperature=-1.0), "temperature must be > 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(min_p=2.0), "min_p must be in"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(beams=4), "unknown generation option"),
    ],
)
def test_bad_search_options(pipelines, options, fragment):
    with pytest.raises(InputError, match=fragment):
        pipelines["mistral"].generate(prompt="hi", max_new_tokens=2, **options)


def test_feature_cache_skips_the_vision_graph(variants):
    pipeline = variants["mistral"].pipeline()
    calls = []
    vision = pipeline.sessions["vision"]
    pipeline.sessions["vision"] = type("Counting", (), {"run": lambda self, feeds: calls.append(1) or vision.run(feeds)})()
    cache = FeatureCache(max_mb=16)
    image = random_image(50, 70, seed=9)
    request = pipeline.prepare(prompt="What is shown?", images=[image])
    uncached = pipeline.media_features([request])
    first = pipeline.media_features([request], cache)
    second = pipeline.media_features([pipeline.prepare(prompt="Again?", images=[image.copy()])], cache)
    assert len(calls) == 2  # uncached and first; the second is a hit
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(second[0], uncached[0])
    np.testing.assert_array_equal(first[0], uncached[0])


def test_feature_cache_is_bounded_lru():
    cache = FeatureCache(max_mb=1)
    block = np.zeros((256, 512), np.float32)  # 0.5 MB
    for key in "abc":
        cache.put(key, block)
    assert cache.size_bytes <= 2**20
    assert cache.get("a") is None and cache.get("c") is not None


def test_choose_tokens_samples_only_kept_tokens():
    scores = np.full((2, 10), -np.inf, np.float32)
    scores[0, 3] = scores[1, 7] = 0.0
    options = SearchOptions(do_sample=True).resolve({})
    assert choose_tokens(scores, options, np.random.default_rng(0)).tolist() == [3, 7]


def test_incremental_detokenization_never_splits_characters(variants):
    """Byte-level BPE splits 'é', '日' or '🎉' over several tokens; no piece may hold half a character."""
    from llava_rt.runtime.detokenize import TextStream
    from llava_rt.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(variants["mistral"].bundle / "tokenizer.json")
    text = "héllo wörld, 日本語のテキスト 🎉 ok"
    ids = tokenizer.encode(text)[1:]  # without BOS
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len([p for p in pieces if p]) > 5


def test_stop_string_spanning_tokens_is_held_back(variants):
    from llava_rt.runtime.detokenize import TextStream
    from llava_rt.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(variants["mistral"].bundle / "tokenizer.json")
    ids = tokenizer.encode("The answer is yes. END of text")[1:]
    stream = TextStream(tokenizer, stop=("END",))
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    assert "".join(pieces) == "The answer is yes. " and stream.stopped


def test_a_single_stop_string_is_one_stop_string():
    """`stop="END"` means one stop string, however the options are built (not the characters E, N, D)."""
    assert SearchOptions(stop="END").resolve({}).stop == ("END",)
    assert SearchOptions(stop=["END", "##"]).resolve({}).stop == ("END", "##")
