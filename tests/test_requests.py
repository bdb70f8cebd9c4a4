"""One validated `Request` behind every entry point; finish reasons; the context cap; threads; chat turns."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from conftest import random_image
from llava_rt.runtime import ChatSession, InputError, Request, SearchOptions
from llava_rt.runtime.feature_cache import FeatureCache


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed="abc"), "seed must be an integer"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(top_p="0.5"), "top_p must be a number"),
        (dict(min_p=[0.1]), "min_p must be a number"),
        (dict(repetition_penalty="1.1"), "repetition_penalty must be a number"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(do_sample="yes"), "do_sample must be True or False"),
        (dict(stop=5), "stop must be a non-empty string"),
        (dict(stop=["ok", ""]), "stop must be a non-empty string"),
        (dict(search="greedy"), "search must be a SearchOptions"),
        (dict(search=SearchOptions(), temperature=0.5), "give search= or search keywords, not both"),
        (dict(beams=4), "unknown generation option(s): beams"),
        (dict(max_new_tokens=True), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be a positive integer"),
        (dict(num_frames="8"), "num_frames must be a positive integer"),
        (dict(images="cat.png"), "images must be a list of images"),
        (dict(apply_chat_template="no"), "apply_chat_template must be True or False"),
    ],
)
def test_bad_request_fields_are_input_errors_everywhere(pipelines, kwargs, fragment):
    pipeline = pipelines["mistral"]
    request = {"prompt": "hi", **kwargs}
    for entry in (pipeline.generate, pipeline.stream, pipeline.start, pipeline.prepare):
        with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            entry(**request)  # stream and start raise here, before any iteration
    batch_kwargs = {k: [v] if k == "images" else v for k, v in kwargs.items()}  # a batch takes one image list per row
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        pipeline.generate_batch([[{"role": "user", "content": "hi"}]], **batch_kwargs)
    with pytest.raises(InputError):
        ChatSession(pipeline).stream("hi", **kwargs)


def test_a_request_object_is_accepted_and_is_the_same_as_keywords(pipelines):
    pipeline = pipelines["llama"]
    request = Request(prompt="Describe it.", images=[random_image(40, 60)], max_new_tokens=5)
    assert pipeline.generate(request).token_ids == pipeline.generate(**request.__dict__).token_ids
    with pytest.raises(InputError, match="not both"):
        pipeline.generate(request, max_new_tokens=3)


def test_temperature_zero_is_greedy(pipelines):
    pipeline = pipelines["mistral"]
    assert pipeline.search_options(temperature=0).do_sample is False
    assert pipeline.search_options(temperature=0.0, do_sample=True).do_sample is False
    greedy = pipeline.generate(prompt="Tell me.", max_new_tokens=6)
    assert pipeline.generate(prompt="Tell me.", max_new_tokens=6, temperature=0).token_ids == greedy.token_ids


def test_finish_reasons(pipelines):
    pipeline = pipelines["mistral"]
    long = pipeline.generate(prompt="Count.", max_new_tokens=4, min_new_tokens=4)
    assert long.finish_reason == "length" and len(long.token_ids) == 4
    free = pipeline.generate(prompt="Count.", max_new_tokens=4)
    stop = free.text[1:3]  # a stop string inside the answer ends it
    assert stop, free.text
    stopped = pipeline.generate(prompt="Count.", max_new_tokens=4, stop=stop)
    assert stopped.finish_reason == "stop" and len(stopped.text) < len(free.text)


def test_max_new_tokens_is_capped_at_the_context(pipelines, caplog):
    """1e9 new tokens must neither allocate a 1e9-token KV cache nor run past the model's context."""
    pipeline = pipelines["mistral"]
    context = pipeline.max_length
    with caplog.at_level(logging.WARNING, logger="llava_rt"):
        run = pipeline.start(prompt="Go on.", max_new_tokens=10**9, min_new_tokens=10**9)
        for _ in run:
            pass
    result = run.results[0]
    assert result.finish_reason == "length"
    assert result.input_tokens + len(result.token_ids) == context
    assert run.generator.cache.capacity <= context
    assert any("context of" in record.getMessage() for record in caplog.records)


def test_a_prompt_filling_the_context_is_refused(pipelines):
    pipeline = pipelines["mistral"]
    with pytest.raises(InputError, match="leaves no room to answer"):
        pipeline.generate(prompt="a " * pipeline.max_length)


def test_four_threads_on_one_pipeline_get_the_sequential_answers(pipelines):
    pipeline = pipelines["llama"]
    requests = [dict(prompt=f"Question {i}?", images=[random_image(30 + 10 * i, 50, seed=i)], max_new_tokens=6) for i in range(4)]
    sequential = [pipeline.generate(**r).token_ids for r in requests]
    answers: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(2):
                answers[i] = pipeline.generate(**requests[i]).token_ids
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and [answers[i] for i in range(4)] == sequential


def test_feature_cache_keeps_its_accounting_under_threads():
    cache = FeatureCache(max_mb=1)
    chunk = np.zeros(64 * 1024 // 4, dtype=np.float32)  # 64 KiB: 16 fit

    def work(offset: int) -> None:
        for i in range(300):
            key = f"{(offset + i) % 40}"
            if cache.get(key) is None:
                cache.put(key, chunk)

    threads = [threading.Thread(target=work, args=(i * 7,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.size_bytes == len(cache._entries) * chunk.nbytes <= cache.max_bytes
    assert cache.hits + cache.misses == 1200


def _roles(session: ChatSession) -> list[str]:
    return [m["role"] for m in session.messages]


def test_an_abandoned_stream_leaves_the_conversation_unchanged(pipelines):
    pipeline = pipelines["mistral"]
    session = ChatSession(pipeline)
    session.send("Hello there.", max_new_tokens=4)
    turn = session.stream("Tell me more.", max_new_tokens=8, min_new_tokens=8)
    next(turn)  # the caller reads one piece, then walks away
    del turn
    assert _roles(session) == ["user", "assistant"]
    again = session.send("Something else.", max_new_tokens=5)
    assert _roles(session) == ["user", "assistant", "user", "assistant"]
    assert again.token_ids == pipeline.generate(session.messages[:-1], max_new_tokens=5).token_ids


def test_an_interrupted_turn_is_kept_with_its_partial_answer(pipelines):
    """Ctrl-C reaches the caller's loop: closing the turn records it (finish reason "abort"), and the
    conversation goes on with alternating turns whose answers equal a fresh generation."""
    pipeline = pipelines["llama"]
    session = ChatSession(pipeline)
    turn = session.stream("Write a long story.", images=[random_image(40, 40)], max_new_tokens=50, min_new_tokens=50)
    with pytest.raises(KeyboardInterrupt):
        for count, _ in enumerate(turn):
            if count == 3:
                raise KeyboardInterrupt
    turn.close()
    assert turn.result.finish_reason == "abort" and 0 < len(turn.result.token_ids) < 50
    assert _roles(session) == ["user", "assistant"]
    assert session.messages[1]["content"][0]["text"] == turn.result.text
    follow_up = session.send("Shorter, please.", max_new_tokens=6)
    assert _roles(session) == ["user", "assistant", "user", "assistant"]
    assert follow_up.reused_tokens > 0
    assert follow_up.token_ids == pipeline.generate(session.messages[:-1], max_new_tokens=6).token_ids


def test_a_turn_failing_validation_leaves_no_user_message(pipelines):
    session = ChatSession(pipelines["mistral"])
    for bad in (dict(images=["/no/such.png"]), dict(seed="x"), dict(max_new_tokens=0)):
        with pytest.raises(InputError):
            session.send("hi", **bad)
    assert session.messages == []


def test_too_many_frames_for_the_context_are_refused_before_decoding(ov_pipelines):
    """Frames beyond what the context can hold would be decoded at full size for nothing."""
    pipeline = ov_pipelines["ov"]
    frames = pipeline.max_length // pipeline.manifest["video"]["tokens_per_frame"] + 1
    video = np.zeros((1, 8, 8, 3), dtype=np.uint8)  # one frame: sampling it `frames` times would fail later
    with pytest.raises(InputError, match=f"of {frames} frames make .* more than the model's context"):
        pipeline.prepare(prompt="What happens?", videos=[video], num_frames=frames)
