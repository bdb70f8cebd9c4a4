"""How far a precision variant of a graph drifts from its fp32 reference, both run by onnxruntime on the CPU.

Feeds are cast to the dtypes each graph declares, outputs compared in float64. `fused=False` runs a graph with
every graph optimization off: Q/DQ pairs then dequantize and compute in fp32, as TensorRT does (fake-quant), instead
of going through onnxruntime's fused integer kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..runtime.backends.onnxrt import ORT_DTYPES
from ..runtime.kv_cache import KVCache, writes_in_place

DECODER_PROMPTS = 8
DECODER_PROMPT_LENGTH = 24


def open_graph(path: Path, fused: bool = True) -> ort.InferenceSession:
    """A CPU session of a graph; `fused=False` disables every graph optimization (fake-quant for Q/DQ graphs)."""
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_graph(session: ort.InferenceSession, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    """One output of a graph, its feeds cast to the dtypes the graph declares."""
    dtypes = {value.name: np.dtype(ORT_DTYPES[value.type]) for value in session.get_inputs()}
    return session.run([output], {name: np.asarray(value, dtypes[name]) for name, value in feeds.items()})[0]


def _row_cosines(reference: np.ndarray, variant: np.ndarray) -> np.ndarray:
    """Cosine similarity of each vector along the last axis (a token's features, a row of logits)."""
    a = reference.astype(np.float64).reshape(-1, reference.shape[-1])
    b = variant.astype(np.float64).reshape(-1, variant.shape[-1])
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(norms, np.finfo(np.float64).tiny)


def compare_outputs(reference: list[np.ndarray], variant: list[np.ndarray]) -> dict[str, Any]:
    """Per-vector cosine (mean and worst), max abs difference and whether the variant is finite."""
    cosines = np.concatenate([_row_cosines(r, v) for r, v in zip(reference, variant)])
    diff = max(float(np.max(np.abs(r.astype(np.float64) - v.astype(np.float64)))) for r, v in zip(reference, variant))
    return {
        "cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
        "max_abs_diff": diff,
        "finite": bool(all(np.isfinite(v).all() for v in variant)),
    }


def graph_outputs(path: Path, feeds: list[dict[str, np.ndarray]], output: str, fused: bool = True) -> list[np.ndarray]:
    """One output of the graph at `path` for each of `feeds` (`fused=False`: fake-quant, see `open_graph`)."""
    session = open_graph(path, fused)
    return [run_graph(session, feed, output) for feed in feeds]


def graph_drift(
    references: list[np.ndarray], variant: Path, feeds: list[dict[str, np.ndarray]], output: str, fused: bool = True
) -> dict:
    """Drift of `variant`'s `output` over `feeds` from the fp32 graph's `references` (its outputs for the same feeds,
    see `compare_outputs`), and how the variant was run."""
    outputs = graph_outputs(variant, feeds, output, fused)
    return {**compare_outputs(references, outputs), "samples": len(feeds), "run": "onnxruntime" if fused else "fake-quant"}


def decoder_prompts(embed: np.ndarray, kv_cache: dict[str, int], in_place: bool = False) -> list[dict[str, np.ndarray]]:
    """Fixed prefill feeds (random token ids, empty past) for comparing decoders; dtypes are cast per graph. `in_place`:
    for a decoder writing the cache in place (its past then has room for the prompt, and is copied to its present)."""
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(DECODER_PROMPTS):
        ids = rng.integers(0, len(embed), size=(1, DECODER_PROMPT_LENGTH))
        if in_place:
            cache = KVCache(kv_cache, 1, np.float32, capacity=DECODER_PROMPT_LENGTH, in_place=True)
            cache_feeds = cache.in_place_run(slice(None), DECODER_PROMPT_LENGTH)[0]
        else:
            cache_feeds = KVCache(kv_cache, 1, np.float32).feeds(np.zeros((1, 0), np.int64), np.ones(ids.shape, np.int64))
        prompts.append(
            {
                "inputs_embeds": np.asarray(embed[ids], np.float32),
                "position_ids": np.arange(DECODER_PROMPT_LENGTH, dtype=np.int64)[None],
                **cache_feeds,
            }
        )
    return prompts


def decoder_drift(reference: Path, variant: Path, embed: np.ndarray, kv_cache: dict[str, int]) -> dict[str, Any]:
    """Last-token logits of both decoders on fixed prompts: cosine, max abs diff and greedy top-1 agreement."""
    logits = []
    for path in (reference, variant):
        session = open_graph(path)
        prompts = decoder_prompts(embed, kv_cache, writes_in_place([value.name for value in session.get_inputs()]))
        logits.append([run_graph(session, feeds, "logits") for feeds in prompts])
    agree = sum(int(r.argmax() == v.argmax()) for r, v in zip(*logits))
    return {**compare_outputs(*logits), "top1_agreement": agree / DECODER_PROMPTS, "prompts": DECODER_PROMPTS}
