"""Reading a local Hugging Face checkpoint directory: validation first (configs and tokenizer, no weights), then the
model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.chat import ChatTemplate
from ..runtime.errors import CheckpointError, LlavaRtError

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
    model_config: Any  # config.json as transformers reads it (its defaults filled in), before any weight loads
    image_processor: dict[str, Any]
    video_processor: dict[str, Any]
    processor: dict[str, Any]
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]
    chat_template: str | None
    origins: dict[str, str]  # section -> where its keys are: "preprocessor_config.json: " or "processor_config.json: x."

    def source(self, section: str, key: str, default: Any = None) -> tuple[str, Any]:
        """`(where, value)` of a key of one of the configs above: `file: key`, and its value (`default` if null or absent)."""
        value = getattr(self, section).get(key)
        return f"{self.origins[section]}{key}", default if value is None else value

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def model_class(self) -> str:
        """The transformers class that loads this checkpoint."""
        return MODEL_CLASSES[self.model_type]

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"


def _read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict (empty when absent); anything but a UTF-8 JSON object is refused."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise CheckpointError(f"unreadable {path.name} in checkpoint: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path.name} in checkpoint must hold a JSON object, not {type(value).__name__}")
    return value


def _check_config(path: Path, config: dict[str, Any]) -> None:
    """The fields of config.json that pick what to load."""
    if not config:
        raise CheckpointError(f"not a Hugging Face checkpoint (no config.json): {path}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_CLASSES:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise CheckpointError(f"not a supported LLaVA checkpoint: model_type is {model_type!r} (supported: {supported})")
    architectures = config.get("architectures", [MODEL_CLASSES[model_type]])
    if not isinstance(architectures, list) or not architectures or not all(isinstance(a, str) for a in architectures):
        raise CheckpointError(f"config.json: architectures must be a non-empty list of class names, got {architectures!r}")


def _load_config(path: Path):
    """config.json as transformers reads it before loading weights, which type-checks its fields."""
    import transformers

    try:
        with quiet_transformers():
            return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types (a strict-dataclass error for a mistyped field)
        raise CheckpointError(f"config.json: {' '.join(str(exc).split())}") from None


def _check_tokenizer(path: Path) -> None:
    """tokenizer.json must load as a fast tokenizer (what the runtime uses)."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise CheckpointError(f"checkpoint has no tokenizer.json (a fast tokenizer is required): {path.parent}")
    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for every parse error
        raise CheckpointError(f"unreadable tokenizer.json in checkpoint: {exc}") from None


def _check_chat_template(path: Path, template: str | None) -> None:
    """Compile the chat template as the runtime will, so that a syntax error fails here and not at load."""
    if template is None:
        return
    try:
        ChatTemplate(template, {})
    except LlavaRtError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None


def _find_chat_template(path: Path, processor: dict, tokenizer_config: dict) -> str | None:
    """The chat template, wherever this checkpoint's transformers version saved it."""
    if (path / "chat_template.jinja").is_file():
        try:
            return (path / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"unreadable chat_template.jinja in checkpoint: {exc}") from None
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
    _check_config(path, config)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise CheckpointError(f"checkpoint has no weights (*.safetensors): {path}")
    _check_tokenizer(path / "tokenizer.json")
    model_config = _load_config(path)
    processor = _read_json(path / "processor_config.json")
    image_processor, image_origin = _sub_processor(path, processor, "preprocessor_config.json", "image_processor")
    video_processor, video_origin = _sub_processor(path, processor, "video_preprocessor_config.json", "video_processor")
    if not image_processor:
        raise CheckpointError(f"checkpoint has no image processor config (preprocessor_config.json): {path}")
    tokenizer_config = _read_json(path / "tokenizer_config.json")
    chat_template = _find_chat_template(path, processor, tokenizer_config)
    _check_chat_template(path, chat_template)
    return Checkpoint(
        path=path,
        config=config,
        model_config=model_config,
        image_processor=image_processor,
        video_processor=video_processor,
        processor=processor,
        tokenizer_config=tokenizer_config,
        generation_config=_read_json(path / "generation_config.json"),
        chat_template=chat_template,
        origins={
            "image_processor": image_origin,
            "video_processor": video_origin,
            "processor": "processor_config.json: ",
            "tokenizer_config": "tokenizer_config.json: ",
            "generation_config": "generation_config.json: ",
        },
    )


def _sub_processor(path: Path, processor: dict[str, Any], file_name: str, key: str) -> tuple[dict[str, Any], str]:
    """A sub-processor's config (its own file, else its section of processor_config.json; empty when neither), and
    where its keys are."""
    own = _read_json(path / file_name)
    if own:
        return own, f"{file_name}: "
    value = processor.get(key, {})
    if not isinstance(value, dict):
        raise CheckpointError(f"processor_config.json: {key} must be a JSON object, not {type(value).__name__}")
    return value, f"processor_config.json: {key}."


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own logs below ERROR and its progress bars off, which it prints whatever stderr is; llava-rt
    reports what matters itself."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(checkpoint: Checkpoint, torch_dtype):
    """Load the transformers model in eval mode, in `torch_dtype`, with eager attention. A weight the checkpoint
    lacks, or holds in another shape, is an error naming it (transformers would initialize it at random)."""
    import transformers

    model_class = getattr(transformers, checkpoint.model_class)
    try:
        with quiet_transformers():  # its load report is turned into the errors below
            model, info = model_class.from_pretrained(
                checkpoint.path,
                dtype=torch_dtype,
                local_files_only=True,
                attn_implementation="eager",
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
    except Exception as exc:  # transformers raises many types for broken checkpoints
        raise CheckpointError(f"could not load the checkpoint weights: {exc}".splitlines()[0]) from None
    mismatched = sorted(str(entry[0]) if isinstance(entry, tuple) else str(entry) for entry in info["mismatched_keys"])
    if mismatched:
        raise CheckpointError(f"checkpoint tensors have the wrong shape for this config: {_names(mismatched)}")
    missing = _missing_weights(model, info["missing_keys"])
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} weight(s): {_names(missing)}")
    return model.eval()


def _missing_weights(model, missing_keys) -> list[str]:
    """The parameters transformers initialized at random: missing, and not tied to a loaded one (lm_head sharing
    the embedding table is absent from tied checkpoints on purpose). Missing buffers are computed, not loaded."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    loaded = {param.data_ptr() for name, param in parameters.items() if name not in missing_keys}
    return sorted(key for key in missing_keys if key in parameters and parameters[key].data_ptr() not in loaded)


def _names(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
