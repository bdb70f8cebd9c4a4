"""Image loading and anyres preprocessing equal to transformers' `LlavaNextImageProcessorPil` (Pillow + numpy)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError, MediaTooLarge
from .packing import select_best_resolution

ImageInput = Union[str, Path, Image.Image, np.ndarray]

MAX_IMAGE_PIXELS = 1 << 26  # default limit on each image and each video frame: 64 Mi pixels, 8192 x 8192
MAX_ASPECT_RATIO = 10_000  # longer side over shorter side; bounds the work of resizing to a shortest edge


def check_image_size(height: int, width: int, max_pixels: int, what: str) -> None:
    """Refuse an empty image, one over `max_pixels` pixels or one longer than `MAX_ASPECT_RATIO` times its width (or the
    reverse), before it is decoded or resized. `what` names it in the message."""
    if height < 1 or width < 1:
        raise InputError(f"{what} is empty ({width}x{height} pixels)")
    if height * width > max_pixels:
        raise MediaTooLarge(f"{what} is too large: {width}x{height} is {height * width} pixels, the limit is {max_pixels}")
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise InputError(f"{what} is too elongated: {width}x{height}, the limit is {MAX_ASPECT_RATIO}:1")


def _load_pil(image: Image.Image, max_pixels: int, what: str) -> Image.Image:
    """Check the size of a Pillow image, then decode it (a file opened lazily is read only now)."""
    check_image_size(image.height, image.width, max_pixels, what)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, AssertionError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read {what}: {str(exc) or 'its file was closed before it was loaded'}") from None
    except AttributeError:  # Pillow before 11 on an image whose file was closed
        raise InputError(f"cannot read {what}: its file was closed before it was loaded") from None
    return image


def load_image(image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image | np.ndarray:
    """Open a path as a Pillow image; pass Pillow images and HxWx3 uint8 arrays through. Each is within
    `check_image_size`'s limits, checked before it is decoded (Pillow's own decompression-bomb limit also applies to
    files). Raises `InputError`."""
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        raise InputError(f"image URLs are not fetched; download the image and pass its path: {image}")
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                return _load_pil(opened, max_pixels, f"image {image}")
        except FileNotFoundError:
            raise InputError(f"image file not found: {image}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"cannot read image {image}: {exc}") from None
    if isinstance(image, Image.Image):
        return _load_pil(image, max_pixels, "the PIL image")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
            raise InputError(f"image arrays must be HxWx3 uint8, got shape {image.shape} and dtype {image.dtype}")
        check_image_size(*image.shape[:2], max_pixels, "the image array")
        return image
    raise InputError(f"unsupported image type {type(image).__name__} (use a path, a PIL image or an HxWx3 uint8 array)")


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 uint8, compositing transparency onto white exactly as transformers' `convert_to_rgb` does."""
    if isinstance(image, np.ndarray):
        return image
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def _resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Pillow resize of an HxWx3 uint8 array (Pillow returns a copy when the size is unchanged)."""
    return np.array(Image.fromarray(image).resize((width, height), resample=resample))


def _patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """transformers' `get_patch_output_size`: fit inside `target` keeping the aspect ratio (ceil)."""
    target_height, target_width = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size` with `default_to_square=False`."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


class FromManifest:
    """`from_manifest`: build a parameter dataclass from a manifest section, ignoring keys it has no field for."""

    @classmethod
    def from_manifest(cls, params: dict[str, Any]):
        return cls(**{k: v for k, v in params.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class AnyResImageProcessor(FromManifest):
    """Anyres tiling: best pinpoint resolution, resize + center pad, tiles, plus a base image resized to a square."""

    size: dict[str, int]
    crop_size: dict[str, int]
    image_grid_pinpoints: list[list[int]]
    resample: int
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def base_size(self) -> tuple[int, int]:
        if "height" in self.size and "width" in self.size:
            return self.size["height"], self.size["width"]
        return self.size["shortest_edge"], self.size["shortest_edge"]

    @property
    def tile_size(self) -> int:
        if self.crop_size.get("height"):
            return self.crop_size["height"]
        return self.size.get("height") or self.size["shortest_edge"]

    def _finish_tile(self, tile: np.ndarray) -> np.ndarray:
        """Per-tile resize, center crop, rescale and normalize; HxWx3 uint8 -> 3xHxW float32."""
        if self.do_resize:
            if "shortest_edge" in self.size:
                height, width = shortest_edge_size(tile.shape[0], tile.shape[1], self.size["shortest_edge"])
            else:
                height, width = self.size["height"], self.size["width"]
            tile = _resize(tile, height, width, self.resample)
        chw = np.moveaxis(tile, -1, 0)
        if self.do_center_crop:
            chw = _center_crop(chw, self.crop_size["height"], self.crop_size["width"])
        return rescale_and_normalize(chw, self)

    def preprocess_base_only(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """The multi-image path of OneVision: pad to a square with the mean color, one tile, no grid."""
        rgb = to_rgb_array(image)
        height, width = rgb.shape[:2]
        side = max(height, width)
        square = np.empty((side, side, 3), dtype=np.uint8)
        square[:] = [int(x * 255) for x in self.image_mean]
        top, left = (side - height) // 2, (side - width) // 2
        square[top : top + height, left : left + width] = rgb
        return self._finish_tile(square)[None], (height, width)

    def preprocess(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> (tiles `[1 + grid tiles, 3, S, S]` float32, original (height, width))."""
        rgb = to_rgb_array(image)
        height, width = rgb.shape[:2]
        best = select_best_resolution((height, width), self.image_grid_pinpoints)
        new_height, new_width = _patch_output_size(height, width, best)
        resized = _resize(rgb, new_height, new_width, self.resample)
        pad_y, pad_x = best[0] - new_height, best[1] - new_width
        padded = np.pad(resized, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)), mode="constant")
        tile = self.tile_size
        tiles = [padded[y : y + tile, x : x + tile] for y in range(0, best[0], tile) for x in range(0, best[1], tile)]
        base = _resize(rgb, *self.base_size, self.resample)
        return np.stack([self._finish_tile(t) for t in [base, *tiles]]), (height, width)


def rescale_and_normalize(chw: np.ndarray, params) -> np.ndarray:
    """uint8 `[..., 3, H, W]` -> float32, as transformers' numpy `rescale` (float64 product) then `normalize`.

    `params` has `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean` and `image_std`.
    """
    if params.do_rescale:
        pixels = (chw.astype(np.float64) * params.rescale_factor).astype(np.float32)
    else:
        pixels = chw.astype(np.float32)
    if params.do_normalize:
        mean = np.array(params.image_mean, dtype=np.float32)[:, None, None]
        std = np.array(params.image_std, dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return pixels


def _center_crop(chw: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """transformers' numpy `center_crop`, zero-padding when the image is smaller than the crop."""
    _, height, width = chw.shape
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return chw[:, top : top + crop_height, left : left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    canvas = np.zeros((chw.shape[0], new_height, new_width), dtype=chw.dtype)
    top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    canvas[:, top_pad : top_pad + height, left_pad : left_pad + width] = chw
    top, left = top + top_pad, left + left_pad
    return canvas[:, top : top + crop_height, left : left + crop_width]
