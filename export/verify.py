"""Run each exported graph with onnxruntime against the PyTorch module it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..runtime.decoding import empty_past

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
    """Prefill a left-padded batch of two, then decode one token; compare last-token logits with transformers.

    The reference is the transformers language model with its own cache, not our wrapper, so this
    also checks the mask, positions and KV cache plumbing of the exported graph.
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
    past = empty_past(kv_cache, 2, embeds.numpy().dtype)
    outputs = session.run(
        None, {"inputs_embeds": embeds.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(), **past}
    )
    cache = DynamicCache(config=language_model.config)
    with torch.no_grad():
        reference = language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        expected = lm_head(reference.last_hidden_state[:, -1])
    diff = _max_diff(outputs[0], expected)

    step = torch.randn(2, 1, hidden, generator=generator).to(dtype)
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=-1)
    positions = positions[:, -1:] + 1
    present = dict(zip(past, outputs[1:]))
    outputs = session.run(
        None, {"inputs_embeds": step.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(), **present}
    )
    with torch.no_grad():
        reference = language_model(
            inputs_embeds=step, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        expected = lm_head(reference.last_hidden_state[:, -1])
    return max(diff, _max_diff(outputs[0], expected))
