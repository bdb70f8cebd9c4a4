"""Continuous batching: each request's answer in a shared, changing batch equals its answer served alone."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import in_place_pipeline, random_image
from llava_rt.runtime import BundleError, InputError, QueueFull, Request, SchedulerClosed
from llava_rt.runtime.kv_cache import MIN_SLOT_CAPACITY, SlotKVCache
from llava_rt.runtime.scheduler import Scheduler

QUESTIONS = [
    dict(prompt="Tell me a story about a boat.", max_new_tokens=24),
    dict(prompt="What is shown?", images=[random_image(40, 60, seed=1)], max_new_tokens=20),
    dict(prompt="Compare them.", images=[random_image(32, 32, seed=2), random_image(70, 30, seed=3)], max_new_tokens=16),
    dict(prompt="Describe it.", images=[random_image(50, 50, seed=4)], max_new_tokens=12, temperature=0.9, seed=5),
    dict(prompt="Say something.", max_new_tokens=18, temperature=1.3, top_k=20, top_p=0.9, seed=11),
    dict(prompt="Repeat after me.", max_new_tokens=14, repetition_penalty=1.3, min_new_tokens=10),
    dict(prompt="Count.", max_new_tokens=30, stop=["a", "e"]),
]


@pytest.fixture(scope="module")
def pipeline(pipelines):
    return pipelines["mistral"]


@pytest.fixture(scope="module", params=["masked cache", "cache written in place"])
def both_decoders(request, pipelines, in_place_pipelines):
    """The pipeline with its decoder as exported, then with its attention as GroupQueryAttention (the onnxruntime
    copies' form, writing the slots' rows in place; idle rows in the batch are left as they are)."""
    return (pipelines if request.param == "masked cache" else in_place_pipelines)["mistral"]


@pytest.fixture(scope="module", params=["masked cache", "cache written in place", "int8 activations"])
def batched_decoders(request, pipelines, in_place_pipelines, variants, tmp_path_factory):
    """`both_decoders`, and the decoder of the int8 onnxruntime copy (int8 activations, quantized per token: with one
    scale per tensor a row's logits would depend on the other rows and on the prompt's chunks)."""
    if request.param == "int8 activations":
        return in_place_pipeline(variants["mistral"], tmp_path_factory.mktemp("int8"), int8_activations=True)
    return (pipelines if request.param == "masked cache" else in_place_pipelines)["mistral"]


def _alone(pipeline, question):
    return pipeline.generate(**question)


@pytest.mark.parametrize("concurrency, chunk", [(3, 5), (8, 64)])
def test_every_answer_equals_its_answer_served_alone(batched_decoders, concurrency, chunk):
    pipeline = batched_decoders
    expected = [_alone(pipeline, q) for q in QUESTIONS]
    with Scheduler(pipeline, max_concurrency=concurrency, prefill_chunk=chunk) as scheduler:
        completions = [scheduler.submit(Request.build(**q)) for q in QUESTIONS]
        results = [c.result(timeout=120) for c in completions]
        stats = scheduler.stats()
    assert stats["generated_tokens"] == sum(len(r.token_ids) for r in results)
    assert stats["running"] == stats["queued"] == 0
    for question, want, got in zip(QUESTIONS, expected, results):
        assert got.token_ids == want.token_ids, question
        assert got.text == want.text
        assert got.finish_reason == want.finish_reason
        assert got.input_tokens == want.input_tokens


def test_streamed_pieces_and_events(pipeline):
    question = QUESTIONS[1]
    expected = _alone(pipeline, question)
    with Scheduler(pipeline, max_concurrency=2) as scheduler:
        pieces = list(scheduler.submit(Request.build(**question)))
        completion = scheduler.submit(Request.build(**question))
        completion.result(timeout=60)
        events = completion.poll()
    assert "".join(pieces) == expected.text
    assert sum(e.tokens for e in events) == len(expected.token_ids)
    assert [e.finish_reason for e in events][-1] == expected.finish_reason
    assert all(e.finish_reason is None for e in events[:-1])
    assert "".join(e.text for e in events) == expected.text


def test_finish_reasons_length_and_context(pipeline):
    with Scheduler(pipeline, max_concurrency=2) as scheduler:
        short = scheduler.generate(prompt="Hello there.", max_new_tokens=3)
        words = pipeline.max_length
        while len(pipeline.tokenizer.encode("word " * words)) > pipeline.max_length - 30:
            words -= 8
        long_prompt = "word " * words
        cut = scheduler.generate(prompt=long_prompt, max_new_tokens=500)
    assert short.finish_reason == "length" and len(short.token_ids) == 3
    alone = pipeline.generate(prompt=long_prompt, max_new_tokens=500)
    assert cut.token_ids == alone.token_ids and cut.finish_reason == alone.finish_reason
    assert cut.input_tokens + len(cut.token_ids) <= pipeline.max_length


def test_a_continued_conversation_reuses_its_prefix_and_skips_the_vision(both_decoders):
    pipeline = both_decoders
    image = random_image(48, 64, seed=7)
    first_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    with Scheduler(pipeline, max_concurrency=2, prefill_chunk=16) as scheduler:
        first = scheduler.generate(first_turn, images=[image], max_new_tokens=10)
        second_turn = first_turn + [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "And the colours?"},
        ]
        misses = scheduler.feature_cache.misses
        second = scheduler.generate(second_turn, images=[image], max_new_tokens=10)
        stats = scheduler.stats()
    assert second.reused_tokens >= first.input_tokens - 1
    assert stats["prefix_cache_hits"] == 1 and stats["prefix_cache_tokens"] == second.reused_tokens
    assert scheduler.feature_cache.misses == misses  # the image lies inside the reused prefix: no vision run
    alone = pipeline.generate(second_turn, images=[image], max_new_tokens=10)
    assert second.token_ids == alone.token_ids


def test_a_shared_prefix_is_copied_from_a_busy_slot(both_decoders):
    pipeline = both_decoders
    image = random_image(48, 48, seed=9)
    system = {"role": "system", "content": "You are a careful assistant who describes pictures in detail."}

    def conversation(question):
        return [system, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    with Scheduler(pipeline, max_concurrency=2, prefill_chunk=8) as scheduler:
        running = scheduler.submit(Request.build(conversation("What is it?"), images=[image], max_new_tokens=40))
        next(iter(running))  # the first request is decoding: its slot is busy
        other = scheduler.submit(Request.build(conversation("Where is it?"), images=[image], max_new_tokens=8)).result(60)
        running.result(60)
    assert other.reused_tokens > 0
    assert other.token_ids == pipeline.generate(conversation("Where is it?"), images=[image], max_new_tokens=8).token_ids


def test_cancel_frees_the_slot_at_the_next_step(pipeline):
    with Scheduler(pipeline, max_concurrency=1, max_queue=1) as scheduler:
        long = scheduler.submit(Request.build(prompt="Go on and on.", max_new_tokens=400))
        waiting = scheduler.submit(Request.build(prompt="Short one.", max_new_tokens=4))
        with pytest.raises(QueueFull):
            scheduler.submit(Request.build(prompt="One too many.", max_new_tokens=4))
        next(iter(long))
        long.cancel()
        served = waiting.result(timeout=60)
        cancelled = long.result(timeout=60)
    assert cancelled.finish_reason == "abort" and len(cancelled.token_ids) < 400
    assert served.token_ids == pipeline.generate(prompt="Short one.", max_new_tokens=4).token_ids


def test_close_aborts_what_is_left_and_refuses_new_requests(pipeline):
    scheduler = Scheduler(pipeline, max_concurrency=1, max_queue=4).start()
    running = scheduler.submit(Request.build(prompt="Keep talking.", max_new_tokens=400))
    queued = scheduler.submit(Request.build(prompt="Later.", max_new_tokens=4))
    next(iter(running))
    scheduler.close()
    assert running.result(timeout=10).finish_reason == "abort"
    assert queued.result(timeout=10).finish_reason == "abort"
    with pytest.raises(SchedulerClosed, match="closed"):
        scheduler.submit(Request.build(prompt="After.", max_new_tokens=4))


def test_bad_options_are_input_errors_at_submit(pipeline):
    with Scheduler(pipeline) as scheduler:
        with pytest.raises(InputError, match="top_p"):
            scheduler.submit(Request.build(prompt="Hi", top_p=2.0))
        with pytest.raises(InputError, match="placeholders"):
            scheduler.submit(Request.build(prompt="<image> Hi", apply_chat_template=False))
    with pytest.raises(InputError, match="max_concurrency"):
        Scheduler(pipeline, max_concurrency=0)
    with pytest.raises(InputError, match="max_queue"):
        Scheduler(pipeline, max_queue=-1)


SPEC = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4}


def test_slot_cache_prefixes_copies_and_capacity():
    cache = SlotKVCache(SPEC, slots=3, dtype=np.float32, max_capacity=4096)
    cache.fit(10)
    assert cache.capacity == MIN_SLOT_CAPACITY
    new = {f"new_key_values.{i}.{kv}": np.full((1, 2, 5, 4), i + 1, np.float32) for i in range(2) for kv in ("key", "value")}
    cache.write([1], [0], new, np.arange(5)[None])
    assert cache.prefix_lengths(np.array([0, 1, 2, 9])).tolist() == [0, 3, 0]
    assert cache.prefix_lengths(np.array([7, 1])).tolist() == [0, 0, 0]
    cache.copy_prefix(1, 2, 4)
    assert cache.lengths.tolist() == [0, 5, 4]
    assert np.array_equal(cache.buffers["past_key_values.1.value"][2, :, :4], np.full((2, 4, 4), 2, np.float32))
    values = np.arange(3 * 8, dtype=np.float32).reshape(3, 2, 1, 4)
    step = {f"new_key_values.{i}.{kv}": values for i in range(2) for kv in ("key", "value")}
    cache.write([2, 0], [2, 0], step, np.array([[40], [41]]))
    assert np.array_equal(cache.buffers["past_key_values.0.key"][2, :, 4], step["new_key_values.0.key"][2, :, 0])
    assert np.array_equal(cache.buffers["past_key_values.0.key"][0, :, 0], step["new_key_values.0.key"][0, :, 0])
    assert cache.tokens[2].tolist() == [0, 1, 2, 3, 40] and cache.lengths.tolist() == [1, 5, 5]
    feeds, bound = cache.feeds(range(0, 2), [1], 1)
    assert bound == {}  # the new keys and values come out, and `write` copies them
    assert feeds["attention_mask"].shape == (2, MIN_SLOT_CAPACITY + 1)
    assert feeds["attention_mask"][1, :6].tolist() == [1, 1, 1, 1, 1, 0] and feeds["attention_mask"][0].sum() == 1
    cache.fit(2000)  # 256 doubled three times, in one copy
    assert cache.capacity == 2048 and cache.tokens[2].tolist() == [0, 1, 2, 3, 40]
    assert np.array_equal(cache.buffers["past_key_values.1.value"][2, :, :4], np.full((2, 4, 4), 2, np.float32))
    cache.fit(100)  # shrinks: the rows use under a quarter of it
    assert cache.capacity == MIN_SLOT_CAPACITY and cache.lengths.tolist() == [1, 5, 5]
    cache.keep(1, 2)
    assert cache.lengths[1] == 2 and cache.tokens[1].tolist() == [0, 1]


def test_a_failing_request_ends_with_its_error_and_the_others_go_on(pipeline, monkeypatch):
    def broken_vision(media, cache=None):  # fails at its second graph run
        yield
        raise BundleError("the vision graph failed")

    with Scheduler(pipeline, max_concurrency=2) as scheduler:
        text = scheduler.submit(Request.build(prompt="Keep going.", max_new_tokens=12))
        monkeypatch.setattr(pipeline, "feature_steps", broken_vision)
        failing = scheduler.submit(Request.build(prompt="What is it?", images=[random_image(40, 40)], max_new_tokens=4))
        with pytest.raises(BundleError, match="vision graph failed"):
            list(failing)
        monkeypatch.undo()
        assert failing.finish_reason == "error"
        assert text.result(timeout=60).token_ids == pipeline.generate(prompt="Keep going.", max_new_tokens=12).token_ids
        assert scheduler.generate(prompt="After.", max_new_tokens=3).finish_reason == "length"


def test_a_long_prompt_grows_the_slot_cache_once_beside_a_running_stream(both_decoders):
    """Growing copies every slot's cache and stalls every stream: a prompt reserves its room before its first chunk
    (doubling the capacity as often as it takes, in one copy), and the cache does not shrink under the part still to
    come. Afterwards a cache written in place keeps its capacity (no second copy); a masked one shrinks."""
    pipeline = both_decoders
    long_prompt = dict(prompt="stone river " * 87, max_new_tokens=3, apply_chat_template=False)
    expected = pipeline.generate(**long_prompt)
    assert expected.input_tokens > 2 * MIN_SLOT_CAPACITY
    with Scheduler(pipeline, max_concurrency=2, prefill_chunk=16) as scheduler:
        capacities = []
        fit = scheduler.cache.fit

        def spy(needed, shrink=True):  # records every capacity the cache takes
            fit(needed, shrink)
            if not capacities or capacities[-1] != scheduler.cache.capacity:
                capacities.append(scheduler.cache.capacity)

        scheduler.cache.fit = spy
        # at most 200 tokens: the stream alone never outgrows the first capacity
        stream = scheduler.submit(Request.build(prompt="Keep going.", max_new_tokens=200, min_new_tokens=200))
        next(iter(stream))
        got = scheduler.submit(Request.build(**long_prompt)).result(timeout=120)
        stream.cancel()
        scheduler.generate(prompt="Short.", max_new_tokens=2)  # a short request after them, alone
    assert got.token_ids == expected.token_ids
    assert capacities[:2] == [MIN_SLOT_CAPACITY, 4 * MIN_SLOT_CAPACITY]  # room for the answer too (up to the context)
    if scheduler.cache.in_place:  # its capacity costs no compute: kept, rather than another copy to shrink it
        assert capacities == [MIN_SLOT_CAPACITY, 4 * MIN_SLOT_CAPACITY]
    else:  # attends over its whole capacity: shrinks once the long request has ended
        assert len(capacities) >= 3 and capacities[-1] < capacities[1]


def test_decode_steps_run_over_the_busy_slots_only(pipeline):
    with Scheduler(pipeline, max_concurrency=4) as scheduler:
        batches = []
        run = scheduler._run

        def spy(feeds, bound):  # records each decode step's batch, then runs it
            if feeds["inputs_embeds"].shape[1] == 1:
                batches.append(len(feeds["inputs_embeds"]))
            return run(feeds, bound)

        scheduler._run = spy
        raw = dict(apply_chat_template=False)  # prompts sharing no prefix: no slot is chosen for its cache
        for turn in "QRS":  # alone, each in the least recently used slot: 0, 1, 2
            scheduler.generate(prompt=f"{turn} question?", max_new_tokens=4, min_new_tokens=4, **raw)
        assert set(batches) == {1}
        first = scheduler.submit(Request.build(prompt="A long answer.", max_new_tokens=60, min_new_tokens=60, **raw))
        next(iter(first))
        second = scheduler.submit(Request.build(prompt="Zero.", max_new_tokens=6, min_new_tokens=6, **raw))
        second.result(timeout=60)
        busy = [slot.index for slot in scheduler.slots if slot.completion is first]
        first.cancel()
    assert busy == [3]  # the least recently used slot, all being free
    assert max(batches) == 2  # the second request went next to the first, not to slot 0
