"""The decoder's KV cache: preallocated buffers the graph reads in place and the runtime writes once per token."""

from __future__ import annotations

from types import ModuleType

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading elements two 1-D arrays share (the cached tokens a new prompt can reuse)."""
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(a[:n] != b[:n])
    return int(mismatch[0]) if len(mismatch) else n


def past_names(spec: dict[str, int]) -> list[str]:
    """The decoder graph's past inputs, in order (layer 0 key, layer 0 value, layer 1 key, ...)."""
    return [f"past_key_values.{i}.{kv}" for i in range(spec["num_layers"]) for kv in ("key", "value")]


def new_names(spec: dict[str, int]) -> list[str]:
    """The decoder graph's outputs holding the new tokens' keys and values, in the same order as `past_names`."""
    return [f"new_key_values.{i}.{kv}" for i in range(spec["num_layers"]) for kv in ("key", "value")]


# A decoder that writes its cache in place (onnxruntime's GroupQueryAttention, `export/group_query_attention.py`) takes
# these instead of `attention_mask`, and its `present.*` outputs are bound to the buffers fed as `past_key_values.*`.
IN_PLACE_INPUTS = ("seqlens_k", "total_sequence_length", "query_seqlens")


def present_names(spec: dict[str, int]) -> list[str]:
    """An in-place decoder's outputs bound to the cache buffers, in the same order as `past_names`."""
    return [f"present.{i}.{kv}" for i in range(spec["num_layers"]) for kv in ("key", "value")]


def writes_in_place(input_names: list[str]) -> bool:
    """Whether a decoder with these inputs writes the new keys and values into the cache itself."""
    return IN_PLACE_INPUTS[0] in input_names


def in_place_feeds(lengths: np.ndarray, fed: np.ndarray) -> dict[str, np.ndarray]:
    """An in-place decoder's cache inputs for rows holding `lengths` tokens before a run that feeds `fed` tokens to
    each (0: a row left as it is, which is then told it holds one token, so that it costs nothing)."""
    after = np.where(fed > 0, lengths + fed, 1)
    return {
        "seqlens_k": (after - 1).astype(np.int32),
        "total_sequence_length": np.array(after.max(), dtype=np.int32),
        "query_seqlens": fed.astype(np.int32),
    }


def resized(buffers: dict, capacity: int, kept: int, array_module: ModuleType) -> dict:
    """New cache buffers of `capacity` slots per row holding the first `kept` slots of `buffers` (zeros after)."""
    grown = {}
    for name, buffer in buffers.items():
        grown[name] = array_module.zeros((*buffer.shape[:2], capacity, buffer.shape[3]), dtype=buffer.dtype)
        grown[name][:, :, :kept] = buffer[:, :, :kept]
    return grown


class KVCache:
    """Keys and values of the tokens fed so far, per layer, in buffers `[B, kv_heads, capacity, head_dim]`.

    The decoder graph takes the whole buffers as its past, with the slots past `length` masked out, and
    returns only the new tokens' keys and values, which `append` writes in place: a decode step copies
    one token's worth, never the cache. When a run outgrows the capacity, it doubles (an amortised copy).
    `spec` is the manifest's `graphs.decoder.kv_cache` entry. The buffers are arrays of `array_module`: numpy on
    the host, or the decoder session's device arrays (cupy), where every write is a strided copy on the device.

    `lengths[row]` is how many slots row `row` fills; every row fills the same number (left padding included),
    except with `in_place` (a decoder that writes the cache itself, see `IN_PLACE_INPUTS`): then each row holds its
    own tokens from slot 0, and a run is fed `in_place_run` instead of `feeds`. `length` is the longest row's.
    """

    def __init__(
        self, spec: dict[str, int], batch: int, dtype, capacity: int = 0, array_module: ModuleType = np, in_place: bool = False
    ):
        self.spec, self.array_module, self.in_place = spec, array_module, in_place
        self.lengths = np.zeros(batch, dtype=np.int64)
        shape = (batch, spec["num_kv_heads"], capacity, spec["head_dim"])
        self.buffers = {name: array_module.zeros(shape, dtype=dtype) for name in past_names(spec)}

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2]

    @property
    def length(self) -> int:
        return int(self.lengths.max())

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` tokens in all (keeping the cached ones)."""
        if capacity <= self.capacity:
            return
        self.buffers = resized(self.buffers, capacity, self.length, self.array_module)

    def append(self, new: dict[str, np.ndarray]) -> None:
        """Write the decoder's `new_key_values.*` outputs after the cached tokens."""
        count, length = next(iter(new.values())).shape[2], self.length
        if length + count > self.capacity:
            self.reserve(max(length + count, 2 * self.capacity))
        for past_name, new_name in zip(self.buffers, new_names(self.spec)):
            self.buffers[past_name][:, :, length : length + count] = new[new_name]
        self.lengths += count

    def truncate(self, length: int) -> None:
        """Forget every token after the first `length` (their slots are overwritten by the next ones)."""
        np.minimum(self.lengths, length, out=self.lengths)

    def in_place_run(self, rows: slice, count: int) -> tuple[dict, dict]:
        """For an in-place decoder fed `count` tokens per row of `rows` after their cached ones: the cache inputs, and
        the outputs to bind (each `present.*` to the buffer fed as its past). `advance` records the run afterwards."""
        views = self.buffers if rows == slice(None) else {name: buffer[rows] for name, buffer in self.buffers.items()}
        lengths = self.lengths[rows]
        inputs = {**in_place_feeds(lengths, np.full(len(lengths), count)), **views}
        return inputs, dict(zip(present_names(self.spec), views.values()))

    def advance(self, rows: slice, count: int) -> None:
        """Record that an in-place run wrote `count` tokens to each row of `rows`."""
        self.lengths[rows] += count

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


MIN_SLOT_CAPACITY = 256  # tokens per row a slot cache never shrinks below


class SlotKVCache:
    """Keys and values for a fixed set of slots, one batch row each, every row with its own length.

    Buffers are `[slots, kv_heads, capacity, head_dim]`; row `s` holds its first `lengths[s]` tokens, and `tokens[s]`
    says which: one int64 per token, the token id, or for an image or video token a negative number derived from the
    media's content, so two rows hold the same keys and values exactly where their `tokens` agree (the same ids and
    the same media at the same positions give the same keys and values). A row keeps its contents after its request
    ends, for a later request with the same prefix (`prefix_lengths`, `copy_prefix`). The capacity follows the longest
    row (`fit`): the graph attends over the whole capacity, masked, so it is kept near what the rows use. With
    `in_place` the decoder writes the new keys and values into the rows itself (see `IN_PLACE_INPUTS`).
    """

    def __init__(
        self, spec: dict[str, int], slots: int, dtype, max_capacity: int, array_module: ModuleType = np, in_place: bool = False
    ):
        self.spec, self.max_capacity, self.array_module, self.in_place = spec, max_capacity, array_module, in_place
        self.shape, self.dtype = (slots, spec["num_kv_heads"], 0, spec["head_dim"]), dtype
        self.buffers = {name: array_module.zeros(self.shape, dtype=dtype) for name in past_names(spec)}
        self.lengths = np.zeros(slots, dtype=np.int64)
        self.tokens = [np.zeros(0, dtype=np.int64) for _ in range(slots)]

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2]

    def fit(self, needed: int, shrink: bool = True) -> None:
        """Make the capacity at least `needed` tokens (doubling it as often as that takes, at once: one copy, up to
        `max_capacity`), or with `shrink` cut it to twice what the rows use when they use less than a quarter of it
        (rows of ended requests lose the tokens past the new capacity)."""
        capacity = self.capacity
        if needed > capacity:
            new = max(capacity, MIN_SLOT_CAPACITY)
            while new < needed:
                new *= 2
            new = min(new, self.max_capacity)
        elif shrink and capacity > MIN_SLOT_CAPACITY and 4 * needed <= capacity:
            new = max(2 * needed, MIN_SLOT_CAPACITY)
        else:
            return
        np.minimum(self.lengths, new, out=self.lengths)
        self.buffers = resized(self.buffers, new, int(self.lengths.max()), self.array_module)
        self.tokens = [tokens[:new] for tokens in self.tokens]

    def prefix_lengths(self, tokens: np.ndarray) -> np.ndarray:
        """For each slot, how many of the first `tokens` it holds."""
        return np.array([common_prefix(held, tokens) for held in self.tokens], dtype=np.int64)

    def keep(self, slot: int, length: int) -> None:
        """Keep only the first `length` tokens of `slot` (the next tokens written go after them)."""
        self.lengths[slot] = min(length, self.lengths[slot])
        self.tokens[slot] = self.tokens[slot][: self.lengths[slot]]

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Give `target` the first `length` tokens of `source` (a copy on the cache's device)."""
        for buffer in self.buffers.values():
            buffer[target, :, :length] = buffer[source, :, :length]
        self.lengths[target] = length
        self.tokens[target] = self.tokens[source][:length].copy()

    def feeds(self, rows: range, attending: list[int], new_tokens: int) -> tuple[dict, dict]:
        """The cache inputs of one decoder run over the consecutive slots `rows`, feeding `new_tokens` tokens each,
        and the outputs to bind (in place: each `present.*` to its past's rows; else none). Slots in `attending` attend
        to their cached tokens and keep the new ones; the others' outputs are not kept (in place: they are left as
        they are; else they attend only to their new tokens)."""
        window = slice(rows.start, rows.stop)
        views = {name: buffer[window] for name, buffer in self.buffers.items()}
        if self.in_place:
            fed = np.zeros(len(rows), dtype=np.int64)
            fed[[slot - rows.start for slot in attending]] = new_tokens
            inputs = {**in_place_feeds(self.lengths[window], fed), **views}
            return inputs, dict(zip(present_names(self.spec), views.values()))
        mask = np.zeros((len(rows), self.capacity + new_tokens), dtype=np.int64)
        for slot in attending:
            mask[slot - rows.start, : self.lengths[slot]] = 1
        mask[:, self.capacity :] = 1
        return {"attention_mask": mask, **views}, {}

    def write(self, slots: list[int], rows: list[int], new: dict, tokens: np.ndarray) -> None:
        """Append the decoder's `new_key_values.*` of batch row `rows[i]` to slot `slots[i]`; `tokens` (`[len(slots),
        count]`) says what they are. One token per slot is written by one indexed copy per buffer. In place, the
        decoder wrote them already: only what the slots hold is recorded."""
        count = tokens.shape[1]
        if not self.in_place:
            self._copy_new(slots, rows, new, count)
        for slot, written in zip(slots, tokens):
            self.tokens[slot] = np.concatenate([self.tokens[slot], written])
        self.lengths[slots] += count

    def _copy_new(self, slots: list[int], rows: list[int], new: dict, count: int) -> None:
        """Copy `count` new tokens' keys and values of batch row `rows[i]` after the tokens of slot `slots[i]`."""
        if count == 1:
            xp = self.array_module
            targets, sources, positions = xp.asarray(slots), xp.asarray(rows), xp.asarray(self.lengths[slots])
            for past_name, new_name in zip(self.buffers, new_names(self.spec)):
                self.buffers[past_name][targets, :, positions] = new[new_name][sources, :, 0]
        else:
            for slot, row in zip(slots, rows):
                start = self.lengths[slot]
                for past_name, new_name in zip(self.buffers, new_names(self.spec)):
                    self.buffers[past_name][slot, :, start : start + count] = new[new_name][row]
