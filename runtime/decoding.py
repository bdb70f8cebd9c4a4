"""The greedy decode loop over the decoder graph's KV cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .backends import Session


@dataclass
class DecodeOutput:
    """Generated ids per row (up to and including EOS) and where the time went."""

    tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    decode_steps: int


def empty_past(kv_cache: dict[str, int], batch: int, dtype) -> dict[str, np.ndarray]:
    """Zero-length `past_key_values.*` inputs for a prefill, shaped by the manifest's `kv_cache` entry."""
    shape = (batch, kv_cache["num_kv_heads"], 0, kv_cache["head_dim"])
    return {
        f"past_key_values.{i}.{kv}": np.zeros(shape, dtype=dtype)
        for i in range(kv_cache["num_layers"])
        for kv in ("key", "value")
    }


def greedy_decode(
    decoder: Session,
    embed: Callable[[np.ndarray], np.ndarray],
    inputs_embeds: np.ndarray,
    attention_mask: np.ndarray,
    kv_cache: dict[str, int],
    max_new_tokens: int,
    eos_token_ids: list[int],
    max_length: int,
) -> DecodeOutput:
    """Prefill the left-padded batch, then feed back the argmax token until EOS, `max_new_tokens` or `max_length`.

    Positions follow transformers' `generate`: `cumsum(attention_mask) - 1` (0 on padding), then +1 per step.
    """
    batch = inputs_embeds.shape[0]
    dtype = inputs_embeds.dtype
    past = empty_past(kv_cache, batch, dtype)
    positions = np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int64)
    feeds = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "position_ids": positions, **past}
    tokens: list[list[int]] = [[] for _ in range(batch)]
    finished = np.zeros(batch, dtype=bool)
    eos = np.array(eos_token_ids, dtype=np.int64)

    started = time.perf_counter()
    outputs = decoder.run(feeds)
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    steps = 0
    while True:
        next_tokens = np.argmax(outputs["logits"], axis=-1).astype(np.int64)
        for row in np.flatnonzero(~finished):
            tokens[row].append(int(next_tokens[row]))
        finished |= np.isin(next_tokens, eos)
        length = attention_mask.shape[1]
        if finished.all() or len(max(tokens, key=len)) >= max_new_tokens or length + 1 >= max_length:
            break
        attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), dtype=attention_mask.dtype)], axis=1)
        positions = positions[:, -1:] + 1
        feeds = {
            "inputs_embeds": embed(next_tokens[:, None]),
            "attention_mask": attention_mask,
            "position_ids": positions,
            **{name.replace("present", "past_key_values"): value for name, value in outputs.items() if name != "logits"},
        }
        outputs = decoder.run(feeds)
        steps += 1
    return DecodeOutput(tokens, prefill_s, time.perf_counter() - started, steps)
