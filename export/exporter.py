"""checkpoint directory -> bundle directory, written atomically (temp dir, verify, rename)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..runtime.bundle import FORMAT_VERSION, MANIFEST_NAME, sha256_file
from ..runtime.errors import ExportError
from . import verify
from .checkpoint import Checkpoint, load_model, read_checkpoint
from .graphs import DecoderWithCache, Projector, VisionFeatures
from .onnx_export import OPSET, export_onnx

DTYPES = {"fp32": np.float32, "fp16": np.float16}

# LlavaNextImageProcessor's defaults, for keys a checkpoint's processor config leaves out.
_IMAGE_PROCESSOR_DEFAULTS = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}


def _size_dict(value: Any, square: bool) -> dict[str, int]:
    """transformers' `get_size_dict`: an int means a shortest edge (or a square, for crop sizes)."""
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if v is not None}
    return {"height": int(value), "width": int(value)} if square else {"shortest_edge": int(value)}


def _preprocess_params(checkpoint: Checkpoint) -> dict[str, Any]:
    params = {**_IMAGE_PROCESSOR_DEFAULTS, **{k: checkpoint.image_processor[k] for k in _IMAGE_PROCESSOR_DEFAULTS if k in checkpoint.image_processor}}
    params["size"] = _size_dict(params["size"], square=False)
    params["crop_size"] = _size_dict(params["crop_size"], square=True)
    pinpoints = checkpoint.image_processor.get("image_grid_pinpoints") or checkpoint.config["image_grid_pinpoints"]
    params["image_grid_pinpoints"] = [list(map(int, p)) for p in pinpoints]
    params["resample"] = int(params["resample"])
    return params


def _special_token(tokenizer_config: dict, key: str) -> str | None:
    value = tokenizer_config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _token_params(checkpoint: Checkpoint, model) -> dict[str, Any]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_file))
    text_config = model.config.text_config
    strings = {key: _special_token(checkpoint.tokenizer_config, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    eos = checkpoint.generation_config.get("eos_token_id", text_config.eos_token_id)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos_ids and strings["eos_token"]:
        eos_ids = [tokenizer.token_to_id(strings["eos_token"])]
    pad_id = checkpoint.generation_config.get("pad_token_id")
    if pad_id is None and strings["pad_token"]:
        pad_id = tokenizer.token_to_id(strings["pad_token"])
    image_token = checkpoint.processor.get("image_token", "<image>")
    return {
        "image_token": image_token,
        "image_token_id": int(model.config.image_token_id),
        "bos_token_id": checkpoint.generation_config.get("bos_token_id", text_config.bos_token_id),
        "eos_token_ids": [int(i) for i in eos_ids],
        "pad_token_id": int(pad_id if pad_id is not None else eos_ids[0]),
        "special_tokens": {k: v for k, v in strings.items() if v is not None},
    }


def _feature_layers(config) -> list[int]:
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


def _has_cls_token(model) -> bool:
    """CLIP towers prepend a CLS embedding; SigLIP towers do not."""
    return any(hasattr(module, "class_embedding") for module in model.model.vision_tower.modules())


def _describe_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes (ints or axis names) of a saved graph's inputs and outputs."""
    import onnx

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


def _export_graphs(
    model, work: Path, dtype: str, tolerance: float, log: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, float]]:
    """Export vision, projector and decoder graphs into `work`, verifying each; returns manifest entries and diffs."""
    import torch

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    config = model.config
    vision_config, text_config = config.vision_config, config.text_config
    generator = torch.Generator().manual_seed(0)
    graphs: dict[str, Any] = {}
    diffs: dict[str, float] = {}

    def record(name: str, diff: float) -> None:
        graphs[name] = {"file": f"{name}.onnx", **_describe_io(work / f"{name}.onnx")}
        if (work / f"{name}.onnx.data").is_file():
            graphs[name]["external_data"] = f"{name}.onnx.data"
        diffs[name] = diff
        log(f"  {name}: max abs diff vs PyTorch {diff:.2e} (limit {tolerance:.0e})")
        if not diff <= tolerance:
            raise ExportError(f"{name} graph differs from PyTorch by {diff:.3e} (> {tolerance:.0e}); export aborted")

    log("[2/4] exporting the vision graph")
    vision = VisionFeatures(model.model.vision_tower, _feature_layers(config), config.vision_feature_select_strategy)
    size = vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=generator).to(torch_dtype)
    export_onnx(
        vision, (pixel_values,), work / "vision.onnx", ["pixel_values"], ["image_features"],
        {"pixel_values": {0: "tiles"}, "image_features": {0: "tiles"}},
    )
    diff, features = verify.verify_vision(work / "vision.onnx", vision, pixel_values)
    record("vision", diff)

    projector = Projector(model.model.multi_modal_projector)
    features = features.contiguous()
    export_onnx(
        projector, (features,), work / "projector.onnx", ["image_features"], ["image_embeds"],
        {"image_features": {0: "tiles", 1: "tokens"}, "image_embeds": {0: "tiles", 1: "tokens"}},
    )
    record("projector", verify.verify_projector(work / "projector.onnx", projector, features))

    log("[3/4] exporting the decoder graph (KV cache)")
    decoder = DecoderWithCache(model.model.language_model, model.lm_head)
    num_layers = text_config.num_hidden_layers
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    kv_heads = text_config.num_key_value_heads
    batch, seq, past_len = 2, 3, 5  # distinct sizes > 1, so no axis gets specialised during tracing
    embeds = torch.randn(batch, seq, text_config.hidden_size, generator=generator).to(torch_dtype)
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = tuple(torch.randn(batch, kv_heads, past_len, head_dim, generator=generator).to(torch_dtype) for _ in range(2 * num_layers))
    past_names = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    axes = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
        **{name: {0: "batch", 2: "past_sequence"} for name in past_names},
        **{name: {0: "batch", 2: "total_sequence"} for name in present_names},
    }
    export_onnx(
        decoder, (embeds, mask, positions, past), work / "decoder.onnx",
        ["inputs_embeds", "attention_mask", "position_ids", *past_names], ["logits", *present_names], axes,
    )
    kv_cache = {"num_layers": num_layers, "num_kv_heads": kv_heads, "head_dim": head_dim}
    record("decoder", verify.verify_decoder(work / "decoder.onnx", model, kv_cache, torch_dtype))
    graphs["decoder"]["kv_cache"] = kv_cache
    return graphs, diffs


def _manifest(
    checkpoint: Checkpoint, model, dtype: str, graphs: dict[str, Any], diffs: dict[str, float], tolerance: float
) -> dict[str, Any]:
    import onnx
    import torch
    import transformers

    config = model.config
    vision_config, text_config = config.vision_config, config.text_config
    grid = vision_config.image_size // vision_config.patch_size
    strategy = config.vision_feature_select_strategy
    return {
        "format_version": FORMAT_VERSION,
        "family": "llava_next",
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
            "sliding_window": getattr(text_config, "sliding_window", None),
        },
        "vision": {
            "model_type": vision_config.model_type,
            "image_size": vision_config.image_size,
            "patch_size": vision_config.patch_size,
            "hidden_size": vision_config.hidden_size,
        },
        "tokens": _token_params(checkpoint, model),
        "preprocess": _preprocess_params(checkpoint),
        "packing": {
            "mode": "anyres",
            "tile_size": vision_config.image_size,
            "patch_grid": grid,
            "tokens_per_tile": grid * grid + (1 if strategy == "full" and _has_cls_token(model) else 0),
            "image_grid_pinpoints": [list(map(int, p)) for p in config.image_grid_pinpoints],
            "feature_layers": _feature_layers(config),
            "select_strategy": strategy,
            "image_newline": True,
            "pooling": None,
        },
        "graphs": graphs,
        "arrays": {"embed_tokens": "embed_tokens.npy", "image_newline": "image_newline.npy"},
        "tokenizer": "tokenizer.json",
        "chat_template": "chat_template.jinja" if checkpoint.chat_template is not None else None,
        "verification": {"max_abs_diff": diffs, "tolerance": tolerance},
    }


def export_bundle(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    force: bool = False,
    tolerance: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export a checkpoint into a bundle at `out_dir`; returns the manifest. Nothing is left behind on failure.

    Each graph must match PyTorch within `tolerance` (max abs difference; default per dtype, see
    `verify.TOLERANCE`).
    """
    if dtype not in DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    tolerance = verify.TOLERANCE[dtype] if tolerance is None else tolerance
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ExportError(f"output already exists: {out_dir} (use --force to replace it)")
    checkpoint = read_checkpoint(checkpoint_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"[1/4] loading {checkpoint.config.get('architectures', ['model'])[0]} from {checkpoint.path} ({dtype})")
    model = load_model(checkpoint, dtype)

    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        graphs, diffs = _export_graphs(model, work, dtype, tolerance, log)
        log("[4/4] writing embeddings, tokenizer, chat template and manifest")
        embed = model.get_input_embeddings().weight.detach().float().numpy().astype(DTYPES[dtype])
        np.save(work / "embed_tokens.npy", embed)
        np.save(work / "image_newline.npy", model.model.image_newline.detach().float().numpy().astype(DTYPES[dtype]))
        shutil.copyfile(checkpoint.tokenizer_file, work / "tokenizer.json")
        if checkpoint.chat_template is not None:
            (work / "chat_template.jinja").write_text(checkpoint.chat_template)
        manifest = _manifest(checkpoint, model, dtype, graphs, diffs, tolerance)
        manifest["files"] = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(work.iterdir()) if p.is_file()
        }
        (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        work.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"wrote {out_dir} in {time.perf_counter() - started:.1f}s")
    return manifest
