"""Session-cached tiny checkpoints, their bundles, and the transformers reference objects."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def variants(tmp_path_factory) -> dict[str, Variant]:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from llava_rt.export.exporter import export_bundle

    root = tmp_path_factory.mktemp("variants")
    built = {}
    for name, spec in VARIANTS.items():
        checkpoint = build_tiny_checkpoint(root / f"{name}-checkpoint", spec)
        bundle = root / f"{name}-bundle"
        export_bundle(checkpoint, bundle, log=lambda message: None)
        model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
        processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
        processor.tokenizer.padding_side = "left"
        built[name] = Variant(name, checkpoint, bundle, model, processor)
    return built


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
