"""Anyres feature packing equal to `LlavaNextModel.pack_image_features`, and the image-token counts it implies.

One layout function decides the tile grid and the unpadded region, so the number of `<image>` tokens
in the prompt and the number of packed feature rows can never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .interpolate import resize_bilinear


def select_best_resolution(original_size: tuple[int, int], possible_resolutions: list[list[int]]) -> tuple[int, int]:
    """transformers' `select_best_resolution`: the pinpoint (height, width) keeping most pixels, wasting fewest."""
    original_height, original_width = original_size
    best_fit = None
    max_effective, min_wasted = 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted = effective, wasted
            best_fit = (height, width)
    return best_fit


@dataclass(frozen=True)
class AnyResLayout:
    """Where one image's features go: a `grid_height x grid_width` tile grid, unpadded to `rows x cols` patches,
    optionally resized (OneVision's `anyres_max_N`). A grid of 0 x 0 is a lone base tile (OneVision multi-image)."""

    grid_height: int
    grid_width: int
    rows: slice
    cols: slice
    tokens_per_tile: int
    resized: tuple[int, int] | None = None

    @property
    def num_tiles(self) -> int:
        return 1 + self.grid_height * self.grid_width

    @property
    def packed_grid(self) -> tuple[int, int]:
        """Rows and columns of grid features that reach the prompt."""
        if self.resized is not None:
            return self.resized
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start

    @property
    def num_tokens(self) -> int:
        """Base-image tokens, then each grid row followed by one `image_newline` (a lone base tile: one newline)."""
        if self.num_tiles == 1:
            return self.tokens_per_tile + 1
        num_rows, num_cols = self.packed_grid
        return self.tokens_per_tile + num_rows * (num_cols + 1)


def image_layout(image_size: tuple[int, int], packing: dict[str, Any], multi_image: bool = False) -> AnyResLayout:
    """The layout of an image of `(height, width)` under the bundle's packing parameters.

    `multi_image` is true when the image shares its prompt with other images (OneVision tiles only single images).
    """
    if multi_image and packing["multi_image"] == "base_only":
        return AnyResLayout(0, 0, slice(0, 0), slice(0, 0), packing["tokens_per_tile"])
    tile, patches = packing["tile_size"], packing["patch_grid"]
    best_height, best_width = select_best_resolution(image_size, packing["image_grid_pinpoints"])
    grid_height, grid_width = best_height // tile, best_width // tile
    current_height, current_width = grid_height * patches, grid_width * patches
    original_height, original_width = image_size
    rows, cols = slice(0, current_height), slice(0, current_width)
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        rows = slice(padding, current_height - padding)
    else:
        new_width = int(round(original_width * (current_height / original_height), 7))
        padding = (current_width - new_width) // 2
        cols = slice(padding, current_width - padding)
    resized = None
    if packing["max_num_patches"]:
        height, width = rows.stop - rows.start, cols.stop - cols.start
        ratio = math.sqrt(height * width / (packing["max_num_patches"] * patches**2))
        if ratio > 1.1:
            resized = (int(height // ratio), int(width // ratio))
    return AnyResLayout(grid_height, grid_width, rows, cols, packing["tokens_per_tile"], resized)


def pack_anyres(features: np.ndarray, layout: AnyResLayout, patch_grid: int, newline: np.ndarray) -> np.ndarray:
    """Tile features `[tiles, T, D]` (base tile first) -> packed `[layout.num_tokens, D]`."""
    if features.shape[0] != layout.num_tiles:
        raise InputError(f"expected {layout.num_tiles} tiles of features, got {features.shape[0]}")
    base, grid = features[0], features[1:]
    if layout.num_tiles == 1:
        return np.concatenate([base, newline[None].astype(base.dtype)], axis=0)
    if grid.shape[1] != patch_grid * patch_grid:
        raise InputError(
            f"cannot pack {grid.shape[1]} tokens per tile into a {patch_grid}x{patch_grid} grid "
            "(the 'full' strategy keeps a CLS token that anyres packing cannot place; transformers fails here too)"
        )
    dim = features.shape[-1]
    grid = grid.reshape(layout.grid_height, layout.grid_width, patch_grid, patch_grid, dim)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(layout.grid_height * patch_grid, layout.grid_width * patch_grid, dim)
    grid = grid[layout.rows, layout.cols]
    if layout.resized is not None:
        grid = resize_bilinear(np.ascontiguousarray(grid.transpose(2, 0, 1)), *layout.resized).transpose(1, 2, 0)
    newlines = np.broadcast_to(newline.astype(grid.dtype), (grid.shape[0], 1, dim))
    rows = np.concatenate([grid, newlines], axis=1).reshape(-1, dim)
    return np.concatenate([base, rows], axis=0)


def pool_video(features: np.ndarray, patch_grid: int, pooled: tuple[int, int], newline: np.ndarray) -> np.ndarray:
    """Frame features `[T, g*g, D]` -> each frame's grid resized bilinearly to `pooled`, frames concatenated,
    one `image_newline` at the end (`LlavaOnevisionModel.apply_pooling` + `get_video_features`)."""
    frames, _, dim = features.shape
    grids = features.reshape(frames, patch_grid, patch_grid, dim).transpose(0, 3, 1, 2)
    pooled_grids = resize_bilinear(np.ascontiguousarray(grids), *pooled).transpose(0, 2, 3, 1).reshape(-1, dim)
    return np.concatenate([pooled_grids, newline[None].astype(pooled_grids.dtype)], axis=0)
