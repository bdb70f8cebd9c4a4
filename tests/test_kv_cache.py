"""The preallocated KV cache: decode steps write one token in place and feed the same buffers, never a copy."""

from __future__ import annotations

import numpy as np
import pytest

from llava_rt.runtime.backends import TensorSpec
from llava_rt.runtime.decoding import Generator
from llava_rt.runtime.kv_cache import KVCache, new_names, past_names
from llava_rt.runtime.sampling import SearchOptions

SPEC = {"num_layers": 2, "num_kv_heads": 3, "head_dim": 4}


def _new(tokens: int, value: float) -> dict[str, np.ndarray]:
    return {name: np.full((1, 3, tokens, 4), value, np.float32) for name in new_names(SPEC)}


def test_append_writes_in_place_and_doubles_when_full():
    cache = KVCache(SPEC, 1, np.float32)
    cache.reserve(4)
    buffer = cache.buffers["past_key_values.0.key"]
    cache.append(_new(3, 1.0))
    assert cache.length == 3 and cache.buffers["past_key_values.0.key"] is buffer
    cache.append(_new(2, 2.0))  # 5 > 4: grows to twice the capacity, keeping what was cached
    assert cache.capacity == 8 and cache.length == 5
    np.testing.assert_array_equal(cache.buffers["past_key_values.1.value"][0, 0, :, 0], [1, 1, 1, 2, 2, 0, 0, 0])


def test_feeds_mask_unused_slots_and_feed_an_empty_cache_as_zero_length():
    cache = KVCache(SPEC, 1, np.float32, capacity=6)
    feeds = cache.feeds(np.zeros((1, 0), np.int64), np.ones((1, 3), np.int64))
    assert feeds["past_key_values.0.key"].shape == (1, 3, 0, 4)
    np.testing.assert_array_equal(feeds["attention_mask"], [[1, 1, 1]])
    cache.append(_new(3, 1.0))
    feeds = cache.feeds(np.array([[0, 1, 1]]), np.ones((1, 1), np.int64))
    np.testing.assert_array_equal(feeds["attention_mask"], [[0, 1, 1, 0, 0, 0, 1]])
    assert all(feeds[name] is cache.buffers[name] for name in past_names(SPEC))
    cache.truncate(1)
    feeds = cache.feeds(np.array([[1]]), np.ones((1, 1), np.int64))
    np.testing.assert_array_equal(feeds["attention_mask"], [[1, 0, 0, 0, 0, 0, 1]])


class _RecordingBinding:
    """Wraps the decoder's binding, recording the memory address of every past input bound when it runs."""

    def __init__(self, binding):
        self.binding, self.bound, self.addresses = binding, {}, []

    def input(self, name, array):
        self.bound[name] = array
        self.binding.input(name, array)

    def output(self, name, array=None):
        self.binding.output(name, array)

    def run(self):
        self.addresses.append({n: a.__array_interface__["data"][0] for n, a in self.bound.items() if n.startswith("past")})
        return self.binding.run()


class _RecordingDecoder:
    """The bundle's decoder session, its bindings recording."""

    def __init__(self, session):
        self.session, self.array_module = session, session.array_module
        self.inputs, self.outputs = session.inputs, session.outputs

    def bind(self):
        self.binding = _RecordingBinding(self.session.bind())
        return self.binding


@pytest.mark.parametrize("in_place", [False, True], ids=["masked cache", "cache written in place"])
def test_decode_steps_feed_the_cache_buffers_themselves(pipelines, in_place_pipelines, in_place):
    """After the prefill the cache has room for the whole run, so every decode step feeds the same buffers."""
    pipeline = (in_place_pipelines if in_place else pipelines)["mistral"]
    recorder = _RecordingDecoder(pipeline.sessions["decoder"])
    pipeline.sessions["decoder"] = recorder
    try:
        run = pipeline.start(prompt="Describe the picture.", max_new_tokens=8, min_new_tokens=8)
        for _ in run:
            pass
    finally:
        pipeline.sessions["decoder"] = recorder.session
    cache = run.generator.cache
    steps = recorder.binding.addresses[1:]
    assert len(steps) == 7 and cache.length == len(run.requests[0].input_ids) + 7
    buffers = {name: buffer.__array_interface__["data"][0] for name, buffer in cache.buffers.items()}
    assert all(step == buffers for step in steps)


class _EosFirstDecoder:
    """A decoder whose most likely next token is always EOS (id 0); it binds host arrays."""

    outputs = [TensorSpec(name, "float32", ()) for name in ("logits", *new_names(SPEC))]
    array_module = np

    def bind(self):
        self.feeds = {}
        return self

    def input(self, name, array):
        self.feeds[name] = array

    def output(self, name, array=None):
        pass

    def run(self):
        tokens = self.feeds["inputs_embeds"].shape[1]
        logits = np.tile(np.array([[5.0, 1.0, 2.0]], np.float32), (len(self.feeds["inputs_embeds"]), 1))
        return {"logits": logits, **{name: np.zeros((1, 3, tokens, 4), np.float32) for name in new_names(SPEC)}}


def _generate(min_new_tokens: int) -> list[int]:
    generator = Generator(
        _EosFirstDecoder(),
        lambda ids: np.zeros((*ids.shape, 2), np.float32),
        np.zeros((1, 2, 2), np.float32),
        np.ones((1, 2), np.int64),
        KVCache(SPEC, 1, np.float32),
        SearchOptions(min_new_tokens=min_new_tokens).resolve({}),
        [np.array([1, 2])],
        [0],
        max_new_tokens=6,
        max_length=100,
    )
    while not generator.is_done:
        generator.generate_next_token()
    return generator.tokens[0]


def test_min_new_tokens_holds_back_eos():
    assert _generate(0) == [0]
    assert _generate(4) == [2, 2, 2, 2, 0]
