"""What a manifest must hold for the runtime to use it: a JSON schema of every section the runtime reads, and the
rules across sections a schema cannot state (graph inputs and outputs against the KV cache and text dimensions,
token ids within the vocabulary, TensorRT plans against their graphs, every file the runtime opens listed in the
checksum table)."""

from __future__ import annotations

from typing import Any

import jsonschema

from .engine_plans import HARDWARE_COMPAT, plan_key
from .errors import BundleError
from .kv_cache import IN_PLACE_INPUTS, new_names, past_names, present_names, writes_in_place

TENSOR_DTYPES = ["float16", "float32", "float64", "bool", *(f"{k}{b}" for k in ("int", "uint") for b in (8, 16, 32, 64))]
FLOAT_DTYPES = ["float16", "float32", "float64"]

_POSITIVE = {"type": "integer", "minimum": 1}
_COUNT = {"type": "integer", "minimum": 0}
_PATH = {"type": "string", "minLength": 1}
_OPTIONAL_NUMBER = {"type": ["number", "null"]}
_RGB = {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "number"}}
_PINPOINTS = {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": _POSITIVE}}
_SIZE = {
    "type": "object",
    "properties": {"height": _POSITIVE, "width": _POSITIVE, "shortest_edge": _POSITIVE},
    "anyOf": [{"required": ["height", "width"]}, {"required": ["shortest_edge"]}],
}
_PROCESSOR = {
    "type": "object",
    "required": ["size", "crop_size", "resample", "image_mean", "image_std", "rescale_factor"]
    + ["do_resize", "do_center_crop", "do_rescale", "do_normalize"],
    "properties": {
        "size": _SIZE,
        "crop_size": {"type": "object", "properties": {"height": _POSITIVE, "width": _POSITIVE}},
        "resample": {"enum": [0, 1, 2, 3, 4, 5]},  # Pillow's resampling filters
        "image_mean": _RGB,
        "image_std": {**_RGB, "items": {"type": "number", "exclusiveMinimum": 0}},
        "rescale_factor": {"type": "number"},
        **{key: {"type": "boolean"} for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize")},
    },
    "if": {"properties": {"do_center_crop": {"const": True}}},
    "then": {"properties": {"crop_size": {"required": ["height", "width"]}}},
}
_TENSORS = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["name", "dtype", "shape"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "dtype": {"enum": TENSOR_DTYPES},
            "shape": {"type": "array", "items": {"type": ["string", "integer", "null"], "minimum": 0}},
        },
    },
}
PRECISIONS = ("fp32", "fp16", "int8", "int4")
FORMS = ("standard", "onnxruntime")
# A graph's precision variants, keyed by the middle of their file name: `fp16` is `<graph>.fp16.onnx` (standard
# operators, the form TensorRT builds), `int8.ort` is `<graph>.int8.ort.onnx` (an onnxruntime-only form).
VARIANT_KEY = r"^(fp32|fp16|int8|int4)(\.ort)?$"
_VARIANT = {
    "type": "object",
    "required": ["precision", "form", "file", "inputs", "outputs"],
    "properties": {
        "precision": {"enum": list(PRECISIONS)},
        "form": {"enum": list(FORMS)},
        "file": _PATH,
        "external_data": _PATH,
        "inputs": _TENSORS,
        "outputs": _TENSORS,
        "drift": {"type": "object"},
        # the int8 onnxruntime decoder's dynamic activation quantization, "per_token"; absent in bundles written before
        # it was recorded, whose decoder has one scale per tensor (a row's logits depend on the other rows of a batch)
        "activation_scales": {"enum": ["per_token"]},
    },
}
_GRAPH = {
    "type": "object",
    "required": ["variants"],
    "properties": {
        "variants": {
            "type": "object",
            "required": ["fp32"],
            "propertyNames": {"pattern": VARIANT_KEY},
            "additionalProperties": _VARIANT,
        },
    },
}
_ARRAY = {  # an .npy file name, or a raw region of a file (tied embeddings inside the decoder's weights)
    "type": ["string", "object"],
    "minLength": 1,
    "required": ["file", "offset", "shape", "dtype", "transposed"],
    "properties": {
        "file": _PATH,
        "offset": _COUNT,
        "shape": {"type": "array", "minItems": 1, "items": _POSITIVE},
        "dtype": {"enum": FLOAT_DTYPES},
        "transposed": {"type": "boolean"},
    },
}
_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_DIMS = {"type": "array", "items": _COUNT}
# TensorRT plans built by `llava-engines build`, keyed by their directory under `engines/` (see engine_plans).
_ENGINES = {
    "type": "object",
    "additionalProperties": {
        "type": "object",
        "required": ["precision", "tensorrt", "compute_capability", "hardware_compatibility", "version_compatible"]
        + ["limits", "plans"],
        "properties": {
            "precision": {"enum": list(PRECISIONS)},
            "tensorrt": {"type": "string", "pattern": r"^\d+(\.\d+)*$"},
            "compute_capability": {"type": "string", "pattern": r"^\d+\.\d+$"},
            "hardware_compatibility": {"enum": list(HARDWARE_COMPAT)},
            "version_compatible": {"type": "boolean"},
            "limits": {
                "type": "object",
                "required": ["max_batch", "max_tiles", "max_context", "opt_context"],
                "properties": {key: _POSITIVE for key in ("max_batch", "max_tiles", "max_context", "opt_context")},
            },
            "plans": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {
                    "type": "object",
                    "required": ["file", "sha256", "bytes", "variant", "graph", "graph_sha256", "profile"],
                    "properties": {
                        "file": _PATH,
                        "sha256": _SHA256,
                        "bytes": _COUNT,
                        "variant": {"type": "string", "pattern": VARIANT_KEY},
                        "graph": _PATH,
                        "graph_sha256": _SHA256,
                        "profile": {
                            "type": "object",
                            "additionalProperties": {
                                "type": "object",
                                "required": ["min", "opt", "max"],
                                "properties": {"min": _DIMS, "opt": _DIMS, "max": _DIMS},
                            },
                        },
                    },
                },
            },
        },
    },
}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format_version", "family", "text", "tokens", "preprocess", "packing", "graphs", "arrays", "tokenizer", "files"],
    "properties": {
        "format_version": {"type": "integer"},
        "family": {"type": "string"},
        "text": {
            "type": "object",
            "required": ["hidden_size", "vocab_size", "max_position_embeddings"],
            "properties": {"hidden_size": _POSITIVE, "vocab_size": _POSITIVE, "max_position_embeddings": _POSITIVE},
        },
        "tokens": {
            "type": "object",
            "required": ["image_token", "image_token_id", "eos_token_ids", "special_tokens"],
            "properties": {
                "image_token": {"type": "string", "minLength": 1},
                "image_token_id": _COUNT,
                "video_token": {"type": ["string", "null"], "minLength": 1},
                "video_token_id": {"type": ["integer", "null"], "minimum": 0},
                "eos_token_ids": {"type": "array", "items": _COUNT},
                # passed to the chat template as variables: names like `bos_token`, never `messages`
                "special_tokens": {
                    "type": "object",
                    "propertyNames": {"pattern": "^[a-z][a-z0-9_]*_token$"},
                    "additionalProperties": {"type": "string"},
                },
            },
            "if": {"properties": {"video_token": {"type": "string"}}, "required": ["video_token"]},
            "then": {"required": ["video_token_id"], "properties": {"video_token_id": {"type": "integer"}}},
        },
        "preprocess": {
            **_PROCESSOR,
            "required": [*_PROCESSOR["required"], "image_grid_pinpoints"],
            "properties": {**_PROCESSOR["properties"], "image_grid_pinpoints": _PINPOINTS},
        },
        "packing": {
            "type": "object",
            "required": ["tile_size", "patch_grid", "tokens_per_tile", "image_grid_pinpoints", "max_num_patches", "multi_image"],
            "properties": {
                "tile_size": _POSITIVE,
                "patch_grid": _POSITIVE,
                "tokens_per_tile": _POSITIVE,
                "image_grid_pinpoints": _PINPOINTS,
                "max_num_patches": {"type": ["integer", "null"], "minimum": 1},
                "multi_image": {"enum": ["anyres", "base_only"]},
            },
        },
        "video": {
            "type": ["object", "null"],
            "required": ["preprocess", "pooling", "tokens_per_frame", "newline"],
            "properties": {
                "preprocess": _PROCESSOR,
                "pooling": {
                    "type": "object",
                    "required": ["mode"],
                    "properties": {
                        "mode": {"enum": ["graph", "bilinear"]},
                        "graph": {"const": "video_pool"},
                        "size": {"type": "array", "minItems": 2, "maxItems": 2, "items": _POSITIVE},
                    },
                    "allOf": [
                        {"if": {"properties": {"mode": {"const": "graph"}}}, "then": {"required": ["graph"]}},
                        {"if": {"properties": {"mode": {"const": "bilinear"}}}, "then": {"required": ["size"]}},
                    ],
                },
                "tokens_per_frame": _POSITIVE,
                "newline": {"enum": ["end", None]},
            },
        },
        "graphs": {
            "type": "object",
            "required": ["vision", "projector", "decoder"],
            "additionalProperties": False,
            "properties": {
                "vision": _GRAPH,
                "projector": _GRAPH,
                "video_pool": _GRAPH,
                "decoder": {
                    **_GRAPH,
                    "required": [*_GRAPH["required"], "kv_cache"],
                    "properties": {
                        **_GRAPH["properties"],
                        "kv_cache": {
                            "type": "object",
                            "required": ["num_layers", "num_kv_heads", "head_dim"],
                            "properties": {"num_layers": _POSITIVE, "num_kv_heads": _POSITIVE, "head_dim": _POSITIVE},
                        },
                    },
                },
            },
        },
        "arrays": {
            "type": "object",
            "required": ["embed_tokens", "image_newline"],
            "properties": {"embed_tokens": _ARRAY, "image_newline": _ARRAY},
        },
        "tokenizer": _PATH,
        "chat_template": {"type": ["string", "null"], "minLength": 1},
        "generation": {
            "type": "object",
            "properties": {
                "do_sample": {"type": ["boolean", "null"]},
                "temperature": {**_OPTIONAL_NUMBER, "minimum": 0},
                "top_k": {"type": ["integer", "null"], "minimum": 0},
                "top_p": {**_OPTIONAL_NUMBER, "exclusiveMinimum": 0, "maximum": 1},
                "min_p": {**_OPTIONAL_NUMBER, "minimum": 0, "maximum": 1},
                "repetition_penalty": {**_OPTIONAL_NUMBER, "exclusiveMinimum": 0},
            },
        },
        "files": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["sha256", "bytes"],
                "properties": {"sha256": _SHA256, "bytes": _COUNT},
            },
        },
        "engines": _ENGINES,
    },
}

_VALIDATOR = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
REEXPORT_ADVICE = "re-export the bundle with llava-export"


def _invalid(where: str, problem: str) -> BundleError:
    return BundleError(f"invalid manifest.json at {where}: {problem}; {REEXPORT_ADVICE}")


def variant_key(precision: str, form: str) -> str:
    """The key (and file name middle) of a graph variant: `int8` for the standard form, `int8.ort` for onnxruntime's."""
    return precision + (".ort" if form == "onnxruntime" else "")


def graph_variants(manifest: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every variant of every graph: `(graph, variant key, entry)`."""
    return [(graph, key, entry) for graph, spec in manifest["graphs"].items() for key, entry in spec["variants"].items()]


def referenced_files(manifest: dict[str, Any]) -> list[str]:
    """Every bundle file the runtime opens: graph variants and their external data, arrays' files, tokenizer, chat
    template, TensorRT plans."""
    graphs = [entry[key] for _, _, entry in graph_variants(manifest) for key in ("file", "external_data") if key in entry]
    arrays = [spec if isinstance(spec, str) else spec["file"] for spec in manifest["arrays"].values()]
    template = [manifest["chat_template"]] if manifest.get("chat_template") else []
    plans = [plan["file"] for entry in manifest.get("engines", {}).values() for plan in entry["plans"].values()]
    return [*graphs, *arrays, manifest["tokenizer"], *template, *plans]


def _graph_contract(manifest: dict[str, Any]) -> dict[str, tuple[dict[str, tuple], dict[str, tuple]]]:
    """Per graph, the inputs the runtime feeds (all of them) and the outputs it reads: name -> (dtypes, dims),
    dims being `None` where any size goes."""
    hidden, vocab = manifest["text"]["hidden_size"], manifest["text"]["vocab_size"]
    kv = manifest["graphs"]["decoder"]["kv_cache"]
    features = {"image_features": (FLOAT_DTYPES, None)}
    kv_dims = (None, kv["num_kv_heads"], None, kv["head_dim"])
    decoder_inputs = {
        "inputs_embeds": (FLOAT_DTYPES, (None, None, hidden)),
        "position_ids": (["int64"], (None, None)),
        **{name: (FLOAT_DTYPES, kv_dims) for name in past_names(kv)},
    }
    logits = {"logits": (FLOAT_DTYPES, (None, vocab))}
    return {
        "vision": ({"pixel_values": (FLOAT_DTYPES, None)}, features),
        "projector": (features, {"image_embeds": (FLOAT_DTYPES, (None, None, hidden))}),
        "video_pool": (features, {"pooled_features": (FLOAT_DTYPES, None)}),
        "decoder": (
            {**decoder_inputs, "attention_mask": (["int64"], (None, None))},
            {**logits, **{name: (FLOAT_DTYPES, kv_dims) for name in new_names(kv)}},
        ),
        # an onnxruntime copy writing the cache in place (`kv_cache.IN_PLACE_INPUTS`)
        "decoder in place": (
            {**decoder_inputs, **{name: (["int32"], dims) for name, dims in zip(IN_PLACE_INPUTS, ((None,), (), (None,)))}},
            {**logits, **{name: (FLOAT_DTYPES, kv_dims) for name in present_names(kv)}},
        ),
    }


def _check_tensors(where: str, declared: list[dict[str, Any]], expected: dict[str, tuple], exact: bool) -> None:
    """Declared tensors against the contract: each expected name present with an allowed dtype and matching
    fixed dims (axis names and 0, an unknown size, match anything); with `exact`, nothing else."""
    by_name = {tensor["name"]: tensor for tensor in declared}
    missing = [name for name in expected if name not in by_name]
    if missing:
        raise _invalid(where, f"no {missing[0]!r} (the runtime needs {', '.join(expected)})")
    extra = [name for name in by_name if name not in expected]
    if exact and extra:
        raise _invalid(where, f"unexpected {extra[0]!r} (the runtime feeds only {', '.join(expected)})")
    for name, (dtypes, dims) in expected.items():
        tensor = by_name[name]
        if tensor["dtype"] not in dtypes:
            raise _invalid(where, f"{name} is {tensor['dtype']}, expected {' or '.join(dtypes)}")
        if dims is None:
            continue
        shape = tensor["shape"]
        fixed_mismatch = any(isinstance(d, int) and d and want is not None and d != want for d, want in zip(shape, dims))
        if len(shape) != len(dims) or fixed_mismatch:
            wanted = ["*" if want is None else want for want in dims]
            raise _invalid(where, f"{name} has shape {shape}, expected [{', '.join(map(str, wanted))}]")


def _check_kv_dtypes(where: str, entry: dict[str, Any], kv: dict[str, int]) -> None:
    """The runtime writes each step's new keys and values into the buffers it feeds back as the past: one dtype."""
    dtypes = {tensor["name"]: tensor["dtype"] for tensor in [*entry["inputs"], *entry["outputs"]]}
    kinds = {dtypes[name] for name in [*past_names(kv), *new_names(kv), *present_names(kv)] if name in dtypes}
    if len(kinds) > 1:
        raise _invalid(where, f"the KV cache inputs and outputs mix {' and '.join(sorted(kinds))}")


def _invalid_plans(where: str, problem: str) -> BundleError:
    return BundleError(f"invalid manifest.json at {where}: {problem}; rebuild the plans with llava-engines build")


def _check_engines(manifest: dict[str, Any]) -> None:
    """Each plan set keyed by its directory, each plan built from a standard-form variant of its graph, listed in the
    checksum table as the entry records it, with a profile of min <= opt <= max for exactly the variant's inputs."""
    for key, entry in manifest.get("engines", {}).items():
        where = f"$.engines.{key}"
        expected = plan_key(entry["tensorrt"], entry["compute_capability"], entry["precision"])
        if key != expected:
            raise _invalid_plans(
                where,
                f"plans of TensorRT {entry['tensorrt']}, sm {entry['compute_capability']} must be keyed {expected!r}",
            )
        for graph, plan in entry["plans"].items():
            at = f"{where}.plans.{graph}"
            variant = manifest["graphs"].get(graph, {}).get("variants", {}).get(plan["variant"])
            if variant is None or variant["form"] != "standard" or variant["file"] != plan["graph"]:
                raise _invalid_plans(at, f"{plan['graph']} is not the standard-form {plan['variant']} variant of a {graph} graph")
            listed = manifest["files"].get(plan["file"])
            if listed is None or listed != {"sha256": plan["sha256"], "bytes": plan["bytes"]}:
                raise _invalid_plans(at, f"{plan['file']} is not in the checksum table with this sha256 and size")
            inputs = {tensor["name"]: tensor["shape"] for tensor in variant["inputs"]}
            if sorted(plan["profile"]) != sorted(inputs):
                profiled = ", ".join(sorted(plan["profile"])) or "no input"
                raise _invalid_plans(f"{at}.profile", f"a profile for {profiled}, but the inputs are {', '.join(sorted(inputs))}")
            for name, ranges in plan["profile"].items():
                low, opt, high = ranges["min"], ranges["opt"], ranges["max"]
                ordered = all(a <= b <= c for a, b, c in zip(low, opt, high))
                if not (len(low) == len(opt) == len(high) == len(inputs[name])) or not ordered:
                    raise _invalid_plans(f"{at}.profile.{name}", f"min {low}, opt {opt}, max {high} for shape {inputs[name]}")


def check_manifest(manifest: Any) -> None:
    """Raise `BundleError` (one line naming the JSON path) unless the manifest is one the runtime can use."""
    if not isinstance(manifest, dict):
        raise BundleError(f"manifest.json is not a JSON object; {REEXPORT_ADVICE}")
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(manifest))
    if error is not None:
        problem = " ".join(error.message.split())
        raise _invalid(error.json_path, problem if len(problem) <= 200 else problem[:200] + "...")
    contract = _graph_contract(manifest)
    for graph, key, entry in graph_variants(manifest):
        where = f"$.graphs.{graph}.variants.{key}"
        expected_key = variant_key(entry["precision"], entry["form"])
        if key != expected_key:
            raise _invalid(where, f"a {entry['form']} {entry['precision']} variant must be keyed {expected_key!r}")
        in_place = graph == "decoder" and writes_in_place([tensor["name"] for tensor in entry["inputs"]])
        inputs, outputs = contract["decoder in place" if in_place else graph]
        _check_tensors(f"{where}.inputs", entry["inputs"], inputs, exact=True)
        _check_tensors(f"{where}.outputs", entry["outputs"], outputs, exact=False)
        if graph == "decoder":
            _check_kv_dtypes(where, entry, manifest["graphs"]["decoder"]["kv_cache"])
    video = manifest.get("video")
    if video and video["pooling"]["mode"] == "graph" and "video_pool" not in manifest["graphs"]:
        raise _invalid("$.graphs", "no video_pool graph, which $.video.pooling names")
    tile = manifest["packing"]["tile_size"]
    for height, width in manifest["packing"]["image_grid_pinpoints"]:
        if height % tile or width % tile:
            raise _invalid("$.packing.image_grid_pinpoints", f"[{height}, {width}] is not a multiple of the tile size {tile}")
    tokens, vocab = manifest["tokens"], manifest["text"]["vocab_size"]
    ids = {"image_token_id": [tokens["image_token_id"]], "video_token_id": [tokens.get("video_token_id")]}
    for key, values in {**ids, "eos_token_ids": tokens["eos_token_ids"]}.items():
        if any(value is not None and value >= vocab for value in values):
            raise _invalid(f"$.tokens.{key}", f"{values} is not below the vocabulary size {vocab}")
    _check_engines(manifest)
    unlisted = [name for name in referenced_files(manifest) if name not in manifest["files"]]
    if unlisted:
        raise _invalid("$.files", f"{unlisted[0]!r} is used by the bundle but not in its checksum table")
