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
from llava_rt.runtime.resize import resize_uint8_antialias
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


def _smooth_frames(count: int, height: int, width: int) -> np.ndarray:
    """Blurred noise over moving gradients: the low-frequency content of real video frames."""
    rng = np.random.default_rng(1)
    gradients = _moving_frames(count, height, width).astype(np.float64)
    frames = []
    for gradient in gradients:
        noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(4))
        frames.append(np.clip((np.asarray(noise, dtype=np.float64) - 128) * 4 + gradient * 0.5 + 64, 0, 255))
    return np.stack(frames).astype(np.uint8)


SIZES = [((96, 128), (32, 32)), ((50, 70), (24, 36)), ((20, 30), (40, 40)), ((360, 480), (336, 336)), ((31, 17), (64, 35))]


@pytest.mark.parametrize("resample, mode", [(3, "bicubic"), (2, "bilinear")])
@pytest.mark.parametrize(("src", "dst"), SIZES, ids=["down", "odd", "up", "llava", "up-odd"])
def test_resize_equals_torch_uint8_antialias(src, dst, resample, mode):
    """Bit-exact with the kernel torchvision runs for uint8 video frames, on noise and on smooth frames."""
    noise = np.random.default_rng(2).integers(0, 256, (2, *src, 3), dtype=np.uint8)
    for frames in (noise, _smooth_frames(2, *src)):
        batch = torch.from_numpy(frames).permute(0, 3, 1, 2)
        expected = F.interpolate(batch, size=dst, mode=mode, antialias=True).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(resize_uint8_antialias(frames, *dst, resample), expected)


@pytest.mark.parametrize(("src", "dst"), SIZES[:4])
def test_preprocess_equals_llava_next_video_processor(src, dst):
    """Shortest-edge resize, torchvision's center crop, rescale and normalize, vs transformers' video processor."""
    from transformers import LlavaNextVideoVideoProcessor

    frames = np.random.default_rng(3).integers(0, 256, (2, *src, 3), dtype=np.uint8)
    crop = {"height": dst[0], "width": dst[0]}
    reference = LlavaNextVideoVideoProcessor(size={"shortest_edge": dst[0]}, crop_size=crop)
    expected = reference(videos=[frames], return_tensors="np")["pixel_values_videos"][0]
    ours = VideoProcessor.from_manifest(
        {
            "size": {"shortest_edge": dst[0]},
            "resample": 3,
            "rescale_factor": 1 / 255,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "do_center_crop": True,
            "crop_size": crop,
        }
    ).preprocess(frames)
    assert ours.dtype == np.float32 and ours.shape == expected.shape and ours.flags.c_contiguous
    assert np.abs(ours - expected).max() <= 1e-5


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
