"""Greedy token ids and logits equal to transformers `generate(do_sample=False)` on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_image
from llava_rt.runtime.kv_cache import KVCache

MAX_NEW_TOKENS = 12


def user(text: str, num_images: int = 0) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


def reference_generate(variant, conversations, images):
    """transformers' ids for a (batch of) conversation(s): generated ids per row, cut after the first EOS."""
    processor, model = variant.processor, variant.model
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    flat_images = [image for row in images for image in row] or None
    inputs = processor(images=flat_images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    eos = model.generation_config.eos_token_id
    rows = []
    for row in output[:, inputs["input_ids"].shape[1] :].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows, texts, inputs


CASES = {
    "one image": ([user("What is shown in this image?", 1)], [[(50, 90)]]),
    "two images": ([user("Compare these two images.", 2)], [[(64, 40), (30, 120)]]),
    "text only": ([user("Hello world! Explain the diagram.")], [[]]),
    "batch of three": (
        [user("What color is the car?", 1), user("How many people are in the photo?", 1), user("Read the text.", 1)],
        [[(40, 40)], [(100, 30)], [(33, 77)]],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_ids_equal_transformers(variant, pipelines, case):
    conversations, sizes = CASES[case]
    images = [[random_image(h, w, seed=h * w) for h, w in row] for row in sizes]
    expected, texts, _ = reference_generate(variant, conversations, images)
    pipeline = pipelines[variant.name]
    if len(conversations) == 1:
        results = [pipeline.generate(conversations[0], images=images[0], max_new_tokens=MAX_NEW_TOKENS)]
    else:
        results = pipeline.generate_batch(conversations, images=images, max_new_tokens=MAX_NEW_TOKENS)
    assert [r.prompt for r in results] == texts
    assert [r.token_ids for r in results] == expected
    assert all(len(ids) > 0 for ids in expected)


@pytest.mark.parametrize("case", ["two images", "batch of three"])
def test_prefill_in_short_runs_keeps_greedy_ids(variant, case):
    """A prompt fed in runs of 5 tokens (left padding spread over several runs in a batch) answers as transformers."""
    conversations, sizes = CASES[case]
    images = [[random_image(h, w, seed=h * w) for h, w in row] for row in sizes]
    expected, _, inputs = reference_generate(variant, conversations, images)
    pipeline = variant.pipeline()
    pipeline.prefill_chunk = 5
    assert inputs["input_ids"].shape[1] > 4 * pipeline.prefill_chunk
    results = pipeline.generate_batch(conversations, images=images, max_new_tokens=MAX_NEW_TOKENS)
    assert [r.token_ids for r in results] == expected


def test_prefill_logits_match_transformers(variant, pipelines):
    """The first generated token's logits from the bundle equal transformers' forward on the same prompt."""
    pipeline = pipelines[variant.name]
    image = random_image(70, 45, seed=3)
    conversation = user("Describe the picture in detail.", 1)
    _, _, inputs = reference_generate(variant, [conversation], [[image]])
    with torch.no_grad():
        expected = variant.model(**inputs).logits[0, -1].numpy()

    request = pipeline.prepare(conversation, images=[image])
    np.testing.assert_array_equal(request.input_ids, inputs["input_ids"][0].numpy())
    embeds, mask = pipeline._inputs_embeds([request], pipeline.media_features([request]))
    cache = KVCache(pipeline.manifest["graphs"]["decoder"]["kv_cache"], 1, np.float32)
    positions = np.arange(embeds.shape[1], dtype=np.int64)[None]
    outputs = pipeline.sessions["decoder"].run(
        {"inputs_embeds": embeds, "position_ids": positions, **cache.feeds(mask[:, :0], mask)}
    )
    assert np.abs(outputs["logits"][0] - expected).max() <= 1e-4


def test_min_new_tokens_equals_transformers(variant, pipelines):
    """EOS held back for `min_new_tokens` tokens, as transformers' `MinNewTokensLengthLogitsProcessor` does."""
    conversation = user("Hello world! Explain the diagram.")
    processor, model = variant.processor, variant.model
    inputs = processor(text=[processor.apply_chat_template(conversation, add_generation_prompt=True)], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS)
    expected = output[0, inputs["input_ids"].shape[1] :].tolist()
    result = pipelines[variant.name].generate(conversation, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS)
    assert result.token_ids == expected and len(expected) == MAX_NEW_TOKENS
