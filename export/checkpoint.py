"""Reading a local Hugging Face checkpoint directory: validation first (cheap, no torch), then the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.errors import CheckpointError

# model_type -> transformers class that loads it. Later families add themselves here.
MODEL_CLASSES = {
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
}


@dataclass
class Checkpoint:
    """Everything the exporter reads from a checkpoint directory, besides the weights."""

    path: Path
    config: dict[str, Any]
    image_processor: dict[str, Any]
    video_processor: dict[str, Any]
    processor: dict[str, Any]
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]
    chat_template: str | None

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable {path.name} in checkpoint: {exc}") from None


def _find_chat_template(path: Path, processor: dict, tokenizer_config: dict) -> str | None:
    """The chat template, wherever this checkpoint's transformers version saved it."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for source in (_read_json(path / "chat_template.json"), processor, tokenizer_config):
        template = source.get("chat_template")
        if isinstance(template, str):
            return template
    return None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a checkpoint directory and read its configs; raises `CheckpointError` with a clear reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path is not a directory: {path}")
    config = _read_json(path / "config.json")
    if not config:
        raise CheckpointError(f"not a Hugging Face checkpoint (no config.json): {path}")
    model_type = config.get("model_type")
    if model_type not in MODEL_CLASSES:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise CheckpointError(f"not a supported LLaVA checkpoint: model_type is {model_type!r} (supported: {supported})")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise CheckpointError(f"checkpoint has no weights (*.safetensors): {path}")
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"checkpoint has no tokenizer.json (a fast tokenizer is required): {path}")
    processor = _read_json(path / "processor_config.json")
    image_processor = _read_json(path / "preprocessor_config.json") or processor.get("image_processor", {})
    if not image_processor:
        raise CheckpointError(f"checkpoint has no image processor config (preprocessor_config.json): {path}")
    tokenizer_config = _read_json(path / "tokenizer_config.json")
    return Checkpoint(
        path=path,
        config=config,
        image_processor=image_processor,
        video_processor=_read_json(path / "video_preprocessor_config.json") or processor.get("video_processor", {}),
        processor=processor,
        tokenizer_config=tokenizer_config,
        generation_config=_read_json(path / "generation_config.json"),
        chat_template=_find_chat_template(path, processor, tokenizer_config),
    )


def load_model(checkpoint: Checkpoint, torch_dtype):
    """Load the transformers model in eval mode, in `torch_dtype`, with eager attention."""
    import transformers

    model_class = getattr(transformers, MODEL_CLASSES[checkpoint.model_type])
    try:
        model = model_class.from_pretrained(
            checkpoint.path, dtype=torch_dtype, local_files_only=True, attn_implementation="eager"
        )
    except Exception as exc:  # transformers raises many types for broken checkpoints
        raise CheckpointError(f"could not load the checkpoint weights: {exc}".splitlines()[0]) from None
    return model.eval()
