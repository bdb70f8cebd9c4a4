"""Packed features equal to `LlavaNextModel.pack_image_features`; `<image>` counts equal the processor's expansion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from conftest import random_image
from llava_rt.runtime.packing import image_layout, pack_anyres

SIZES = [
    (1, 1),
    (5, 300),
    (300, 5),
    (32, 32),
    (40, 90),
    (90, 40),
    (64, 64),
    (100, 33),
    (17, 250),
    (333, 1000),
    (1000, 333),
    (2000, 30),
    (30, 2000),
    (720, 1280),
]


def packing_params(pipeline) -> dict:
    return pipeline.manifest["packing"]


@pytest.mark.parametrize("size", SIZES)
def test_pack_equals_transformers(variant, pipelines, size):
    """Same random tile features through both packers: exact agreement."""
    pipeline = pipelines[variant.name]
    packing = packing_params(pipeline)
    layout = image_layout(size, packing)
    hidden = variant.model.config.text_config.hidden_size
    features = torch.randn(layout.num_tiles, packing["tokens_per_tile"], hidden, generator=torch.Generator().manual_seed(0))
    newline = variant.model.model.image_newline.detach()
    with torch.no_grad():
        (expected,), lengths = variant.model.model.pack_image_features(
            [features], torch.tensor([size]), packing["select_strategy"], image_newline=newline
        )
    ours = pack_anyres(features.numpy(), layout, packing["patch_grid"], newline.numpy())
    assert ours.shape == tuple(expected.shape) == (layout.num_tokens, hidden)
    assert np.abs(ours - expected.numpy()).max() <= 1e-5


def test_packed_image_features_through_the_graphs_equal_transformers(variant, pipelines):
    """Vision graph + projector graph + numpy packing vs transformers' `get_image_features`."""
    pipeline = pipelines[variant.name]
    images = [random_image(50, 90, seed=1), random_image(120, 40, seed=2), random_image(64, 64, seed=3)]
    inputs = variant.processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = variant.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    request = pipeline.prepare(prompt="<image><image><image>", images=images, apply_chat_template=False)
    ours = pipeline.media_features([request])
    assert len(ours) == len(expected) == 3
    for mine, theirs in zip(ours, expected):
        assert mine.shape == tuple(theirs.shape)
        assert np.abs(mine - theirs.numpy()).max() <= 1e-5


def real_processor(tokenizer) -> tuple[LlavaNextProcessor, dict]:
    """llava-v1.6-mistral-7b-hf's processor settings (336px CLIP-L/14) with the tiny tokenizer."""
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    packing = {
        "tile_size": 336,
        "patch_grid": 24,
        "tokens_per_tile": 576,
        "image_grid_pinpoints": pinpoints,
        "max_num_patches": None,
        "multi_image": "anyres",
    }
    return processor, packing


@pytest.mark.parametrize("size", SIZES + [(336, 336), (337, 672), (672, 1008), (1344, 336)])
def test_image_token_count_equals_processor_expansion(variants, pipelines, size):
    """For the tiny checkpoints and for the real llava-v1.6 geometry."""
    image = random_image(*size, seed=0)
    for name, variant in variants.items():
        text = variant.processor(images=image, text="<image>", return_tensors="np")["input_ids"][0]
        expected = int((text == variant.model.config.image_token_id).sum())
        assert image_layout(size, packing_params(pipelines[name])).num_tokens == expected
    processor, packing = real_processor(variants["mistral"].processor.tokenizer)
    ids = processor(images=image, text="<image>", return_tensors="np")["input_ids"][0]
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_layout(size, packing).num_tokens == int((ids == image_token_id).sum())
