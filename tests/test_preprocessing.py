"""Pixel values equal to transformers' `LlavaNextImageProcessorPil` on 100+ images of every size and mode."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava_rt.runtime.errors import InputError
from llava_rt.runtime.image_processing import AnyResImageProcessor, load_image

SIZES = [  # (height, width): tiny, extreme strips, portrait, landscape, square, odd sizes
    (1, 1),
    (1, 2),
    (2, 1),
    (3, 3),
    (7, 5),
    (30, 2000),
    (2000, 30),
    (1, 500),
    (500, 1),
    (336, 336),
    (337, 335),
    (224, 224),
    (100, 100),
    (640, 480),
    (480, 640),
    (1024, 768),
    (768, 1024),
    (720, 1280),
    (1280, 720),
    (333, 1000),
    (1000, 333),
    (672, 672),
    (1008, 336),
    (336, 1008),
    (50, 51),
    (999, 17),
]
MODES = ["RGB", "L", "RGBA", "P", "P+transparency", "CMYK", "I;16", "LA", "ndarray"]
REAL_CONFIG = dict(  # llava-hf/llava-v1.6-mistral-7b-hf's preprocessor_config.json
    size={"shortest_edge": 336},
    crop_size={"height": 336, "width": 336},
    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
)


def make_image(height: int, width: int, mode: str, seed: int):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if mode == "ndarray":
        return rgb
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "P+transparency":
        image = Image.fromarray(rgb).convert("P")
        image.info["transparency"] = 0
        return image
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA")
    return Image.fromarray(rgb).convert(mode)


CASES = [(size, MODES[i % len(MODES)]) for i, size in enumerate(itertools.islice(itertools.cycle(SIZES), 108))]


@pytest.fixture(scope="module")
def processors():
    reference = LlavaNextImageProcessorPil(**REAL_CONFIG)
    ours = AnyResImageProcessor.from_manifest({**reference.to_dict(), "resample": int(reference.resample)})
    return reference, ours


def test_case_coverage():
    assert len(CASES) >= 100
    assert {mode for _, mode in CASES} == set(MODES)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_pixel_values_equal_transformers(processors, index):
    (height, width), mode = CASES[index]
    image = make_image(height, width, mode, seed=index)
    reference, ours = processors
    kwargs = {"input_data_format": "channels_last"} if mode == "ndarray" else {}
    expected = reference(images=image, return_tensors="np", **kwargs)
    pixels, size = ours.preprocess(load_image(image))
    assert size == tuple(expected["image_sizes"][0])
    assert pixels.shape == expected["pixel_values"][0].shape
    assert pixels.dtype == np.float32
    assert np.abs(pixels - expected["pixel_values"][0]).max() <= 1e-5


def test_tiny_bundle_preprocessing_equals_its_checkpoint_processor(variant, pipelines):
    """The manifest carries the checkpoint's processor parameters (here: the non-default tiny ones)."""
    for seed, (height, width) in enumerate([(10, 90), (90, 10), (64, 64), (33, 47)]):
        image = make_image(height, width, "RGB", seed)
        expected = variant.processor.image_processor(images=image, return_tensors="np")["pixel_values"][0]
        pixels, _ = pipelines[variant.name].media.image_processor.preprocess(image)
        assert np.abs(pixels - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4), dtype=np.uint8), "HxWx3 uint8"),
        (np.zeros((4, 4, 3), dtype=np.float32), "HxWx3 uint8"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "HxWx3 uint8"),
        (42, "unsupported image type"),
        ("/no/such/image.png", "not found"),
    ],
)
def test_bad_images_raise_input_error(bad, message):
    with pytest.raises(InputError, match=message):
        load_image(bad)


def test_corrupt_image_file_raises_input_error(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(InputError, match="cannot read image"):
        load_image(path)
