"""uint8 antialiased resizing equal to torchvision's on uint8 tensors (`F.interpolate(uint8, antialias=True)`), which
transformers' video processors use, and their center crop.

That kernel is a port of Pillow-SIMD: double-precision filter weights, converted to int16 at a precision set by the
largest weight of the whole axis, then a horizontal and a vertical integer pass, each rounding and clipping to uint8.
Reproduced here with banded weights: each block of outputs multiplies only the input span its filters cover, in
float64, which is exact on these integers. A crop window is computed directly, without the rest of the image.
"""

from __future__ import annotations

import numpy as np

BILINEAR, BICUBIC = 2, 3  # Pillow's resample codes, as processor configs store them
_BLOCK = 32  # outputs per banded matmul
_CHUNK = 1 << 16  # outputs per chunk when scanning a whole axis for its largest weight


def _filter(resample: int):
    """torch's antialiasing filter and its size (`interp_size`) at scale 1."""
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


def _float_weights(in_size: int, out_size: int, resample: int, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: its first input index, its normalized filter taps `[n, taps]` (zero past its window),
    and whether it was normalized; in torch's order of floating-point operations."""
    kernel, interp_size = _filter(resample)
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(np.ceil(support)) * 2 + 1
    center = scale * (outputs + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    size = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    index = np.arange(taps)
    weights = np.where(index < size[:, None], kernel(((first[:, None] + index) - center[:, None] + 0.5) * invscale), 0.0)
    total = np.zeros(len(outputs))
    for tap in weights.T:  # left to right, as torch sums
        total += tap
    normalized = total != 0.0
    return first, np.where(normalized[:, None], weights / np.where(normalized, total, 1.0)[:, None], weights), normalized


def _int16_weights(in_size: int, out_size: int, resample: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First input index and int16 taps (as float64) of outputs `start:stop`, at the precision torch derives from the
    largest normalized weight of all `out_size` outputs."""
    w_max = 0.0
    for chunk in range(0, out_size, _CHUNK):
        _, weights, normalized = _float_weights(in_size, out_size, resample, np.arange(chunk, min(chunk + _CHUNK, out_size)))
        w_max = max(w_max, float(weights[normalized].max(initial=0.0)))
    precision = next((bits for bits in range(22) if int(0.5 + w_max * (1 << (bits + 1))) >= 1 << 15), 22)
    first, weights, _ = _float_weights(in_size, out_size, resample, np.arange(start, stop))
    scaled = weights * (1 << precision)
    return first, np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)), precision


def _span(first: np.ndarray, taps: np.ndarray) -> tuple[int, int]:
    """The input indices `[lo, hi)` that the nonzero taps of these outputs read."""
    index = first[:, None] + np.arange(taps.shape[1])
    return int(first[0]), int(index[taps != 0].max()) + 1


def _bands(first: np.ndarray, taps: np.ndarray):
    """Blocks of consecutive outputs: (output offset, input span start, dense `[outputs, span]` taps)."""
    for offset in range(0, len(first), _BLOCK):
        block_first, block = first[offset : offset + _BLOCK], taps[offset : offset + _BLOCK]
        lo, hi = _span(block_first, block)
        dense = np.zeros((len(block), hi - lo))
        rows, columns = np.nonzero(block)
        dense[rows, block_first[rows] - lo + columns] = block[rows, columns]
        yield offset, lo, dense


def _to_uint8(acc: np.ndarray, precision: int) -> np.ndarray:
    """Pillow's `clip8((acc + half) >> precision)` on exact float64 integers."""
    acc += (1 << precision) >> 1
    acc *= 1.0 / (1 << precision)
    return np.clip(np.floor(acc, out=acc), 0, 255, out=acc)


def _pass(image: np.ndarray, in_first: int, weights: tuple[np.ndarray, np.ndarray, int], axis: int) -> np.ndarray:
    """One separable pass over a `[H, ..., W]` uint8 array (any strides) along `axis` (0 or -1), each block of outputs
    one float64 matrix product over the inputs it reads; `image` holds the inputs from index `in_first` on."""
    first, taps, precision = weights
    shape = list(image.shape)
    shape[axis] = len(first)
    out = np.empty(shape, dtype=np.uint8)
    for offset, lo, dense in _bands(first - in_first, taps):
        end, hi = offset + len(dense), lo + dense.shape[1]
        if axis == -1:
            span = np.ascontiguousarray(image[..., lo:hi], dtype=np.float64).reshape(-1, hi - lo)
            out[..., offset:end] = _to_uint8(span @ dense.T, precision).reshape(*shape[:-1], end - offset)
        else:
            span = np.ascontiguousarray(image[lo:hi], dtype=np.float64).reshape(hi - lo, -1)
            out[offset:end] = _to_uint8(dense @ span, precision).reshape(end - offset, *shape[1:])
    return out


def _window(size: int, start: int, length: int) -> tuple[int, int]:
    """The part `[lo, hi)` of `[start, start + length)` inside `[0, size)`; `(start, start)` when they do not meet."""
    lo, hi = max(start, 0), min(start + length, size)
    return (lo, hi) if lo < hi else (start, start)


def resize_uint8_antialias(
    images: np.ndarray, height: int, width: int, resample: int = BICUBIC, crop: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """`[..., H, W, C]` uint8 -> `[..., height, width, C]` uint8, horizontal pass first; an unchanged axis is kept.

    With `crop=(top, left, crop_height, crop_width)`, only that window of the resized image is computed; the parts of
    it outside the image are zeros (torchvision pads a center crop larger than the image with zeros)."""
    top, left, out_height, out_width = crop if crop is not None else (0, 0, height, width)
    rows, cols = _window(height, top, out_height), _window(width, left, out_width)
    *batch, in_height, in_width, channels = images.shape
    vertical = _int16_weights(in_height, height, resample, *rows) if height != in_height else None
    needed = _span(*vertical[:2]) if vertical is not None and rows[1] > rows[0] else rows
    # viewed as [H, images, C, W]: a pass along H or W is one matrix product per block of outputs
    count = int(np.prod(batch, dtype=np.int64))
    hncw = images.reshape(count, in_height, in_width, channels)[:, needed[0] : needed[1]].transpose(1, 0, 3, 2)
    if width != in_width:
        hncw = _pass(hncw, 0, _int16_weights(in_width, width, resample, *cols), axis=-1)
    else:
        hncw = hncw[..., cols[0] : cols[1]]
    if vertical is not None:
        hncw = _pass(hncw, needed[0], vertical, axis=0)
    padding = [(rows[0] - top, top + out_height - rows[1]), (0, 0), (0, 0), (cols[0] - left, left + out_width - cols[1])]
    return np.pad(hncw, padding).transpose(1, 0, 3, 2).reshape(*batch, out_height, out_width, channels)


def center_crop_window(height: int, width: int, crop_height: int, crop_width: int) -> tuple[int, int, int, int]:
    """transformers' video `center_crop` as a window `(top, left, crop_height, crop_width)` of a `height x width` image:
    the margin halved and truncated, or, where the crop is larger, a negative offset for the zero padding."""

    def start(size: int, crop: int) -> int:
        return -((crop - size) // 2) if crop > size else (size - crop) // 2

    return start(height, crop_height), start(width, crop_width), crop_height, crop_width
