"""Video decoding and sampling equal transformers' `read_video_pyav`; frame preprocessing close to torch's."""

from __future__ import annotations

import functools
import sys

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from transformers.video_utils import default_sample_indices_fn, read_video_pyav

from llava_rt.runtime.errors import InputError
from llava_rt.runtime.video import VideoProcessor, load_video, sample_frame_indices

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _moving_frames(count: int, height: int, width: int) -> np.ndarray:
    """Smooth gradients with a moving bright square, so every frame differs."""
    y, x = np.mgrid[0:height, 0:width]
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    for t in range(count):
        frames[t, ..., 0] = (x * 255 // width + 10 * t) % 256
        frames[t, ..., 1] = y * 255 // height
        frames[t, ..., 2] = 20 * t
        frames[t, 8:16, 4 * t : 4 * t + 8] = 255
    return frames


def _write_clip(path, frames: np.ndarray, codec: str = "mpeg4") -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=12)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    _write_clip(path, _moving_frames(12, 48, 64), "libx264" if "libx264" in av.codecs_available else "mpeg4")
    return path


@pytest.mark.parametrize("num_frames", [1, 4, 5, 8, 12])
def test_matches_read_video_pyav(clip, num_frames):
    expected, metadata = read_video_pyav(clip, functools.partial(default_sample_indices_fn, num_frames=num_frames))
    assert metadata.total_num_frames == 12
    assert sample_frame_indices(12, num_frames).tolist() == metadata.frames_indices.tolist()
    ours = load_video(str(clip), num_frames)
    assert ours.dtype == np.uint8 and ours.shape == (num_frames, 48, 64, 3)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(load_video(clip, num_frames), expected)


def test_counts_frames_when_the_container_does_not(tmp_path):
    path = tmp_path / "clip.mkv"
    _write_clip(path, _moving_frames(12, 48, 64))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    assert len(decoded) == 12
    np.testing.assert_array_equal(load_video(path, 4), decoded[[0, 3, 6, 9]])


def test_array_input_is_sampled():
    frames = _moving_frames(10, 6, 8)
    np.testing.assert_array_equal(load_video(frames, 4), frames[[0, 2, 5, 7]])
    np.testing.assert_array_equal(load_video(frames, 10), frames)


@pytest.mark.parametrize("num_frames", [0, -1, 13])
def test_bad_frame_counts(clip, num_frames):
    with pytest.raises(InputError, match=rf"cannot sample {num_frames} frames from a video of 12 frames"):
        load_video(clip, num_frames)
    with pytest.raises(InputError, match=rf"{num_frames} frames from a video of 12"):
        load_video(_moving_frames(12, 4, 4), num_frames)


@pytest.mark.parametrize(
    "frames",
    [np.zeros((2, 4, 4, 3), dtype=np.float32), np.zeros((4, 4, 3), dtype=np.uint8), np.zeros((2, 4, 4, 4), dtype=np.uint8)],
    ids=["float", "3d", "rgba"],
)
def test_bad_arrays(frames):
    with pytest.raises(InputError, match="TxHxWx3 uint8"):
        load_video(frames, 1)
    with pytest.raises(InputError, match="TxHxWx3 uint8"):
        VideoProcessor({"height": 4, "width": 4}, 3, 1 / 255, CLIP_MEAN, CLIP_STD).preprocess(frames)


def test_unreadable_files(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n")
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    for path in (junk, text, audio, tmp_path / "missing.mp4", tmp_path):
        with pytest.raises(InputError, match="cannot read video"):
            load_video(path, 1)
    with pytest.raises(InputError, match="no video stream"):
        load_video(audio, 1)
    with pytest.raises(InputError, match="unsupported video type"):
        load_video([np.zeros((4, 4, 3), dtype=np.uint8)], 1)


def test_missing_pyav_message(clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(InputError, match=r"pip install 'llava-rt\[video\]'"):
        load_video(clip, 2)
    assert load_video(_moving_frames(4, 4, 4), 2).shape == (2, 4, 4, 3)


def _torch_reference(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic antialiased resize of uint8 frames rounded back to uint8 (as torchvision does), rescaled and normalized."""
    batch = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    resized = F.interpolate(batch, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    pixels = resized.round().clamp(0, 255).to(torch.uint8).numpy()
    pixels = (pixels.astype(np.float64) / 255).astype(np.float32)
    return (pixels - np.array(CLIP_MEAN, dtype=np.float32)[:, None, None]) / np.array(CLIP_STD, dtype=np.float32)[:, None, None]


def _smooth_frames(count: int, height: int, width: int) -> np.ndarray:
    """Blurred noise over moving gradients: the low-frequency content of real video frames."""
    rng = np.random.default_rng(1)
    gradients = _moving_frames(count, height, width).astype(np.float64)
    frames = []
    for gradient in gradients:
        noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(4))
        frames.append(np.clip((np.asarray(noise, dtype=np.float64) - 128) * 4 + gradient * 0.5 + 64, 0, 255))
    return np.stack(frames).astype(np.uint8)


# Pillow resizes in two 8-bit passes (rounding and clipping in between), torch in float: on smooth frames the results differ by
# at most one uint8 level, which normalization turns into 1 / 255 / std. The 2-pass clipping of bicubic overshoot makes noise
# frames differ by up to 16 levels (0.24 after normalization), so only smooth frames are compared.
ONE_LEVEL = 1 / 255 / min(CLIP_STD)


@pytest.mark.parametrize(
    ("src", "dst"),
    [((96, 128), (32, 32)), ((50, 70), (24, 36)), ((20, 30), (40, 40)), ((360, 480), (336, 336))],
    ids=["down", "odd", "up", "llava"],
)
def test_preprocess_close_to_torch_bicubic(src, dst):
    frames = _smooth_frames(2, *src)
    processor = VideoProcessor.from_manifest(
        {
            "size": {"height": dst[0], "width": dst[1]},
            "resample": 3,
            "rescale_factor": 1 / 255,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "crop_size": {"height": 1, "width": 1},
        }
    )
    ours = processor.preprocess(frames)
    expected = _torch_reference(frames, *dst)
    assert ours.dtype == np.float32 and ours.shape == (2, 3, *dst) and ours.flags.c_contiguous
    diff = np.abs(ours - expected)
    print(f"smooth {src}->{dst}: max abs diff {diff.max():.4g}, mean {diff.mean():.3g} (one uint8 level = {ONE_LEVEL:.4g})")
    assert diff.max() <= ONE_LEVEL + 1e-6


def test_preprocess_steps_can_be_skipped():
    frames = _moving_frames(2, 6, 8)
    processor = VideoProcessor(
        size={"height": 3, "width": 4},
        resample=3,
        rescale_factor=1 / 255,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_resize=False,
        do_rescale=False,
        do_normalize=False,
    )
    pixels = processor.preprocess(frames)
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, frames.transpose(0, 3, 1, 2))
