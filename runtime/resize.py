"""uint8 antialiased resizing equal to torch's `F.interpolate(uint8, antialias=True)`, which transformers' video
processors use through torchvision. That kernel is a port of Pillow-SIMD: double-precision filter weights,
converted to int16 at a precision set by the largest weight, then a horizontal and a vertical integer pass,
each rounding and clipping to uint8. Reproduced here in numpy (float64 matmuls are exact on these integers).
"""

from __future__ import annotations

import numpy as np

BILINEAR, BICUBIC = 2, 3  # Pillow's resample codes, as processor configs store them


def _filter(resample: int):
    if resample == BICUBIC:
        a = -0.5

        def cubic(x: np.ndarray) -> np.ndarray:
            x = np.abs(x)
            near = ((a + 2) * x - (a + 3)) * x * x + 1
            far = (((x - 5) * x + 8) * x - 4) * a
            return np.where(x < 1, near, np.where(x < 2, far, 0.0))

        return cubic, 4
    if resample == BILINEAR:
        return (lambda x: np.maximum(1.0 - np.abs(x), 0.0)), 2
    raise ValueError(f"antialiased uint8 resizing supports bilinear and bicubic, not resample={resample}")


def _int16_weights(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, int]:
    """Dense `[out, in]` integer weights (as float64) and their fixed-point precision."""
    kernel, interp_size = _filter(resample)
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = kernel((np.arange(lo, hi) - center + 0.5) * invscale)
        total = w.sum()
        weights[i, lo:hi] = w / total if total != 0.0 else w
    w_max = weights.max()
    precision = 22
    for bits in range(22):
        if int(0.5 + w_max * (1 << (bits + 1))) >= (1 << 15):
            precision = bits
            break
    scaled = weights * (1 << precision)
    return np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)), precision


def _pass(image: np.ndarray, weights: np.ndarray, precision: int, axis: int) -> np.ndarray:
    """One separable pass along `axis` of a uint8 image array, with Pillow's rounding and clipping."""
    moved = np.moveaxis(image, axis, -1).astype(np.float64)  # [..., in]
    acc = moved @ weights.T + (1 << (precision - 1)) if precision else moved @ weights.T
    out = np.clip(np.floor(acc / (1 << precision)), 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def resize_uint8_antialias(images: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """`[..., H, W, C]` uint8 -> `[..., height, width, C]` uint8, horizontal pass first; an unchanged axis is kept."""
    if images.shape[-2] != width:
        images = _pass(images, *_int16_weights(images.shape[-2], width, resample), axis=-2)
    if images.shape[-3] != height:
        images = _pass(images, *_int16_weights(images.shape[-3], height, resample), axis=-3)
    return images


def center_crop_offsets(height: int, width: int, crop_height: int, crop_width: int) -> tuple[int, int]:
    """torchvision's `center_crop` offsets (Python rounding of half the margin, not floor division)."""
    return int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))
