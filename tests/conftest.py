"""Session-cached tiny checkpoints, their bundles, and the transformers reference objects."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_rt.export.tiny_checkpoint import TinySpec, build_tiny_checkpoint

# The two checkpoint variants every parity test runs on.
VARIANTS = {
    # Mistral decoder, vision_feature_layer=-2, a sliding window shorter than the image prompts.
    "mistral": TinySpec(text_model="mistral", vision_feature_layer=-2, sliding_window=64, seed=1),
    # Llama decoder, a list of feature layers (concatenated), non-default pinpoints.
    "llama": TinySpec(
        text_model="llama",
        vision_feature_layer=(-3, -1),
        image_grid_pinpoints=((32, 32), (32, 64), (64, 32), (64, 96), (96, 64), (32, 128)),
        seed=2,
    ),
}


def _has_cuda_provider() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # PyPI's tensorrt stubs (the real wheels are on NVIDIA's index) fail on import
        return False
    return True


# marker -> why a test so marked is skipped, and whether this machine has what it needs (asked once, when used)
NEEDS = {
    "gpu": ("needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)", _has_cuda_provider),
    "tensorrt": ("needs TensorRT (`import tensorrt`)", _has_tensorrt),
}


def pytest_configure(config):
    for marker, (reason, _) in NEEDS.items():
        config.addinivalue_line("markers", f"{marker}: {reason}; skipped where that is missing")


def pytest_collection_modifyitems(config, items):
    available = {}
    for item in items:
        for marker, (reason, check) in NEEDS.items():
            if item.get_closest_marker(marker) is not None:
                if marker not in available:
                    available[marker] = check()
                if not available[marker]:
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True, scope="session")
def _private_llava_rt_cache(tmp_path_factory):
    """Verification stamps (and anything else llava-rt caches per user) go to a temporary directory, also for the
    CLIs the tests start as subprocesses, never to the home directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAVA_RT_CACHE_DIR", str(tmp_path_factory.mktemp("llava-rt-cache")))
        yield


@dataclass
class Variant:
    """One tiny checkpoint, its exported bundle, and transformers' model and processor for it."""

    name: str
    checkpoint: Path
    bundle: Path
    model: object
    processor: object

    def pipeline(self):
        from llava_rt.runtime import Pipeline

        return Pipeline.load(self.bundle)


def _build_variants(root: Path, specs: dict, build, model_class, load_processor) -> dict[str, Variant]:
    """Build, export and load each spec's checkpoint once per session."""
    from llava_rt.export.exporter import export_bundle

    built = {}
    for name, spec in specs.items():
        checkpoint = build(root / f"{name}-checkpoint", spec)
        bundle = root / f"{name}-bundle"
        export_bundle(checkpoint, bundle, log=lambda message: None)
        model = model_class.from_pretrained(checkpoint).eval()
        processor = load_processor(checkpoint)
        processor.tokenizer.padding_side = "left"
        built[name] = Variant(name, checkpoint, bundle, model, processor)
    return built


def _processor_with_pil_images(pil_class):
    """A processor loader that keeps the checkpoint's video processor (it needs torchvision) but uses the Pillow
    image processor, the runtime's reference."""
    from transformers import AutoProcessor

    def load(checkpoint):
        processor = AutoProcessor.from_pretrained(checkpoint)
        processor.image_processor = pil_class.from_pretrained(checkpoint)
        return processor

    return load


@pytest.fixture(scope="session")
def variants(tmp_path_factory) -> dict[str, Variant]:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    return _build_variants(
        tmp_path_factory.mktemp("variants"),
        VARIANTS,
        build_tiny_checkpoint,
        LlavaNextForConditionalGeneration,
        lambda checkpoint: AutoProcessor.from_pretrained(checkpoint, backend="pil"),
    )


@pytest.fixture(params=sorted(VARIANTS))
def variant(request, variants) -> Variant:
    return variants[request.param]


@pytest.fixture(scope="session")
def pipelines(variants):
    return {name: v.pipeline() for name, v in variants.items()}


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A noise RGB image: every pixel differs, so resizing and cropping mistakes show."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


ONEVISION_VARIANTS = {
    # Qwen2 with tied word embeddings (the table is read from the decoder's weights).
    "ov-tied": dict(tie_word_embeddings=True, seed=0),
    "ov": dict(tie_word_embeddings=False, seed=1),
}


@pytest.fixture(scope="session")
def onevision(tmp_path_factory) -> dict[str, Variant]:
    """Tiny LLaVA-OneVision checkpoints, their bundles, and transformers' model and processor (Pil images)."""
    from transformers import LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from llava_rt.export.tiny_checkpoint import TinyOnevisionSpec, build_tiny_onevision_checkpoint

    specs = {name: TinyOnevisionSpec(**options) for name, options in ONEVISION_VARIANTS.items()}
    return _build_variants(
        tmp_path_factory.mktemp("onevision"),
        specs,
        build_tiny_onevision_checkpoint,
        LlavaOnevisionForConditionalGeneration,
        _processor_with_pil_images(LlavaOnevisionImageProcessorPil),
    )


@pytest.fixture(params=sorted(ONEVISION_VARIANTS))
def ov_variant(request, onevision) -> Variant:
    return onevision[request.param]


@pytest.fixture(scope="session")
def ov_pipelines(onevision):
    return {name: v.pipeline() for name, v in onevision.items()}


def smooth_video(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A `[T, H, W, 3]` uint8 clip of moving color gradients (smooth, like real footage)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    clip = [
        np.stack([127.5 + 127.5 * np.sin(x / 9 + y / 13 + t / 2 + phase) for phase in phases], axis=-1) for t in range(frames)
    ]
    return np.clip(np.rint(clip), 0, 255).astype(np.uint8)


def write_video(path, frames: np.ndarray, fps: int = 8):
    """Encode frames to a short mpeg4 file with PyAV."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def default_sigint() -> None:
    """A `preexec_fn`: the child takes Ctrl-C as from a terminal even when the suite itself was started with SIGINT
    ignored (`nohup`, `command &` in a script), a disposition children inherit and Python then keeps."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(module: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, program: str, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{program}: error:") and fragment in lines[0], lines[0]


NEXT_VIDEO_POOL_MODES = ("average", "max", "conv")


@pytest.fixture(scope="session")
def next_video(tmp_path_factory) -> dict[str, Variant]:
    """Tiny LLaVA-NeXT-Video checkpoints, one per spatial pooling mode, with bundles and transformers objects."""
    from transformers import LlavaNextVideoForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from llava_rt.export.tiny_checkpoint import TinyNextVideoSpec, build_tiny_next_video_checkpoint

    specs = {mode: TinyNextVideoSpec(spatial_pool_mode=mode, seed=i) for i, mode in enumerate(NEXT_VIDEO_POOL_MODES)}
    return _build_variants(
        tmp_path_factory.mktemp("next-video"),
        specs,
        build_tiny_next_video_checkpoint,
        LlavaNextVideoForConditionalGeneration,
        _processor_with_pil_images(LlavaNextImageProcessorPil),
    )


@pytest.fixture(params=NEXT_VIDEO_POOL_MODES)
def nv_variant(request, next_video) -> Variant:
    return next_video[request.param]


def in_place_pipeline(variant: Variant, directory: Path, int8_activations: bool = False):
    """`variant`'s pipeline with its fp32 decoder rewritten with GroupQueryAttention, the form of the onnxruntime copies
    (`export/group_query_attention.py`), run in place of the decoder: the exact reference rewritten, so transformers
    stays its oracle. `int8_activations`: the decoder of the int8 onnxruntime copy instead (its weight MatMuls
    quantized per token first, `export/int8_activations.py`)."""
    import json
    import shutil

    from llava_rt.export.group_query_attention import write_group_query_attention
    from llava_rt.export.int8_activations import write_int8_activations
    from llava_rt.runtime.backends import open_session

    manifest = json.loads((variant.bundle / "manifest.json").read_text())
    for path in variant.bundle.glob("decoder.onnx*"):  # the graph and its external data, read by the rewritten graph
        shutil.copyfile(path, directory / path.name)
    source = directory / "decoder.onnx"
    if int8_activations:
        source = write_int8_activations(source, directory / "decoder.int8.onnx")
    kv_cache, windows = manifest["graphs"]["decoder"]["kv_cache"], manifest["text"]["sliding_windows"]
    rewritten = write_group_query_attention(source, directory / "decoder.gqa.onnx", kv_cache, windows)
    pipeline = variant.pipeline()
    pipeline.sessions["decoder"] = open_session(rewritten)
    return pipeline


@pytest.fixture(scope="session")
def in_place_pipelines(variants, tmp_path_factory):
    return {name: in_place_pipeline(v, tmp_path_factory.mktemp(f"in-place-{name}")) for name, v in variants.items()}
