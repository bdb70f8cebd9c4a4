"""The bundle manifest: every parameter the runtime needs, read from the checkpoint's configs (and checked) before
the model loads, then from the loaded model and the exported graphs."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jsonschema
import onnx
import torch
import transformers
from tokenizers import Tokenizer

from .. import __version__
from ..runtime.bundle import FORMAT_VERSION
from ..runtime.errors import CheckpointError
from ..runtime.manifest_schema import MANIFEST_SCHEMA
from .checkpoint import Checkpoint
from .graphs import layer_windows
from .onnx_export import OPSET

_SCHEMA = MANIFEST_SCHEMA["properties"]  # the runtime's schema of each manifest section
_CLIP_MEAN_STD = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
_COMMON_DEFAULTS = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}
# Each family's image processor defaults, for keys a checkpoint's processor config leaves out.
_IMAGE_PROCESSOR_DEFAULTS = {
    "llava_next": {
        **_COMMON_DEFAULTS,
        **_CLIP_MEAN_STD,
        "size": {"shortest_edge": 224},
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
    },
    "llava_onevision": {
        **_COMMON_DEFAULTS,
        **_CLIP_MEAN_STD,
        "size": {"height": 384, "width": 384},
        "do_center_crop": False,
        "crop_size": None,
    },
}
_IMAGE_PROCESSOR_DEFAULTS["llava_next_video"] = _IMAGE_PROCESSOR_DEFAULTS["llava_next"]
# The families' video processor defaults (LlavaOnevisionVideoProcessor, LlavaNextVideoVideoProcessor).
_VIDEO_PROCESSOR_DEFAULTS = {
    "llava_onevision": {
        **_COMMON_DEFAULTS,
        **_CLIP_MEAN_STD,
        "size": {"height": 384, "width": 384},
        "do_center_crop": False,
        "crop_size": None,
    },
    "llava_next_video": {
        **_COMMON_DEFAULTS,
        **_CLIP_MEAN_STD,
        "size": {"shortest_edge": 224},
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
    },
}


def _as_is(value: Any) -> Any:
    return value


class _Section:
    """One manifest section computed from a checkpoint's configs. Each value `set` in it remembers where it came from
    (`file: key`), so that a value that does not convert, or that the runtime's manifest schema refuses (`check`),
    fails as a one-line `CheckpointError` naming that file and key."""

    def __init__(self, **constants: Any):
        self.values: dict[str, Any] = constants
        self._origins: dict[tuple[str, ...], str] = {}

    def set(self, path: str, *sources: tuple[str, Any], convert: Callable[[Any], Any] = _as_is) -> tuple[str, Any]:
        """Put the first of `sources` (`(where, value)` pairs) that has a value, converted, at `path` (dotted)."""
        where, value = _read(sources, convert)
        *parents, name = keys = tuple(path.split("."))
        target = self.values
        for parent in parents:
            target = target.setdefault(parent, {})
        target[name] = value
        self._origins[keys] = where
        return where, value

    def check(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The values, once the runtime's `schema` of this section accepts them (less the keys computed later)."""
        schema = {**schema, "required": [key for key in schema.get("required", []) if key in self.values]}
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(self.values))
        if error is None:
            return self.values
        path = list(error.absolute_path)
        for depth in range(len(path), 0, -1):
            where = self._origins.get(tuple(map(str, path[:depth])))
            if where is not None:
                where += "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path[depth:])
                break
        else:
            where = error.json_path
        raise CheckpointError(f"{where}: {' '.join(error.message.split())}")


def _read(sources: tuple[tuple[str, Any], ...], convert: Callable[[Any], Any]) -> tuple[str, Any]:
    """`(where, converted value)` of the first of `sources` that has a value (else the last)."""
    where, value = next((source for source in sources if source[1] is not None), sources[-1])
    try:
        return where, convert(value)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _from_config(checkpoint: Checkpoint, path: str) -> tuple[str, Any]:
    """`(where, value)` of a config.json field as transformers reads it (its default when absent; None if no such field)."""
    value = checkpoint.model_config
    for name in path.split("."):
        value = getattr(value, name, None)
    return f"config.json: {path}", value


def _integer(value: Any) -> int:
    """A JSON integer (224.0 too) as an int; anything else is a TypeError."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise TypeError(f"{value!r} is not an integer")
    return int(value)


def _size_dict(value: Any, square: bool) -> dict[str, int]:
    """transformers' `get_size_dict`: an int means a shortest edge (or a square, for crop sizes)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: _integer(v) for k, v in value.items() if v is not None}
    side = _integer(value)
    return {"height": side, "width": side} if square else {"shortest_edge": side}


def _pinpoints(value: Any) -> list[list[int]]:
    if not isinstance(value, list) or not all(isinstance(pair, list) for pair in value):
        raise TypeError(f"{value!r} is not a list of [height, width] pairs")
    return [[_integer(side) for side in pair] for pair in value]


def _token_ids(value: Any) -> list[int]:
    """One token id or a list of them, as a list (empty for null)."""
    if value is None:
        return []
    return [_integer(i) for i in value] if isinstance(value, list) else [_integer(value)]


def _token_id(value: Any) -> int | None:
    return None if value is None else _integer(value)


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json saves it: a string, or an object with its `content`."""
    token = value.get("content") if isinstance(value, dict) else value
    if token is not None and not isinstance(token, str):
        raise TypeError(f"{token!r} is not a token string")
    return token


def _anyres_max(value: str) -> int:
    """N of `anyres_max_N`."""
    number = value.removeprefix("anyres_max_")
    if number == value or not number.isdecimal():
        raise ValueError(f"{value!r} is not anyres_max_<N>")
    return int(number)


_CONVERTERS = {"size": partial(_size_dict, square=False), "crop_size": partial(_size_dict, square=True), "resample": _integer}


def _processor_params(checkpoint: Checkpoint, config: str, defaults: dict[str, Any]) -> _Section:
    """A processor config (`config`: a section of the checkpoint) completed with its class defaults, sizes normalized to
    dicts; no center crop without a crop size."""
    params = _Section()
    for key, default in defaults.items():
        params.set(key, checkpoint.source(config, key, default), convert=_CONVERTERS.get(key, _as_is))
    if not params.values["crop_size"]:
        params.values["do_center_crop"] = False
    return params


def _preprocess_params(checkpoint: Checkpoint) -> dict[str, Any]:
    params = _processor_params(checkpoint, "image_processor", _IMAGE_PROCESSOR_DEFAULTS[checkpoint.model_type])
    pinpoints = checkpoint.source("image_processor", "image_grid_pinpoints")
    params.set("image_grid_pinpoints", pinpoints, _from_config(checkpoint, "image_grid_pinpoints"), convert=_pinpoints)
    return params.check(_SCHEMA["preprocess"])


def _video_params(checkpoint: Checkpoint, grid: tuple[str, int]) -> dict[str, Any] | None:
    """Video frames: preprocessing, pooling, and the tokens each frame becomes.

    OneVision pools projected features 2x2 bilinearly (in the runtime) and closes the video with one
    newline; NeXT-Video pools vision features with its `video_pool` graph before the projector, no newline.
    """
    if checkpoint.model_type not in _VIDEO_PROCESSOR_DEFAULTS:
        return None
    preprocess = _processor_params(checkpoint, "video_processor", _VIDEO_PROCESSOR_DEFAULTS[checkpoint.model_type])
    video = _Section(preprocess=preprocess.check(_SCHEMA["video"]["properties"]["preprocess"]))
    if checkpoint.model_type == "llava_next_video":
        config = checkpoint.model_config
        video.values.update(newline=None, pooling={"mode": "graph", "graph": "video_pool", "method": config.spatial_pool_mode})
        stride = _from_config(checkpoint, "spatial_pool_stride")
        video.set("pooling.stride", stride)
        video.set("tokens_per_frame", stride, convert=lambda stride: (grid[1] // stride) ** 2)
    else:
        video.values.update(newline="end", pooling={"mode": "bilinear"})
        video.set("pooling.size", grid, convert=lambda grid: [-(-grid // 2)] * 2)
        video.set("tokens_per_frame", grid, convert=lambda grid: (-(-grid // 2)) ** 2)
    return video.check(_SCHEMA["video"])


def _packing_params(checkpoint: Checkpoint, grid: tuple[str, int]) -> dict[str, Any]:
    """How image features become prompt tokens (anyres tiling, unpadding, newlines, `anyres_max_N` downsampling), less
    `tokens_per_tile`, which the vision tower decides (see `build_manifest`)."""
    config = checkpoint.model_config
    packing = _Section(
        mode="anyres",
        feature_layers=feature_layers(config),
        select_strategy=config.vision_feature_select_strategy,
        image_newline=True,
        max_num_patches=None,
        multi_image="anyres",
    )
    packing.set("tile_size", _from_config(checkpoint, "vision_config.image_size"))
    packing.set("patch_grid", grid)
    packing.set("image_grid_pinpoints", _from_config(checkpoint, "image_grid_pinpoints"), convert=_pinpoints)
    aspect_ratio = _from_config(checkpoint, "vision_aspect_ratio")
    if aspect_ratio[1] is not None:
        packing.values.update(mode="anyres_max", multi_image="base_only")  # several images: no tiling, one newline each
        packing.set("max_num_patches", aspect_ratio, convert=_anyres_max)
    return packing.check(_SCHEMA["packing"])


def _token_params(checkpoint: Checkpoint) -> dict[str, Any]:
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_file))
    strings = {
        key: _read((checkpoint.source("tokenizer_config", key),), _token_string)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    tokens = _Section(video_token=None, special_tokens={key: token for key, (_, token) in strings.items() if token is not None})
    tokens.set("image_token", checkpoint.source("processor", "image_token", "<image>"))
    tokens.set("image_token_id", _from_config(checkpoint, "image_token_index"))
    if tokens.set("video_token_id", _from_config(checkpoint, "video_token_index"))[1] is not None:
        tokens.set("video_token", checkpoint.source("processor", "video_token", "<video>"))
    tokens.set(
        "bos_token_id",
        checkpoint.source("generation_config", "bos_token_id"),
        _from_config(checkpoint, "text_config.bos_token_id"),
        convert=_token_id,
    )
    eos_sources = checkpoint.source("generation_config", "eos_token_id"), _from_config(checkpoint, "text_config.eos_token_id")
    eos_where, eos_ids = tokens.set("eos_token_ids", *eos_sources, convert=_token_ids)
    if not eos_ids and strings["eos_token"][1]:
        eos_where, eos_ids = tokens.set(
            "eos_token_ids", strings["eos_token"], convert=lambda token: [_vocab_id(tokenizer, token)]
        )
    pad_where, pad_token = strings["pad_token"]
    tokens.set(  # else the tokenizer's pad token, else the first end-of-sequence token
        "pad_token_id",
        checkpoint.source("generation_config", "pad_token_id"),
        (pad_where, tokenizer.token_to_id(pad_token) if pad_token else None),
        (eos_where, eos_ids[0] if eos_ids else None),
        convert=_token_id,
    )
    return tokens.check(_SCHEMA["tokens"])


def _vocab_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{token!r} is not in tokenizer.json")
    return token_id


def _generation_params(checkpoint: Checkpoint) -> dict[str, Any]:
    generation = _Section()
    for key in ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        if key in checkpoint.generation_config:
            generation.set(key, checkpoint.source("generation_config", key))
    return generation.check(_SCHEMA["generation"])


def config_sections(checkpoint: Checkpoint) -> dict[str, Any]:
    """The manifest sections computed from the checkpoint's configs alone, and checked against the runtime's manifest
    schema: run before the model loads, so that a value that cannot be used fails at once, in one line naming its
    file and key."""
    vision = checkpoint.model_config.vision_config
    grid = _from_config(checkpoint, "vision_config.patch_size")[0], vision.image_size // vision.patch_size
    return {
        "tokens": _token_params(checkpoint),
        "preprocess": _preprocess_params(checkpoint),
        "packing": _packing_params(checkpoint, grid),
        "video": _video_params(checkpoint, grid),
        "generation": _generation_params(checkpoint),
    }


def feature_layers(config) -> list[int]:
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


def _has_cls_token(model) -> bool:
    """CLIP towers prepend a CLS embedding; SigLIP towers do not."""
    return any(hasattr(module, "class_embedding") for module in model.model.vision_tower.modules())


def describe_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes (ints or axis names) of a saved graph's inputs and outputs."""
    model = onnx.load(path, load_external_data=False)

    def describe(values):
        return [
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def external_data_file(path: Path) -> str | None:
    """The file holding a saved graph's external weights (one per graph here; the onnxruntime copy of a decoder may
    read another variant's), None when its weights are inside it."""
    model = onnx.load(path, load_external_data=False)
    locations = {item.value for tensor in model.graph.initializer for item in tensor.external_data if item.key == "location"}
    if len(locations) > 1:
        raise ValueError(f"{path.name} reads its weights from {len(locations)} files, not one")
    return next(iter(locations), None)


def variant_entry(path: Path, key: str) -> dict[str, Any]:
    """The manifest entry of a graph variant written at `path` (`key`: `fp32`, `fp16`, `int8.ort`, ...): precision,
    form, files, and the inputs and outputs the graph declares."""
    precision, _, ort = key.partition(".")
    entry = {"precision": precision, "form": "onnxruntime" if ort else "standard", "file": path.name, **describe_io(path)}
    data = external_data_file(path)
    if data is not None:
        entry["external_data"] = data
    return entry


def build_manifest(
    checkpoint: Checkpoint,
    sections: dict[str, Any],
    model,
    graphs: dict[str, Any],
    arrays: dict[str, Any],
    diffs: dict[str, float],
    tolerance: float,
) -> dict[str, Any]:
    """The manifest of a bundle, less its `files` table (written last, once every file exists): the `sections` from
    `config_sections`, and what the model and the exported graphs add."""
    config = model.config
    vision_config, text_config = config.vision_config, config.text_config
    packing = sections["packing"]
    cls_token = packing["select_strategy"] == "full" and _has_cls_token(model)
    return {
        "format_version": FORMAT_VERSION,
        "family": config.model_type,
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "producer": {
            "llava_rt": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "opset": OPSET,
        },
        "text": {
            "model_type": text_config.model_type,
            "hidden_size": text_config.hidden_size,
            "num_layers": text_config.num_hidden_layers,
            "num_attention_heads": text_config.num_attention_heads,
            "vocab_size": text_config.vocab_size,
            "max_position_embeddings": text_config.max_position_embeddings,
            "sliding_windows": layer_windows(text_config),
        },
        "vision": {
            "model_type": vision_config.model_type,
            "image_size": vision_config.image_size,
            "patch_size": vision_config.patch_size,
            "hidden_size": vision_config.hidden_size,
        },
        "tokens": sections["tokens"],
        "preprocess": sections["preprocess"],
        "packing": {**packing, "tokens_per_tile": packing["patch_grid"] ** 2 + (1 if cls_token else 0)},
        "video": sections["video"],
        "graphs": graphs,
        "arrays": arrays,
        "tokenizer": "tokenizer.json",
        "chat_template": "chat_template.jinja" if checkpoint.chat_template is not None else None,
        "verification": {"max_abs_diff": diffs, "tolerance": tolerance},
        "generation": sections["generation"],
    }
