"""Video loading (PyAV, as transformers' `read_video_pyav`), uniform frame sampling and per-frame preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from .errors import InputError
from .image_processing import MAX_IMAGE_PIXELS, FromManifest, check_image_size, rescale_and_normalize, shortest_edge_size
from .resize import center_crop_window, resize_uint8_antialias

VideoInput = Union[str, Path, np.ndarray]


def sample_frame_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """Uniform indices, equal to transformers' `default_sample_indices_fn` with `num_frames`."""
    if num_frames < 1 or num_frames > total_frames:
        raise InputError(f"cannot sample {num_frames} frames from a video of {total_frames} frames")
    return np.arange(num_frames, dtype=int) * total_frames // num_frames


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise InputError(f"video arrays must be TxHxWx3 uint8, got shape {frames.shape} and dtype {frames.dtype}")
    return frames


def _decode_pyav(path: Path, num_frames: int, max_pixels: int) -> np.ndarray:
    try:
        import av
    except ImportError:
        raise InputError("reading video files needs PyAV; install the extra with `pip install 'llava-rt[video]'`") from None
    if not path.is_file():
        raise InputError(f"cannot read video {path}: no such file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"cannot read video {path}: it has no video stream")
            if container.format.name == "image2" or container.format.name.endswith("_pipe"):
                raise InputError(f"cannot read video {path}: it is an image ({container.format.name}); pass it as an image")
            stream = container.streams.video[0]
            height, width = stream.height, stream.width
            check_image_size(height, width, max_pixels, f"each frame of video {path}")
            total = stream.frames or sum(1 for _ in container.decode(video=0))
            indices = sample_frame_indices(total, num_frames)
            wanted, last = set(indices.tolist()), int(indices[-1])
            container.seek(0)
            frames = np.empty((len(indices), height, width, 3), dtype=np.uint8)
            count = 0
            for i, frame in enumerate(container.decode(video=0)):
                if i > last:
                    break
                if i in wanted:
                    if (frame.height, frame.width) != (height, width):
                        raise InputError(
                            f"cannot read video {path}: frame {i} is {frame.width}x{frame.height}, not {width}x{height}"
                        )
                    frames[count] = frame.to_ndarray(format="rgb24")
                    count += 1
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"cannot read video {path}: {exc}") from None
    if not count:
        raise InputError(f"cannot read video {path}: no frame could be decoded")
    return frames[:count]


def load_video(source: VideoInput, num_frames: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """`num_frames` uniformly sampled `[T, H, W, 3]` uint8 RGB frames of a video file or a TxHxWx3 uint8 array, each
    frame within `check_image_size`'s limits (checked before anything is decoded)."""
    if isinstance(source, (str, Path)):
        return _decode_pyav(Path(source), num_frames, max_pixels)
    if isinstance(source, np.ndarray):
        frames = _check_frames(source)
        check_image_size(frames.shape[1], frames.shape[2], max_pixels, "each video frame")
        return frames[sample_frame_indices(len(frames), num_frames)]
    raise InputError(f"unsupported video type {type(source).__name__} (use a path or a TxHxWx3 uint8 array)")


@dataclass(frozen=True)
class VideoProcessor(FromManifest):
    """Frames resized (fixed size or shortest edge), center cropped, rescaled and normalized exactly as
    transformers' video processors do through torchvision (uint8 antialiased kernel, torchvision's crop)."""

    size: dict[str, int]
    resample: int
    rescale_factor: float
    image_mean: list[float]
    image_std: list[float]
    do_resize: bool = True
    do_center_crop: bool = False
    crop_size: dict[str, int] = field(default_factory=dict)
    do_rescale: bool = True
    do_normalize: bool = True

    def preprocess(self, frames: np.ndarray) -> np.ndarray:
        """`[T, H, W, 3]` uint8 frames -> `[T, 3, height, width]` float32; only the cropped window is resized."""
        frames = _check_frames(frames)
        height, width = frames.shape[1:3]
        if self.do_resize:
            if "shortest_edge" in self.size:
                height, width = shortest_edge_size(height, width, self.size["shortest_edge"])
            else:
                height, width = self.size["height"], self.size["width"]
        crop = (
            center_crop_window(height, width, self.crop_size["height"], self.crop_size["width"]) if self.do_center_crop else None
        )
        frames = resize_uint8_antialias(frames, height, width, self.resample, crop)
        return np.ascontiguousarray(rescale_and_normalize(np.moveaxis(frames, -1, 1), self))
