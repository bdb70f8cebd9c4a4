"""Plans against the fp32 reference: each plan and onnxruntime's fp32 graph run on the same sample inputs, compared
output by output (max abs difference and cosine similarity, as polygraphy's `compare` reports them). Torch-free.

Sample inputs, per graph at the profile's opt shapes (for the decoder also a prefill: 16 tokens, no past): pixel
values and features normal(0, 1), decoder embeddings rows of the bundle's embedding table, an all-ones attention
mask, positions following the past.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime.errors import BundleError

PREFILL_TOKENS = 16


@dataclass(frozen=True)
class OutputDiff:
    graph: str
    sample: str
    output: str
    max_abs_diff: float
    cosine: float

    def describe(self) -> str:
        return f"{self.graph} {self.sample} {self.output}: max |diff| {self.max_abs_diff:.3e}, cosine {self.cosine:.6f}"


def compare_arrays(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(max abs difference, cosine similarity) of two arrays of one shape, in float64."""
    a, b = np.asarray(reference, np.float64).ravel(), np.asarray(candidate, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {reference.shape} and {candidate.shape}")
    if a.size == 0:
        return 0.0, 1.0
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(a @ b / norms) if norms else float(np.array_equal(a, b))
    return float(np.max(np.abs(a - b))), cosine


def sample_points(graph: str, plan: dict[str, Any], declared: dict[str, list]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per sample, the shape of every input: the profile's opt shapes, and for the decoder a prefill."""
    opt = {name: tuple(ranges["opt"]) for name, ranges in plan["profile"].items()}
    points = {"opt": opt}
    if graph == "decoder":
        tokens = min(PREFILL_TOKENS, plan["profile"]["inputs_embeds"]["max"][1])
        sizes = {"sequence": tokens, "total_sequence": tokens, "past_sequence": 0}
        points["prefill"] = {
            name: tuple(sizes.get(axis, size) for axis, size in zip(declared[name], shape)) for name, shape in opt.items()
        }
    return points


def sample_feeds(shapes: dict[str, tuple[int, ...]], embed_tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """fp32/int64 sample inputs of the given shapes (the reference's dtypes)."""
    feeds = {}
    past = next((shape[2] for name, shape in shapes.items() if name.startswith("past_key_values.")), 0)
    for name, shape in shapes.items():
        if name == "inputs_embeds":
            feeds[name] = np.asarray(embed_tokens[rng.integers(0, len(embed_tokens), shape[:2])], np.float32)
        elif name == "attention_mask":
            feeds[name] = np.ones(shape, np.int64)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(past, past + shape[1], dtype=np.int64), shape).copy()
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def compare_graph(
    graph: str,
    plan: dict[str, Any],
    manifest: dict[str, Any],
    run_plan: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    run_reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    embed_tokens: np.ndarray,
    seed: int = 0,
) -> list[OutputDiff]:
    """Every output of one plan vs the fp32 graph, for each sample; inputs cast to the plan's dtypes."""
    variant = manifest["graphs"][graph]["variants"][plan["variant"]]
    declared = {tensor["name"]: tensor["shape"] for tensor in variant["inputs"]}
    dtypes = {tensor["name"]: np.dtype(tensor["dtype"]) for tensor in variant["inputs"]}
    diffs = []
    rng = np.random.default_rng(seed)
    for sample, shapes in sample_points(graph, plan, declared).items():
        feeds = sample_feeds(shapes, embed_tokens, rng)
        reference = run_reference(feeds)
        got = run_plan({name: value.astype(dtypes[name]) for name, value in feeds.items()})
        for name, expected in reference.items():
            if name not in got:
                raise BundleError(f"the {graph} plan has no output {name}; rebuild it with llava-engines build")
            diffs.append(OutputDiff(graph, sample, name, *compare_arrays(expected, got[name])))
    return diffs
