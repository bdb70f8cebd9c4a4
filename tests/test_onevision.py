"""LLaVA-OneVision (SigLIP + Qwen2): pixel values, packing, token counts and greedy ids against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, random_image, run, smooth_video, write_video
from llava_rt.runtime import InputError, Pipeline
from llava_rt.runtime.packing import image_layout
from llava_rt.runtime.video import load_video

MAX_NEW_TOKENS = 10


def user(text: str, images: int = 0, videos: int = 0) -> list[dict]:
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def reference(variant, conversations, images, videos):
    """transformers' inputs and greedy ids (images nested per prompt: its `batch_num_images` rule)."""
    processor, model = variant.processor, variant.model
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    kwargs = {}
    if any(images):
        kwargs["images"] = [row for row in images if row]
    frames = [video for row in videos for video in row]
    if frames:
        kwargs["videos"] = frames
    inputs = processor(text=texts, return_tensors="pt", padding=True, **kwargs)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    eos = model.generation_config.eos_token_id
    rows = [row[: row.index(eos) + 1] if eos in row else row for row in output[:, inputs["input_ids"].shape[1] :].tolist()]
    return rows, texts, inputs


CLIP = smooth_video(10, 48, 64, seed=4)
CASES = {
    "small image": ([user("What is shown?", images=1)], [[(30, 50)]], [[]]),
    "large image (anyres_max downsampling)": ([user("Describe the picture in detail.", images=1)], [[(300, 400)]], [[]]),
    "two images": ([user("Compare these two images.", images=2)], [[(30, 50), (90, 20)]], [[]]),
    "video frames": ([user("What happens in this video?", videos=1)], [[]], [[CLIP[::2]]]),
    "batch of two": (
        [user("What color is the car?", images=1), user("How many people are in the photo?", images=1)],
        [[(64, 40)], [(100, 250)]],
        [[], []],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_ids_equal_transformers(ov_variant, ov_pipelines, case):
    conversations, sizes, videos = CASES[case]
    images = [[random_image(h, w, seed=h + w) for h, w in row] for row in sizes]
    expected, texts, _ = reference(ov_variant, conversations, images, videos)
    pipeline = ov_pipelines[ov_variant.name]
    if len(conversations) == 1:
        num_frames = len(videos[0][0]) if videos[0] else 8
        results = [
            pipeline.generate(
                conversations[0], images=images[0], videos=videos[0], num_frames=num_frames, max_new_tokens=MAX_NEW_TOKENS
            )
        ]
    else:
        results = pipeline.generate_batch(conversations, images=images, max_new_tokens=MAX_NEW_TOKENS)
    assert [r.prompt for r in results] == texts
    assert [r.token_ids for r in results] == expected
    assert len(set(expected[0])) > 1, "degenerate output: the random model repeats one token whatever the input"


def test_large_image_is_downsampled(ov_pipelines):
    request = ov_pipelines["ov"].prepare(user("x", images=1), images=[random_image(300, 400)])
    layout = request.media[0].layout
    unpadded = (layout.rows.stop - layout.rows.start, layout.cols.stop - layout.cols.start)
    assert unpadded == (11, 15)  # 3x3 tiles of 5x5 patches, unpadded; 165 > 1.1^2 * 4 * 25 patches
    assert layout.resized == (8, 11)


def test_video_file_equals_its_frames(ov_pipelines, tmp_path):
    """A video file decoded with PyAV gives the same answer as the frames transformers' reader decodes from it."""
    from functools import partial

    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    path = write_video(tmp_path / "clip.mp4", CLIP)
    frames, _ = read_video_pyav(str(path), partial(default_sample_indices_fn, num_frames=4))
    pipeline = ov_pipelines["ov"]
    from_file = pipeline.generate(prompt="What happens?", videos=[path], num_frames=4, max_new_tokens=6)
    from_frames = pipeline.generate(prompt="What happens?", videos=[frames], num_frames=4, max_new_tokens=6)
    assert from_file.token_ids == from_frames.token_ids
    assert from_file.input_tokens == from_frames.input_tokens


def test_video_file_generation_equals_transformers(ov_variant, ov_pipelines, tmp_path):
    path = write_video(tmp_path / "clip.mp4", CLIP)
    frames = load_video(path, 5)
    expected, _, _ = reference(ov_variant, [user("What happens in this video?", videos=1)], [[]], [[frames]])
    result = ov_pipelines[ov_variant.name].generate(
        user("What happens in this video?", videos=1), videos=[path], num_frames=5, max_new_tokens=MAX_NEW_TOKENS
    )
    assert result.token_ids == expected[0]


@pytest.mark.parametrize("size", [(1, 1), (30, 50), (50, 30), (40, 40), (300, 400), (400, 90), (17, 333), (1000, 1000)])
def test_pixel_values_equal_transformers(ov_variant, ov_pipelines, size):
    image = random_image(*size, seed=7)
    processor = ov_variant.processor.image_processor
    pipeline = ov_pipelines[ov_variant.name]
    single = processor(images=[image], return_tensors="np")["pixel_values"][0]
    multi = processor(images=[[image, image]], return_tensors="np")["pixel_values"][0]
    ours_single = pipeline.media.image(image, multi_image=False).pixels
    ours_multi = pipeline.media.image(image, multi_image=True).pixels
    assert ours_single.shape == single.shape and np.abs(ours_single - single).max() <= 1e-5
    assert ours_multi.shape == multi[:1].shape and np.abs(ours_multi - multi[:1]).max() <= 1e-5


def test_packed_features_equal_transformers(ov_variant, ov_pipelines):
    """Single images (tiling, unpad, anyres_max), the multi-image rule, and pooled video features."""
    pipeline, model, processor = ov_pipelines[ov_variant.name], ov_variant.model, ov_variant.processor
    single, pair = [random_image(300, 400, seed=1)], [random_image(30, 50, seed=2), random_image(90, 20, seed=3)]
    for images, nested in ((single, single), (pair, [pair])):
        inputs = processor.image_processor(images=nested, return_tensors="pt")
        with torch.no_grad():
            expected = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
            ).pooler_output
        request = pipeline.prepare(prompt="<image>" * len(images), images=images, apply_chat_template=False)
        ours = pipeline.media_features([request])
        assert [f.shape for f in ours] == [tuple(e.shape) for e in expected]
        assert max(np.abs(a - b.numpy()).max() for a, b in zip(ours, expected)) <= 1e-5

    request = pipeline.prepare(prompt="<video>", videos=[CLIP], num_frames=4, apply_chat_template=False)
    (ours,) = pipeline.media_features([request])
    with torch.no_grad():
        (expected,) = model.model.get_video_features(torch.from_numpy(request.media[0].pixels)[None]).pooler_output
    assert ours.shape == tuple(expected.shape) == (4 * 9 + 1, model.config.text_config.hidden_size)
    assert np.abs(ours - expected.numpy()).max() <= 1e-5


@pytest.mark.parametrize("size", [(1, 1), (30, 50), (40, 40), (80, 41), (300, 400), (400, 90), (17, 333), (2000, 30)])
def test_token_counts_equal_processor_expansion(onevision, ov_pipelines, size):
    variant, pipeline = onevision["ov"], ov_pipelines["ov"]
    image_id, video_id = variant.model.config.image_token_id, variant.model.config.video_token_id
    image = random_image(*size)
    ids = variant.processor(images=[image], text="<image>", return_tensors="np")["input_ids"][0]
    assert image_layout(size, pipeline.manifest["packing"]).num_tokens == int((ids == image_id).sum())
    ids = variant.processor(images=[[image, image]], text="<image><image>", return_tensors="np")["input_ids"][0]
    request = pipeline.prepare(prompt="<image><image>", images=[image, image], apply_chat_template=False)
    assert sum(m.num_tokens for m in request.media) == int((ids == image_id).sum())
    ids = variant.processor(videos=[CLIP[:3]], text="<video>", return_tensors="np")["input_ids"][0]
    request = pipeline.prepare(prompt="<video>", videos=[CLIP[:3]], num_frames=3, apply_chat_template=False)
    assert request.media[0].num_tokens == int((ids == video_id).sum())


@pytest.mark.parametrize("clip", [CLIP, np.random.default_rng(0).integers(0, 256, (3, 90, 50, 3), dtype=np.uint8)])
def test_video_pixels_equal_transformers_video_processor(onevision, ov_pipelines, clip):
    """LlavaOnevisionVideoProcessor resizes with torchvision's uint8 antialiased kernel; ours reproduces it."""
    expected = onevision["ov"].processor.video_processor(videos=[clip], return_tensors="np")["pixel_values_videos"][0]
    ours = ov_pipelines["ov"].media.video_processor.preprocess(clip)
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-5


def test_tied_embeddings_are_stored_once(onevision):
    variant = onevision["ov-tied"]
    manifest = Pipeline.load(variant.bundle).manifest
    assert not (variant.bundle / "embed_tokens.npy").exists()
    assert manifest["arrays"]["embed_tokens"]["file"] == "decoder.onnx.data"
    table = Pipeline.load(variant.bundle).embed_tokens
    np.testing.assert_array_equal(np.asarray(table), variant.model.get_input_embeddings().weight.detach().numpy())
    assert (onevision["ov"].bundle / "embed_tokens.npy").exists()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(videos=[CLIP], num_frames=0), "num_frames must be a positive integer, got 0"),
        (dict(videos=[CLIP], num_frames=11), "cannot sample 11 frames from a video of 10 frames"),
        (dict(videos=["/no/such/video.mp4"]), "cannot read video"),
    ],
)
def test_bad_video_input(ov_pipelines, kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        ov_pipelines["ov"].generate(prompt="What happens?", **kwargs)


def test_non_video_file_and_model_without_video_token(ov_pipelines, pipelines, tmp_path):
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("this is not a video")
    with pytest.raises(InputError, match="cannot read video"):
        ov_pipelines["ov"].generate(prompt="What happens?", videos=[not_a_video])
    with pytest.raises(InputError, match="no video token"):
        pipelines["mistral"].generate(prompt="What happens?", videos=[CLIP])


def test_cli_video_errors(onevision, variants, tmp_path):
    bundle = str(onevision["ov"].bundle)
    clip = write_video(tmp_path / "clip.mp4", CLIP)
    result = run("llava_rt.runtime.cli", bundle, "--prompt", "Hi", "--video", str(clip), "--num-frames", "0")
    assert_one_line_error(result, "llava-run", "num_frames must be a positive integer")
    result = run("llava_rt.runtime.cli", bundle, "--prompt", "Hi", "--video", str(clip), "--num-frames", "99")
    assert_one_line_error(result, "llava-run", "cannot sample 99 frames from a video of 10 frames")
    not_a_video = tmp_path / "photo.mp4"
    random_image(20, 20).save(not_a_video, format="PNG")
    assert_one_line_error(
        run("llava_rt.runtime.cli", bundle, "--prompt", "Hi", "--video", str(not_a_video)), "llava-run", "cannot read video"
    )
    result = run("llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", "Hi", "--video", str(clip))
    assert_one_line_error(result, "llava-run", "has no video token")


def test_cli_video_json(onevision, tmp_path):
    import json

    clip = write_video(tmp_path / "clip.mp4", CLIP)
    result = run(
        "llava_rt.runtime.cli",
        str(onevision["ov"].bundle),
        "--prompt",
        "What happens?",
        "--video",
        str(clip),
        "--num-frames",
        "4",
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["prompt"] == "<|im_start|>user <video>\nWhat happens?<|im_end|><|im_start|>assistant\n"
    assert payload["input_tokens"] > 4 * 9


def test_embedding_lookup_does_not_copy_the_tied_table(ov_pipelines):
    """The tied table is a transposed view of the decoder's weights; a lookup must read rows, not copy it all."""
    import tracemalloc

    pipeline = ov_pipelines["ov-tied"]
    table = pipeline.embed_tokens
    assert not table.flags.c_contiguous  # the transposed view
    pipeline._embed(np.array([[5]]))  # warm up
    tracemalloc.start()
    rows = pipeline._embed(np.array([[5, 17]]))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_array_equal(rows[0], np.asarray(table)[[5, 17]])
    assert peak < table.nbytes / 10
