"""The decoder's KV cache: preallocated buffers the graph reads in place and the runtime writes once per token."""

from __future__ import annotations

from types import ModuleType

import numpy as np


def past_names(spec: dict[str, int]) -> list[str]:
    """The decoder graph's past inputs, in order (layer 0 key, layer 0 value, layer 1 key, ...)."""
    return [f"past_key_values.{i}.{kv}" for i in range(spec["num_layers"]) for kv in ("key", "value")]


def new_names(spec: dict[str, int]) -> list[str]:
    """The decoder graph's outputs holding the new tokens' keys and values, in the same order as `past_names`."""
    return [f"new_key_values.{i}.{kv}" for i in range(spec["num_layers"]) for kv in ("key", "value")]


class KVCache:
    """Keys and values of the tokens fed so far, per layer, in buffers `[B, kv_heads, capacity, head_dim]`.

    The decoder graph takes the whole buffers as its past, with the slots past `length` masked out, and
    returns only the new tokens' keys and values, which `append` writes in place: a decode step copies
    one token's worth, never the cache. When a run outgrows the capacity, it doubles (an amortised copy).
    `spec` is the manifest's `graphs.decoder.kv_cache` entry. The buffers are arrays of `array_module`: numpy on
    the host, or the decoder session's device arrays (cupy), where every write is a strided copy on the device.
    """

    def __init__(self, spec: dict[str, int], batch: int, dtype, capacity: int = 0, array_module: ModuleType = np):
        self.spec, self.length, self.array_module = spec, 0, array_module
        shape = (batch, spec["num_kv_heads"], capacity, spec["head_dim"])
        self.buffers = {name: array_module.zeros(shape, dtype=dtype) for name in past_names(spec)}

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2]

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` tokens in all (keeping the cached ones)."""
        if capacity <= self.capacity:
            return
        for name, buffer in self.buffers.items():
            grown = self.array_module.zeros((*buffer.shape[:2], capacity, buffer.shape[3]), dtype=buffer.dtype)
            grown[:, :, : self.length] = buffer[:, :, : self.length]
            self.buffers[name] = grown

    def append(self, new: dict[str, np.ndarray]) -> None:
        """Write the decoder's `new_key_values.*` outputs after the cached tokens."""
        count = next(iter(new.values())).shape[2]
        if self.length + count > self.capacity:
            self.reserve(max(self.length + count, 2 * self.capacity))
        for past_name, new_name in zip(self.buffers, new_names(self.spec)):
            self.buffers[past_name][:, :, self.length : self.length + count] = new[new_name]
        self.length += count

    def truncate(self, length: int) -> None:
        """Forget every token after the first `length` (their slots are overwritten by the next ones)."""
        self.length = min(length, self.length)

    def feeds(self, token_mask: np.ndarray, new_mask: np.ndarray) -> dict:
        """The past inputs and the `attention_mask` (a host array) of one decoder run.

        `token_mask` (`[B, length]`) marks which cached tokens attend (0 on left padding); `new_mask`
        (`[B, S]`) the same for the tokens fed now. An empty cache is fed as zero-length pasts, so a
        prefill attends over nothing it does not need.
        """
        if self.length == 0:
            empty = next(iter(self.buffers.values()))[:, :, :0]
            return {"attention_mask": new_mask, **{name: empty for name in self.buffers}}
        slots = np.zeros((len(new_mask), self.capacity), dtype=np.int64)
        slots[:, : self.length] = token_mask[:, : self.length]
        return {"attention_mask": np.concatenate([slots, new_mask], axis=1), **self.buffers}
