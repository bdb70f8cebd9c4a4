"""Images and videos of a request: their pixels, how many prompt tokens each takes, and their packed features."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .errors import InputError
from .image_processing import MAX_IMAGE_PIXELS, AnyResImageProcessor, ImageInput, load_image
from .packing import AnyResLayout, image_layout, pack_anyres, pool_video
from .video import VideoInput, VideoProcessor, load_video


@dataclass
class Media:
    """One image (tiles, base first, and their layout) or one video (sampled, preprocessed frames)."""

    kind: str  # "image" or "video"
    pixels: np.ndarray
    num_tokens: int
    layout: AnyResLayout | None = None

    @cached_property
    def digest(self) -> str:
        """sha256 of the pixels and how they are laid out: equal for media whose features are equal. Hashed once
        (the feature cache and the scheduler's prefix keys both ask)."""
        digest = hashlib.sha256(self.pixels.tobytes())
        digest.update(f"{self.kind}|{self.pixels.shape}|{self.layout}|{self.num_tokens}".encode())
        return digest.hexdigest()


class MediaProcessor:
    """The bundle's preprocessing and packing rules for images and (when the model has them) videos.

    `max_image_pixels` limits each image and each video frame (see `check_image_size`)."""

    def __init__(self, manifest: dict[str, Any], image_newline: np.ndarray, max_image_pixels: int = MAX_IMAGE_PIXELS):
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise InputError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")
        self.max_image_pixels = max_image_pixels
        self.packing = manifest["packing"]
        self.video_params = manifest.get("video")
        self.image_processor = AnyResImageProcessor.from_manifest(manifest["preprocess"])
        self.video_processor = VideoProcessor.from_manifest(self.video_params["preprocess"]) if self.video_params else None
        self.image_newline = image_newline

    @property
    def pools_before_projector(self) -> bool:
        """NeXT-Video pools frame features with the bundle's `video_pool` graph before the projector."""
        return bool(self.video_params) and self.video_params["pooling"]["mode"] == "graph"

    def image(self, source: ImageInput, multi_image: bool) -> Media:
        """Preprocess one image; `multi_image` when its prompt holds other images too."""
        image = load_image(source, self.max_image_pixels)
        size = image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width)
        layout = image_layout(size, self.packing, multi_image)
        preprocess = self.image_processor.preprocess_base_only if layout.num_tiles == 1 else self.image_processor.preprocess
        pixels, _ = preprocess(image)
        return Media("image", pixels, layout.num_tokens, layout)

    def video(self, source: VideoInput, num_frames: int) -> Media:
        """Sample `num_frames` frames of a video file or `[T, H, W, 3]` array and preprocess them (the pipeline
        has checked that the model takes videos)."""
        if not isinstance(num_frames, int) or num_frames < 1:
            raise InputError(f"num_frames must be a positive integer, got {num_frames!r}")
        pixels = self.video_processor.preprocess(load_video(source, num_frames, self.max_image_pixels))
        newline = 1 if self.video_params["newline"] == "end" else 0
        return Media("video", pixels, len(pixels) * self.video_params["tokens_per_frame"] + newline)

    def features(self, media: Media, embeds: np.ndarray) -> np.ndarray:
        """Projected per-tile (or per-frame) features -> the `[media.num_tokens, D]` rows the prompt receives."""
        grid = self.packing["patch_grid"]
        if media.kind == "image":
            return pack_anyres(embeds, media.layout, grid, self.image_newline)
        if self.pools_before_projector:
            return embeds.reshape(-1, embeds.shape[-1])  # frames concatenated, no newline
        return pool_video(embeds, grid, tuple(self.video_params["pooling"]["size"]), self.image_newline)
