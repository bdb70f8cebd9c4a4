"""Chat sessions: KV reuse across turns gives the same answers as generating from the whole conversation."""

from __future__ import annotations

import pytest

from conftest import random_image
from llava_rt.runtime import ChatSession, InputError

TURNS = [
    ("What is shown in this image?", [random_image(50, 80, seed=1)]),
    ("Explain the diagram step by step.", []),
    ("Compare it with this picture.", [random_image(90, 40, seed=2)]),
]


@pytest.mark.parametrize("name", ["mistral", "llama"])
def test_three_turns_equal_generation_from_scratch(variants, pipelines, name):
    pipeline, processor = pipelines[name], variants[name].processor
    session = ChatSession(pipeline, feature_cache_mb=64)
    for turn, (text, images) in enumerate(TURNS):
        result = session.send(text, images=images, max_new_tokens=8)
        conversation = session.messages[:-1]  # what was asked, before the answer was appended
        scratch = pipeline.generate(conversation, max_new_tokens=8)
        assert result.token_ids == scratch.token_ids, f"turn {turn + 1}"
        assert result.prompt == scratch.prompt == processor.apply_chat_template(conversation, add_generation_prompt=True)
        if turn:
            assert result.reused_tokens > 0, "the earlier turns' KV cache was not reused"
            assert result.reused_tokens < result.input_tokens
    assert session.feature_cache.hits >= 1  # turn 3 renders turn 1's image again


def test_kv_reuse_prefills_only_the_new_tokens(pipelines):
    pipeline = pipelines["mistral"]
    reused, fresh = ChatSession(pipeline), ChatSession(pipeline, reuse_kv_cache=False)
    for text, images in TURNS:
        a = reused.send(text, images=images, max_new_tokens=6)
        b = fresh.send(text, images=images, max_new_tokens=6)
        assert a.token_ids == b.token_ids
    assert a.reused_tokens > a.input_tokens // 2 and b.reused_tokens == 0


def test_session_stream_system_prompt_and_reset(pipelines):
    session = ChatSession(pipelines["llama"], system="You are brief.")
    pieces = list(session.stream("Hello world!", max_new_tokens=6))
    assert "".join(pieces) == session.messages[-1]["content"][0]["text"] == session.last_result.text
    assert session.messages[0]["role"] == "system" and len(session.messages) == 3
    session.reset()
    assert [m["role"] for m in session.messages] == ["system"]


def test_bad_turn_leaves_the_conversation_unchanged(pipelines):
    session = ChatSession(pipelines["mistral"])
    with pytest.raises(InputError):
        session.send("hi", images=["/no/such/image.png"])
    with pytest.raises(InputError):
        session.send("hi", temperature=-1.0)
    assert session.messages == []
