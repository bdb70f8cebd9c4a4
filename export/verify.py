"""Run each exported graph with onnxruntime against the PyTorch module it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..runtime.kv_cache import KVCache, new_names
from .graphs import cache_keyword

# Max abs difference allowed between onnxruntime and PyTorch, per export dtype.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _max_diff(actual: np.ndarray, expected: torch.Tensor) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected.double().numpy())))


def verify_graph(path: Path, module, sample: torch.Tensor, input_name: str) -> tuple[float, torch.Tensor]:
    """Max abs diff of a one-input graph against its module, and the module's output (the next graph's input)."""
    with torch.no_grad():
        expected = module(sample)
    (actual,) = _session(path).run(None, {input_name: sample.numpy()})
    return _max_diff(actual, expected), expected


def verify_decoder(path: Path, model, kv_cache: dict[str, int], dtype: torch.dtype) -> float:
    """Prefill a left-padded batch of two, then decode two tokens; compare last-token logits with transformers.

    The reference is the transformers language model with its own cache, not our wrapper, so this
    also checks the mask, positions and KV cache plumbing of the exported graph: the decode steps run
    through the runtime's preallocated `KVCache`, with unused capacity masked out as in a real run.
    """
    from transformers import DynamicCache

    language_model = model.model.language_model
    lm_head = model.lm_head
    session = _session(path)
    generator = torch.Generator().manual_seed(0)
    hidden = language_model.config.hidden_size
    embeds = torch.randn(2, 6, hidden, generator=generator).to(dtype)
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kv = KVCache(kv_cache, 2, embeds.numpy().dtype)
    reference_cache = DynamicCache(config=language_model.config)
    diffs = []
    for step in range(3):
        if step:
            embeds = torch.randn(2, 1, hidden, generator=generator).to(dtype)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=-1)
            positions = positions[:, -1:] + 1
        feeds = kv.feeds(mask[:, : kv.length].numpy(), mask[:, kv.length :].numpy())
        outputs = dict(
            zip(
                [o.name for o in session.get_outputs()],
                session.run(None, {"inputs_embeds": embeds.numpy(), "position_ids": positions.numpy(), **feeds}),
            )
        )
        kv.reserve(mask.shape[1] + 4)  # spare slots, masked: the runtime's preallocated layout
        kv.append({name: outputs[name] for name in new_names(kv_cache)})
        with torch.no_grad():
            reference = language_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_keyword(language_model): reference_cache},
            )
            diffs.append(_max_diff(outputs["logits"], lm_head(reference.last_hidden_state[:, -1])))
    return max(diffs)
