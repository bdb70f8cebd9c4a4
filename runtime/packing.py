"""Anyres feature packing equal to `LlavaNextModel.pack_image_features`, and the image-token counts it implies.

One layout function decides the tile grid and the unpadded region, so the number of `<image>` tokens
in the prompt and the number of packed feature rows can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError


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
    """Where one image's features go: a `grid_height x grid_width` tile grid, unpadded to `rows x cols` patches."""

    grid_height: int
    grid_width: int
    rows: slice
    cols: slice
    tokens_per_tile: int

    @property
    def num_tiles(self) -> int:
        return 1 + self.grid_height * self.grid_width

    @property
    def num_tokens(self) -> int:
        """Base-image tokens, then each unpadded row followed by one `image_newline`."""
        num_rows = self.rows.stop - self.rows.start
        num_cols = self.cols.stop - self.cols.start
        return self.tokens_per_tile + num_rows * (num_cols + 1)


def anyres_layout(image_size: tuple[int, int], packing: dict[str, Any]) -> AnyResLayout:
    """The layout of an image of `(height, width)` under the bundle's packing parameters."""
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
    return AnyResLayout(grid_height, grid_width, rows, cols, packing["tokens_per_tile"])


def pack_anyres(features: np.ndarray, layout: AnyResLayout, patch_grid: int, newline: np.ndarray) -> np.ndarray:
    """Tile features `[tiles, T, D]` (base tile first) -> packed `[layout.num_tokens, D]`."""
    if features.shape[0] != layout.num_tiles:
        raise InputError(f"expected {layout.num_tiles} tiles of features, got {features.shape[0]}")
    base, grid = features[0], features[1:]
    if grid.shape[1] != patch_grid * patch_grid:
        raise InputError(
            f"cannot pack {grid.shape[1]} tokens per tile into a {patch_grid}x{patch_grid} grid "
            "(the 'full' strategy keeps a CLS token that anyres packing cannot place; transformers fails here too)"
        )
    dim = features.shape[-1]
    grid = grid.reshape(layout.grid_height, layout.grid_width, patch_grid, patch_grid, dim)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(layout.grid_height * patch_grid, layout.grid_width * patch_grid, dim)
    grid = grid[layout.rows, layout.cols]
    newlines = np.broadcast_to(newline.astype(grid.dtype), (grid.shape[0], 1, dim))
    rows = np.concatenate([grid, newlines], axis=1).reshape(-1, dim)
    return np.concatenate([base, rows], axis=0)
