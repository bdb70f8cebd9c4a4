"""Bilinear resizing equal to torch's `F.interpolate(mode="bilinear", align_corners=False)`, in numpy."""

from __future__ import annotations

import numpy as np

from .errors import InputError


def _linear_weights(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` matrix of PyTorch's half-pixel linear weights (`area_pixel_compute_source_index`)."""
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    weight = src - i0
    rows = np.arange(out_size)
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (rows, i0), 1.0 - weight)
    np.add.at(matrix, (rows, i1), weight)
    return matrix


def resize_bilinear(features: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize the last two axes of a float `[..., H, W]` array to `[..., height, width]`, keeping its dtype."""
    if features.ndim < 2 or not np.issubdtype(features.dtype, np.floating):
        raise InputError(f"resize_bilinear needs a float [..., H, W] array, got shape {features.shape}, dtype {features.dtype}")
    if height < 1 or width < 1 or 0 in features.shape[-2:]:
        raise InputError(f"cannot resize {features.shape[-2:]} to ({height}, {width})")
    rows = _linear_weights(features.shape[-2], height).astype(features.dtype)
    cols = _linear_weights(features.shape[-1], width).astype(features.dtype)
    return rows @ features @ cols.T
