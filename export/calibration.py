"""Images for int8 calibration, turned into vision tiles exactly as the runtime preprocesses them (anyres tiles included).

The images come from a directory (`--calibration-images DIR`) or, without one, from a small built-in set drawn in code:
gradients, smooth photo-like blobs, shapes, stripes and noise, of several sizes and aspect ratios so that anyres tiling
makes grids of several tiles. Tiles are bounded so that calibration time and memory stay bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..runtime.errors import ExportError, InputError
from ..runtime.media import MediaProcessor

MAX_TILES = 64  # calibration runs each tile through the fp32 vision graph once
MAX_TILES_PER_IMAGE = 8  # the base tile and grid tiles spread over the image, so no image dominates
DOMAIN_ADVICE = "images from your own domain (--calibration-images DIR) calibrate better"


def _gradient(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Four random corner colors blended bilinearly."""
    corners = rng.uniform(0, 255, size=(2, 2, 3))
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    top = corners[0, 0] * (1 - x) + corners[0, 1] * x
    bottom = corners[1, 0] * (1 - x) + corners[1, 1] * x
    return top * (1 - y) + bottom * y


def _blobs(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Soft colored Gaussian blobs over a gradient: smooth regions and soft edges, like a defocused photo."""
    image = _gradient(height, width, rng)
    y, x = np.arange(height)[:, None], np.arange(width)
    for _ in range(12):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.05, 0.3) * min(height, width)
        weight = (np.exp(-((y - cy) ** 2) / (2 * radius**2)) * np.exp(-((x - cx) ** 2) / (2 * radius**2)))[..., None]
        image = image * (1 - weight) + rng.uniform(0, 255, size=3) * weight
    return image + rng.normal(0, 4, size=image.shape)  # sensor-like grain


def _shapes(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Flat-colored rectangles, ellipses and lines with hard edges over a gradient."""
    canvas = Image.fromarray(np.uint8(_gradient(height, width, rng)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(20):
        x0, x1 = sorted(rng.uniform(0, width, size=2))
        y0, y1 = sorted(rng.uniform(0, height, size=2))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(1, 12)))
    return np.asarray(canvas, dtype=np.float64)


def _stripes(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Sinusoidal stripes of random angle and period per channel: fine periodic texture."""
    y, x = np.mgrid[0:height, 0:width]
    channels = []
    for _ in range(3):
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 64)
        channels.append(127.5 + 127.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period))
    return np.stack(channels, axis=-1)


def _noise(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Noise at several scales (coarse noise upsampled plus fine noise): texture without structure."""
    image = np.zeros((height, width, 3))
    for scale in (32, 8, 1):
        coarse = rng.uniform(0, 255, size=(max(1, height // scale), max(1, width // scale), 3)).astype(np.uint8)
        image += np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    return image / 3


# (drawing, height, width): landscape, portrait, square, panorama, tall, HD and small images.
BUILTIN_IMAGES = (
    (_blobs, 480, 640),
    (_shapes, 640, 480),
    (_gradient, 384, 384),
    (_stripes, 256, 1024),
    (_noise, 900, 300),
    (_blobs, 720, 1280),
    (_shapes, 1000, 1000),
    (_noise, 120, 160),
)


def builtin_images() -> list[np.ndarray]:
    """The built-in calibration images as HxWx3 uint8 arrays, the same on every call."""
    rng = np.random.default_rng(0)
    return [np.uint8(np.clip(np.rint(draw(height, width, rng)), 0, 255)) for draw, height, width in BUILTIN_IMAGES]


def image_files(directory: Path) -> list[Path]:
    """Files under `directory` (recursively, sorted) whose extension Pillow reads; `ExportError` if there are none."""
    if not directory.is_dir():
        raise ExportError(f"calibration images: {directory} is not a directory")
    extensions = Image.registered_extensions()
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in extensions and p.is_file())
    if not files:
        raise ExportError(f"calibration images: no image files in {directory}")
    return files


def _spread_tiles(pixels: np.ndarray, count: int) -> np.ndarray:
    """At most `count` of an image's tiles, evenly spread and starting with the base tile."""
    if len(pixels) <= count:
        return pixels
    return pixels[np.unique(np.round(np.linspace(0, len(pixels) - 1, count)).astype(int))]


def _collect_tiles(processor: MediaProcessor, sources: Iterator) -> tuple[list[np.ndarray], int, list[str]]:
    """Tiles of the sources in order until `MAX_TILES`; returns them, how many images gave tiles, and why others failed."""
    tiles: list[np.ndarray] = []
    used, failures = 0, []
    for source in sources:
        try:
            pixels = processor.image(source, multi_image=False).pixels
        except InputError as exc:
            failures.append(str(exc))
            continue
        tiles.extend(_spread_tiles(pixels, min(MAX_TILES_PER_IMAGE, MAX_TILES - len(tiles))))
        used += 1
        if len(tiles) >= MAX_TILES:
            break
    return tiles, used, failures


def calibration_tiles(
    manifest: dict, image_newline: np.ndarray, directory: Path | None, log: Callable[[str], None]
) -> np.ndarray:
    """Run-time vision tiles `[N, 3, H, W]` float32 (N <= `MAX_TILES`) of the images in `directory`, or of the built-in
    set when it is None, preprocessed by the bundle's own `MediaProcessor` (`manifest` is the bundle's manifest).

    A large directory is visited in a fixed shuffled order, so its tiles come from across it, not from its first files.
    Unreadable or over-limit files are skipped and counted; `ExportError` when the directory is missing, holds no image
    files or none is usable.
    """
    processor = MediaProcessor(manifest, image_newline)
    if directory is None:
        tiles, used, _ = _collect_tiles(processor, iter(builtin_images()))
        log(f"  calibrating int8 on {len(tiles)} tiles of {used} built-in synthetic images; {DOMAIN_ADVICE}")
        return np.stack(tiles)
    files = image_files(Path(directory))
    order = np.random.default_rng(0).permutation(len(files))
    tiles, used, failures = _collect_tiles(processor, (files[i] for i in order))
    if not tiles:
        raise ExportError(f"calibration images: none of the {len(files)} image files in {directory} is usable ({failures[0]})")
    skipped = f"; skipped {len(failures)} unusable image files (first: {failures[0]})" if failures else ""
    log(f"  calibrating int8 on {len(tiles)} tiles of {used} images from {directory}{skipped}")
    return np.stack(tiles)
