"""Real architectures at their true shapes, with random weights: what `llava-bench --preset` builds.

The shapes are those of the Hugging Face checkpoints the presets are named after (their `config.json`);
only the tokenizer is the small built-in one, so the embedding table keeps its real vocabulary size.
`layers` shrinks the decoder's depth for quick runs (the vision tower keeps its depth).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..export.tiny_checkpoint import (
    TinyNextVideoSpec,
    TinyOnevisionSpec,
    TinySpec,
    build_tiny_checkpoint,
    build_tiny_next_video_checkpoint,
    build_tiny_onevision_checkpoint,
)

CLIP_L_336 = dict(image_size=336, patch_size=14, vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16)
NEXT_PINPOINTS_336 = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class Preset:
    """A named architecture: its spec (at full depth) and the builder that writes it as a checkpoint."""

    name: str
    spec: TinySpec | TinyOnevisionSpec | TinyNextVideoSpec
    build: Callable[[Path, object], Path]

    def checkpoint(self, out_dir: Path, layers: int | None = None) -> Path:
        """Write the checkpoint (decoder depth `layers` if given) to `out_dir`."""
        spec = self.spec if layers is None else replace(self.spec, text_layers=layers)
        return self.build(out_dir, spec)


PRESETS = {
    preset.name: preset
    for preset in (
        Preset(
            "llava-onevision-qwen2-0.5b-ov",
            TinyOnevisionSpec(
                image_size=384,
                patch_size=14,
                vision_hidden=1152,
                vision_intermediate=4304,
                vision_layers=26,
                vision_heads=16,
                text_hidden=896,
                text_intermediate=4864,
                text_layers=24,
                num_heads=14,
                num_kv_heads=2,
                model_vocab_size=152000,
                max_position_embeddings=32768,
                tie_word_embeddings=True,
                initializer_range=0.02,
                image_grid_pinpoints=tuple((384 * h, 384 * w) for h in range(1, 7) for w in range(1, 7)),
                vision_aspect_ratio="anyres_max_9",
            ),
            build_tiny_onevision_checkpoint,
        ),
        Preset(
            "llava-v1.6-mistral-7b",
            TinySpec(
                **CLIP_L_336,
                text_hidden=4096,
                text_intermediate=14336,
                text_layers=32,
                num_heads=32,
                num_kv_heads=8,
                model_vocab_size=32064,
                max_position_embeddings=32768,
                text_model="mistral",
                image_grid_pinpoints=NEXT_PINPOINTS_336,
            ),
            build_tiny_checkpoint,
        ),
        Preset(
            "llava-next-video-7b",
            TinyNextVideoSpec(
                **CLIP_L_336,
                text_hidden=4096,
                text_intermediate=11008,
                text_layers=32,
                num_heads=32,
                num_kv_heads=32,
                model_vocab_size=32064,
                max_position_embeddings=4096,
                image_grid_pinpoints=NEXT_PINPOINTS_336,
            ),
            build_tiny_next_video_checkpoint,
        ),
    )
}
