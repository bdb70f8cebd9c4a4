"""Limits on images and video frames: unusable or oversized input is refused with a one-line `InputError`, checked
before anything is decoded or resized; extreme aspect ratios within the limits are processed as transformers does."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import random_image, write_video
from llava_rt.runtime.errors import InputError
from llava_rt.runtime.image_processing import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, load_image
from llava_rt.runtime.media import MediaProcessor
from llava_rt.runtime.video import load_video


def _raises(fragment: str, call, *args, **kwargs) -> None:
    with pytest.raises(InputError, match=fragment) as error:
        call(*args, **kwargs)
    assert "\n" not in str(error.value)


def test_closed_and_empty_pil_images(tmp_path):
    closed = Image.new("RGB", (8, 8))
    closed.close()
    _raises("cannot read the PIL image: Operation on closed image", load_image, closed)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as unread:  # its file closes before it is loaded
        pass
    _raises("cannot read the PIL image: its file was closed", load_image, unread)
    for size in [(0, 0), (0, 5), (5, 0)]:
        _raises(r"the PIL image is empty \(\d+x\d+ pixels\)", load_image, Image.new("RGB", size))


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "truncated.png"
    random_image(200, 300).save(path)
    path.write_bytes(path.read_bytes()[:2000])  # decoding it would fail
    _raises("cannot read image", load_image, path)
    _raises(r"truncated.png is too large: 300x200 is 60000 pixels, the limit is 59999", load_image, path, 59_999)
    _raises("the PIL image is too large", load_image, Image.open(path), 59_999)
    _raises("the image array is too large", load_image, np.zeros((200, 300, 3), np.uint8), 59_999)
    assert load_image(np.zeros((200, 300, 3), np.uint8), 60_000).shape == (200, 300, 3)


def test_pillow_decompression_bomb_is_an_input_error(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (20_000, 10_000)).save(path)  # 200 Mpixels in 25 kB: over Pillow's own limit too
    assert 20_000 * 10_000 > MAX_IMAGE_PIXELS
    _raises(r"cannot read image .*bomb.png: Image size \(200000000 pixels\) exceeds limit", load_image, path)


def test_extreme_aspect_ratios_are_refused():
    long_side = MAX_ASPECT_RATIO + 1
    _raises(f"too elongated: {long_side}x1", load_image, np.zeros((1, long_side, 3), np.uint8))
    _raises(f"too elongated: 1x{long_side}", load_video, np.zeros((2, long_side, 1, 3), np.uint8), 2)


def test_video_frame_limits(tmp_path):
    _raises("each video frame is too large: 30x20 is 600 pixels", load_video, np.zeros((3, 20, 30, 3), np.uint8), 2, 599)
    clip = write_video(tmp_path / "clip.mp4", np.zeros((4, 48, 64, 3), np.uint8))
    _raises("each frame of video .*clip.mp4 is too large: 64x48", load_video, clip, 2, 1000)
    assert load_video(clip, 2, 64 * 48).shape == (2, 48, 64, 3)


def _transport_stream(path, height: int, width: int) -> bytes:
    import av

    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("mpeg2video", rate=8)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for shade in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((height, width, 3), 40 * shade, np.uint8))))
        container.mux(stream.encode())
    return path.read_bytes()


def test_frames_that_change_size_are_refused_before_conversion(tmp_path):
    """Two transport streams back to back: the frames grow from 64x48 to 128x96 mid-file."""
    clip = tmp_path / "growing.ts"
    clip.write_bytes(_transport_stream(tmp_path / "a.ts", 48, 64) + _transport_stream(tmp_path / "b.ts", 96, 128))
    _raises(r"cannot read video .*growing.ts: frame \d is 128x96, not 64x48", load_video, clip, 7)


def test_media_processor_limit(variants):
    pipeline = variants["mistral"].pipeline()
    media = MediaProcessor(pipeline.manifest, pipeline.media.image_newline, max_image_pixels=100)
    _raises(
        "the image array is too large: 10x11 is 110 pixels, the limit is 100", media.image, np.zeros((11, 10, 3), np.uint8), False
    )
    assert media.image(np.zeros((10, 10, 3), np.uint8), False).kind == "image"
    for bad in (0, -5, 2.5, True, "100"):
        _raises(
            "max_image_pixels must be a positive integer", MediaProcessor, pipeline.manifest, pipeline.media.image_newline, bad
        )


def test_pipeline_refuses_unusable_images(variants):
    pipeline = variants["mistral"].pipeline()
    closed = Image.new("RGB", (8, 8))
    closed.close()
    for image, fragment in [(closed, "closed image"), (Image.new("RGB", (0, 4)), "empty")]:
        _raises(fragment, pipeline.prepare, prompt="What is shown?", images=[image])


@pytest.mark.parametrize("size", [(1, 4000), (4000, 1), (3, 2000)], ids=["1x4000", "4000x1", "3x2000"])
def test_extreme_aspect_images_equal_transformers(variant, pipelines, size):
    """Within the limits, a 1x4000 image is tiled, unpadded and tokenized as transformers does."""
    image = random_image(*size)
    expected = variant.processor.image_processor(images=image, return_tensors="np")
    pixels, _ = pipelines[variant.name].media.image_processor.preprocess(image)
    assert pixels.shape == expected["pixel_values"][0].shape
    assert np.abs(pixels - expected["pixel_values"][0]).max() <= 1e-5
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = variant.processor.apply_chat_template(conversation, add_generation_prompt=True)
    reference_ids = variant.processor(text=[prompt], images=[image], return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(pipelines[variant.name].prepare(conversation, images=[image]).input_ids, reference_ids)
