"""The bundle manifest: every parameter the runtime needs, read from the checkpoint and the loaded model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch
import transformers
from tokenizers import Tokenizer

from .. import __version__
from ..runtime.bundle import FORMAT_VERSION
from .checkpoint import Checkpoint
from .graphs import layer_windows
from .onnx_export import OPSET

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


def _size_dict(value: Any, square: bool) -> dict[str, int]:
    """transformers' `get_size_dict`: an int means a shortest edge (or a square, for crop sizes)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if v is not None}
    return {"height": int(value), "width": int(value)} if square else {"shortest_edge": int(value)}


def _processor_params(given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A processor config completed with its class defaults, sizes normalized to dicts."""
    params = {**defaults, **{k: given[k] for k in defaults if k in given and given[k] is not None}}
    params["size"] = _size_dict(params["size"], square=False)
    if "crop_size" in params:
        params["crop_size"] = _size_dict(params["crop_size"], square=True)
        params["do_center_crop"] = bool(params["do_center_crop"]) and bool(params["crop_size"])
    params["resample"] = int(params["resample"])
    return params


def _preprocess_params(checkpoint: Checkpoint) -> dict[str, Any]:
    params = _processor_params(checkpoint.image_processor, _IMAGE_PROCESSOR_DEFAULTS[checkpoint.model_type])
    pinpoints = checkpoint.image_processor.get("image_grid_pinpoints") or checkpoint.config["image_grid_pinpoints"]
    params["image_grid_pinpoints"] = [list(map(int, p)) for p in pinpoints]
    return params


def _video_params(checkpoint: Checkpoint, model, grid: int) -> dict[str, Any] | None:
    """Video frames: preprocessing, pooling, and the tokens each frame becomes.

    OneVision pools projected features 2x2 bilinearly (in the runtime) and closes the video with one
    newline; NeXT-Video pools vision features with its `video_pool` graph before the projector, no newline.
    """
    if checkpoint.model_type not in _VIDEO_PROCESSOR_DEFAULTS:
        return None
    preprocess = _processor_params(checkpoint.video_processor, _VIDEO_PROCESSOR_DEFAULTS[checkpoint.model_type])
    if checkpoint.model_type == "llava_next_video":
        stride = model.config.spatial_pool_stride
        pooled = grid // stride
        pooling = {"mode": "graph", "graph": "video_pool", "method": model.config.spatial_pool_mode, "stride": stride}
        return {"preprocess": preprocess, "pooling": pooling, "tokens_per_frame": pooled * pooled, "newline": None}
    pooled = -(-grid // 2)
    return {
        "preprocess": preprocess,
        "pooling": {"mode": "bilinear", "size": [pooled, pooled]},
        "tokens_per_frame": pooled * pooled,
        "newline": "end",
    }


def _packing_params(model, grid: int) -> dict[str, Any]:
    """How image features become prompt tokens (anyres tiling, unpadding, newlines, `anyres_max_N` downsampling)."""
    config = model.config
    strategy = config.vision_feature_select_strategy
    packing = {
        "mode": "anyres",
        "tile_size": config.vision_config.image_size,
        "patch_grid": grid,
        "tokens_per_tile": grid * grid + (1 if strategy == "full" and _has_cls_token(model) else 0),
        "image_grid_pinpoints": [list(map(int, p)) for p in config.image_grid_pinpoints],
        "feature_layers": feature_layers(config),
        "select_strategy": strategy,
        "image_newline": True,
        "max_num_patches": None,
        "multi_image": "anyres",
    }
    aspect_ratio = getattr(config, "vision_aspect_ratio", None)
    if aspect_ratio is not None:
        packing["mode"] = "anyres_max"
        packing["max_num_patches"] = int(aspect_ratio.removeprefix("anyres_max_"))
        packing["multi_image"] = "base_only"  # several images in one prompt: no tiling, one newline each
    return packing


def _special_token(tokenizer_config: dict, key: str) -> str | None:
    value = tokenizer_config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _token_params(checkpoint: Checkpoint, model) -> dict[str, Any]:
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_file))
    text_config = model.config.text_config
    strings = {
        key: _special_token(checkpoint.tokenizer_config, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    eos = checkpoint.generation_config.get("eos_token_id", text_config.eos_token_id)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos_ids and strings["eos_token"]:
        eos_ids = [tokenizer.token_to_id(strings["eos_token"])]
    pad_id = checkpoint.generation_config.get("pad_token_id")
    if pad_id is None and strings["pad_token"]:
        pad_id = tokenizer.token_to_id(strings["pad_token"])
    image_token = checkpoint.processor.get("image_token", "<image>")
    video_token_id = getattr(model.config, "video_token_id", None)
    return {
        "image_token": image_token,
        "image_token_id": int(model.config.image_token_id),
        "video_token": checkpoint.processor.get("video_token", "<video>") if video_token_id is not None else None,
        "video_token_id": video_token_id,
        "bos_token_id": checkpoint.generation_config.get("bos_token_id", text_config.bos_token_id),
        "eos_token_ids": [int(i) for i in eos_ids],
        "pad_token_id": int(pad_id if pad_id is not None else eos_ids[0]),
        "special_tokens": {k: v for k, v in strings.items() if v is not None},
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


def build_manifest(
    checkpoint: Checkpoint,
    model,
    dtype: str,
    graphs: dict[str, Any],
    arrays: dict[str, Any],
    diffs: dict[str, float],
    tolerance: float,
) -> dict[str, Any]:
    """The manifest of a bundle, less its `files` table (written last, once every file exists)."""
    config = model.config
    vision_config, text_config = config.vision_config, config.text_config
    grid = vision_config.image_size // vision_config.patch_size
    return {
        "format_version": FORMAT_VERSION,
        "family": config.model_type,
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "precision": dtype,
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
        "tokens": _token_params(checkpoint, model),
        "preprocess": _preprocess_params(checkpoint),
        "packing": _packing_params(model, grid),
        "video": _video_params(checkpoint, model, grid),
        "graphs": graphs,
        "arrays": arrays,
        "tokenizer": "tokenizer.json",
        "chat_template": "chat_template.jinja" if checkpoint.chat_template is not None else None,
        "verification": {"max_abs_diff": diffs, "tolerance": tolerance},
        "generation": {
            key: checkpoint.generation_config[key]
            for key in ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")
            if key in checkpoint.generation_config
        },
    }
