"""LLaVA-NeXT-Video (spatial pooling average / max / conv): greedy ids, features and token counts vs transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_image, smooth_video

MAX_NEW_TOKENS = 10
CLIP = smooth_video(8, 48, 64, seed=5)


def user(text: str, images: int = 0, videos: int = 0) -> dict:
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


CASES = {
    "video alone": ([user("What happens in this video?", videos=1)], 0, 1),
    "image alone": ([user("What is shown in this image?", images=1)], 1, 0),
    "image and video": ([user("Compare the picture with the clip.", images=1, videos=1)], 1, 1),
    "two turns: image, then video": (
        [
            user("What is shown in this image?", images=1),
            {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
            user("And what happens in this video?", videos=1),
        ],
        1,
        1,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_ids_equal_transformers(nv_variant, case):
    messages, num_images, num_videos = CASES[case]
    images, videos = [random_image(50, 90, seed=3)] * num_images, [CLIP] * num_videos
    processor, model = nv_variant.processor, nv_variant.model
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=images or None, videos=videos or None, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    expected = output[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    expected = expected[: expected.index(eos) + 1] if eos in expected else expected
    result = nv_variant.pipeline().generate(
        messages, images=images, videos=videos, num_frames=len(CLIP), max_new_tokens=MAX_NEW_TOKENS
    )
    assert result.prompt == text
    assert result.input_tokens == inputs["input_ids"].shape[1]
    assert result.token_ids == expected
    assert len(set(expected)) > 1, "degenerate output"


def test_video_features_equal_transformers(nv_variant):
    """Vision graph, then the video_pool graph (the checkpoint's pooling), then the projector: per-frame tokens,
    frames concatenated, no newline."""
    pipeline = nv_variant.pipeline()
    request = pipeline.prepare(prompt="<video>", videos=[CLIP], num_frames=4, apply_chat_template=False)
    (ours,) = pipeline.media_features([request])
    with torch.no_grad():
        (expected,) = nv_variant.model.model.get_video_features(torch.from_numpy(request.media[0].pixels)[None]).pooler_output
    assert ours.shape == tuple(expected.shape) == (4 * 2 * 2, nv_variant.model.config.text_config.hidden_size)
    assert np.abs(ours - expected.numpy()).max() <= 1e-5
    assert pipeline.manifest["video"]["pooling"]["method"] == nv_variant.name


@pytest.mark.parametrize("frames", [1, 3, 8])
def test_video_token_count_and_pixels_equal_processor(next_video, frames):
    variant = next_video["average"]
    pipeline = variant.pipeline()
    clip = CLIP[:frames]
    inputs = variant.processor(text="<video>", videos=[clip], return_tensors="np")
    request = pipeline.prepare(prompt="<video>", videos=[clip], num_frames=frames, apply_chat_template=False)
    video_id = variant.model.config.video_token_id
    assert request.media[0].num_tokens == int((inputs["input_ids"][0] == video_id).sum())
    assert np.abs(request.media[0].pixels - inputs["pixel_values_videos"][0]).max() <= 1e-5


def test_bundle_has_the_pooling_graph(next_video):
    import onnx

    for mode, variant in next_video.items():
        manifest = variant.pipeline().manifest
        assert manifest["graphs"]["video_pool"]["variants"]["fp32"]["file"] == "video_pool.onnx"
        model = onnx.load(variant.bundle / "video_pool.onnx")
        ops = {node.op_type for node in model.graph.node}
        assert {"average": "AveragePool", "max": "MaxPool", "conv": "Conv"}[mode] in ops
        assert manifest["verification"]["max_abs_diff"]["video_pool"] <= 1e-4


def test_cli_video_file(next_video, tmp_path):
    import json

    from conftest import run, write_video

    clip = write_video(tmp_path / "clip.mp4", CLIP)
    bundle = str(next_video["conv"].bundle)
    result = run("llava_rt.runtime.cli", bundle, "--prompt", "What happens?", "--video", str(clip), "--num-frames", "4", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["prompt"] == "USER: <video>\nWhat happens? ASSISTANT:"
    assert payload["token_ids"]
