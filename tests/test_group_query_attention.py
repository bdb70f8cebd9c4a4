"""The onnxruntime copy of the decoder (`export/group_query_attention.py`): attention as GroupQueryAttention writing
the KV cache in place. Its structure, and its tokens against transformers through `Pipeline` (one request, several
images, a left-padded batch, a sliding window shorter than the prompt) and a continued chat; the `Scheduler` with it
is tested in test_scheduler, the quantized copies in test_weight_only."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_generation_parity import CASES, reference_generate

from conftest import random_image
from llava_rt.export.group_query_attention import UnsupportedDecoder, rewrite_attention
from llava_rt.runtime.chat_session import ChatSession
from llava_rt.runtime.kv_cache import IN_PLACE_INPUTS, SlotKVCache, in_place_feeds, past_names, present_names

MAX_NEW_TOKENS = 12


def _manifest(variant):
    return json.loads((variant.bundle / "manifest.json").read_text())


def test_each_layer_is_one_group_query_attention_over_the_bound_cache(variants, in_place_pipelines):
    for name, variant in variants.items():
        manifest = _manifest(variant)
        kv_cache = manifest["graphs"]["decoder"]["kv_cache"]
        session = in_place_pipelines[name].sessions["decoder"]
        inputs, outputs = [t.name for t in session.inputs], [t.name for t in session.outputs]
        assert inputs == ["inputs_embeds", "position_ids", *past_names(kv_cache), *IN_PLACE_INPUTS]
        assert outputs == ["logits", *present_names(kv_cache)]
        source = onnx.load(variant.bundle / "decoder.onnx", load_external_data=False)
        graph = rewrite_attention(source, kv_cache, manifest["text"]["sliding_windows"]).graph
        attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
        assert len(attention) == kv_cache["num_layers"]
        assert not [node for node in graph.node if node.op_type in ("Softmax", "CumSum")]
        windows = {next(a.i for a in node.attribute if a.name == "local_window_size") for node in attention}
        window = manifest["text"]["sliding_windows"][0]
        assert windows == {window or -1}, name


def test_a_rewritten_or_unfused_decoder_is_refused(variants):
    manifest = _manifest(variants["llama"])
    kv_cache, windows = manifest["graphs"]["decoder"]["kv_cache"], manifest["text"]["sliding_windows"]
    model = rewrite_attention(onnx.load(variants["llama"].bundle / "decoder.onnx", load_external_data=False), kv_cache, windows)
    with pytest.raises(UnsupportedDecoder, match="no attention_mask input"):
        rewrite_attention(model, kv_cache, windows)
    model = onnx.load(variants["llama"].bundle / "decoder.onnx", load_external_data=False)
    for node in model.graph.node:  # as an opset-18 decoder has it: no RotaryEmbedding node
        if node.op_type == "RotaryEmbedding":
            node.op_type = "Identity"
    with pytest.raises(UnsupportedDecoder, match="RotaryEmbedding"):
        rewrite_attention(model, kv_cache, windows)


@pytest.mark.parametrize("case", ["one image", "two images", "batch of three"])
def test_greedy_ids_equal_transformers(variant, in_place_pipelines, case):
    conversations, sizes = CASES[case]
    images = [[random_image(h, w, seed=h * w) for h, w in row] for row in sizes]
    expected, _, inputs = reference_generate(variant, conversations, images)
    if variant.name == "mistral":
        assert inputs["input_ids"].shape[1] > _manifest(variant)["text"]["sliding_windows"][0]  # the window is used
    pipeline = in_place_pipelines[variant.name]
    if len(conversations) == 1:
        results = [pipeline.generate(conversations[0], images=images[0], max_new_tokens=MAX_NEW_TOKENS)]
    else:  # left-padded: each row is prefilled alone, the cache holds no padding
        results = pipeline.generate_batch(conversations, images=images, max_new_tokens=MAX_NEW_TOKENS)
    assert [r.token_ids for r in results] == expected


def test_a_continued_chat_reuses_the_cache_written_in_place(pipelines, in_place_pipelines):
    image = random_image(48, 64, seed=7)
    answers = []
    for pipeline in (pipelines["llama"], in_place_pipelines["llama"]):
        chat = ChatSession(pipeline)
        first = chat.send("What is this?", images=[image], max_new_tokens=8)
        second = chat.send("And the colours?", max_new_tokens=8)
        assert second.reused_tokens >= first.input_tokens
        answers.append((first.token_ids, second.token_ids))
    assert answers[0] == answers[1]


def test_in_place_feeds_leave_idle_rows_as_they_are():
    feeds = in_place_feeds(np.array([5, 0, 9]), np.array([1, 0, 0]))
    assert feeds["seqlens_k"].tolist() == [5, 0, 0] and feeds["query_seqlens"].tolist() == [1, 0, 0]
    assert feeds["total_sequence_length"] == 6 and feeds["seqlens_k"].dtype == np.int32
    spec = {"num_layers": 1, "num_kv_heads": 2, "head_dim": 4}
    cache = SlotKVCache(spec, 3, np.float32, max_capacity=512, in_place=True)
    cache.fit(300)
    inputs, presents = cache.feeds(range(1, 3), [2], 4)
    assert inputs["query_seqlens"].tolist() == [0, 4] and inputs["seqlens_k"].tolist() == [0, 3]
    for past, present in zip(past_names(spec), present_names(spec)):
        assert presents[present] is inputs[past] and np.shares_memory(inputs[past], cache.buffers[past])
    cache.write([2], [1], {}, np.arange(4)[None])
    assert cache.lengths.tolist() == [0, 0, 4]
