"""Banded uint8 resizing equals torchvision's resize bit for bit (large frames, up and down, odd sizes), crop windows
equal transformers' video center crop, and extreme aspect ratios take bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from llava_rt.runtime.resize import BICUBIC, BILINEAR, resize_uint8_antialias
from llava_rt.runtime.video import VideoProcessor

MODES = {BILINEAR: TF.InterpolationMode.BILINEAR, BICUBIC: TF.InterpolationMode.BICUBIC}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _frames(count: int, height: int, width: int) -> np.ndarray:
    """Noise over saturated 8x8 blocks: bicubic overshoots and clips at the block edges."""
    rng = np.random.default_rng(height * 7919 + width)
    blocks = rng.choice(np.array([0, 255], dtype=np.uint8), (count, height // 8 + 1, width // 8 + 1, 3))
    saturated = blocks.repeat(8, axis=1).repeat(8, axis=2)[:, :height, :width]
    noise = rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    return np.where(rng.random((count, height, width, 1)) < 0.5, saturated, noise)


def _torchvision(frames: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    batch = torch.from_numpy(frames).permute(0, 3, 1, 2)
    return TF.resize(batch, [height, width], interpolation=MODES[resample], antialias=True).permute(0, 2, 3, 1).numpy()


SIZES = {
    "1080p-shortest-edge": ((1080, 1920), (336, 597)),
    "1080p-square": ((1080, 1920), (384, 384)),
    "odd-down": ((1079, 1917), (401, 263)),
    "odd-up": ((97, 131), (1000, 1333)),
    "up-x3": ((97, 131), (291, 393)),  # aligned taps: the largest weight is 1, a lower int16 precision
    "up-one-axis": ((720, 1280), (1000, 99)),
    "one-row": ((1, 4000), (3, 336)),
}


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC], ids=["bilinear", "bicubic"])
@pytest.mark.parametrize(("src", "dst"), SIZES.values(), ids=SIZES.keys())
def test_equals_torchvision_resize(src, dst, resample):
    frames = _frames(2, *src)
    np.testing.assert_array_equal(resize_uint8_antialias(frames, *dst, resample), _torchvision(frames, *dst, resample))


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC], ids=["bilinear", "bicubic"])
def test_crop_window_is_that_part_of_the_resized_image(resample):
    """Inside the image, straddling its corners, or outside it (zeros there, as a padded crop has)."""
    frames = _frames(2, 300, 500)
    margin = 400
    padded = np.pad(_torchvision(frames, 170, 251, resample), ((0, 0), (margin, margin), (margin, margin), (0, 0)))
    windows = [(0, 0, 170, 251), (13, 57, 100, 101), (169, 250, 1, 1), (60, 0, 1, 251), (-7, 240, 30, 40), (-300, -5, 10, 10)]
    for top, left, height, width in windows:
        window = resize_uint8_antialias(frames, 170, 251, resample, crop=(top, left, height, width))
        np.testing.assert_array_equal(
            window, padded[:, margin + top : margin + top + height, margin + left : margin + left + width]
        )


def _processors(shortest_edge: int, crop: int, resample: int):
    from transformers import LlavaNextVideoVideoProcessor

    crop_size = {"height": crop, "width": crop}
    reference = LlavaNextVideoVideoProcessor(size={"shortest_edge": shortest_edge}, crop_size=crop_size, resample=resample)
    ours = VideoProcessor(
        size={"shortest_edge": shortest_edge},
        resample=resample,
        rescale_factor=1 / 255,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_center_crop=True,
        crop_size=crop_size,
    )
    return ours, reference


CROPS = {
    "margin-3": ((80, 90), 24, 24),  # resized to 24x27: transformers truncates the half margin 1.5 to 1
    "margin-7": ((90, 80), 24, 20),  # 27x24 cropped to 20: 3.5 -> 3 rows above, 2 columns left
    "crop-larger-odd": ((63, 70), 21, 24),  # resized to 21x23, padded with zeros to 24x24
    "crop-larger-even": ((40, 44), 20, 24),
    "tall-extreme": ((200, 2), 336, 336),  # resized to 33600x336 in transformers; only the crop here
    "wide-extreme": ((2, 200), 336, 336),
}


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC], ids=["bilinear", "bicubic"])
@pytest.mark.parametrize(("src", "shortest_edge", "crop"), CROPS.values(), ids=CROPS.keys())
def test_resize_and_center_crop_equal_transformers(src, shortest_edge, crop, resample):
    frames = _frames(2, *src)
    ours, reference = _processors(shortest_edge, crop, resample)
    expected = reference(videos=[frames], return_tensors="np")["pixel_values_videos"][0]
    assert np.abs(ours.preprocess(frames) - expected).max() <= 1e-5


def test_extreme_aspect_frames_take_bounded_memory():
    """1x4000 frames resized to a shortest edge of 336 are 336 x 1,344,000 before the crop: only the crop is computed."""
    frames = _frames(4, 1, 4000)
    ours, _ = _processors(336, 336, BICUBIC)
    tracemalloc.start()
    try:
        pixels = ours.preprocess(frames)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pixels.shape == (4, 3, 336, 336)
    assert peak < 64 << 20
