"""The exportable modules: vision features, projector, video pooling, and the decoder with an explicit KV cache;
and each graph's input and output names, with its named dynamic axes.

Each wraps submodules of the loaded transformers model, so the exported graphs compute exactly what
transformers computes; only the KV cache plumbing and the attention mask are ours.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from ..runtime.kv_cache import new_names, past_names


class VisionFeatures(nn.Module):
    """Tiles `[N, 3, H, W]` -> selected hidden states `[N, T, C]` (feature layers concatenated, CLS per strategy)."""

    def __init__(self, vision_tower: nn.Module, feature_layers: list[int], select_strategy: str):
        super().__init__()
        self.vision_tower = vision_tower
        self.feature_layers = feature_layers
        self.select_strategy = select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        selected = torch.cat([hidden_states[i] for i in self.feature_layers], dim=-1)
        if self.select_strategy == "default":
            selected = selected[:, 1:]
        return selected


class Projector(nn.Module):
    """Vision features `[N, T, C]` -> language-model embeddings `[N, T, H]`."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.projector(image_features)


class VideoPooler(nn.Module):
    """LLaVA-NeXT-Video's spatial pooling of frame features `[T, g*g, C]` -> `[T, (g/s)^2, C']` (average, max or conv)."""

    def __init__(self, resampler: nn.Module):
        super().__init__()
        self.resampler = resampler

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.resampler(image_features)


SPLIT_CACHE_ATTENTION = "llava_rt_split_cache"
# The cache of the decoder forward being traced. The attention function reads its past from here rather than
# from its arguments: which keyword carries the cache to the attention function changes between transformers
# releases (5.24 stopped passing it on at all).
_ACTIVE_CACHE: ContextVar["_TensorCache"] = ContextVar("llava_rt_active_cache")


class _TensorCache:
    """The slice of transformers' `Cache` interface its attention layers use: `update` records the new keys and
    values (the graph's outputs) and hands them back unchanged; `split_cache_attention` reads the past itself."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.new: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new.append((key_states, value_states))
        return key_states, value_states


def split_cache_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention over `[past keys; new keys]` without building that concatenation.

    The past (a preallocated buffer the runtime owns, unused slots masked) is only read: scores against
    it and against the new keys are computed apart, softmaxed together, and the two value products summed.
    Query heads sharing a KV head are folded into one matmul, so the KV heads are never repeated either.
    The scores are cast to float32 before the (float32) mask is added, and the softmax runs in float32: in an
    fp16 model, fp16 scores plus the mask would overflow to -inf, and a fully masked row would give NaN.
    Returns `[B, S, heads, D]` like `eager_attention_forward`.
    """
    past_key, past_value = _ACTIVE_CACHE.get().past[module.layer_idx]
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, (heads // kv_heads) * length, dim)
    scores = torch.cat([grouped @ past_key.transpose(-1, -2), grouped @ key.transpose(-1, -2)], dim=-1) * scaling
    scores = scores.reshape(batch, heads, length, -1).float() + attention_mask
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    probs = probs.reshape(batch, kv_heads, (heads // kv_heads) * length, -1)
    past_length = past_key.shape[2]
    output = probs[..., :past_length] @ past_value + probs[..., past_length:] @ value
    return output.reshape(batch, heads, length, dim).transpose(1, 2), None


FP32_SOFTMAX_ATTENTION = "llava_rt_fp32_softmax"


def fp32_softmax_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention of the vision towers (as many KV heads as query heads), its softmax written in
    float32 in the exported graph: scores cast to float32, mask added, softmax, probabilities cast back.

    transformers' `softmax(scores, dtype=torch.float32)` computes the same in PyTorch, but the ONNX exporter
    (onnxscript 0.7's torchlib) writes it as an fp16 Softmax followed by a Cast to float32.
    Returns `[B, S, heads, D]` like `eager_attention_forward`.
    """
    scores = (query @ key.transpose(-1, -2) * scaling).float()
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def register_attention_functions() -> None:
    """Make `split_cache_attention` and `fp32_softmax_attention` selectable as attention implementations."""
    from transformers import AttentionInterface

    AttentionInterface.register(SPLIT_CACHE_ATTENTION, split_cache_attention)
    AttentionInterface.register(FP32_SOFTMAX_ATTENTION, fp32_softmax_attention)


@contextmanager
def _split_cache_attention(config, cache: _TensorCache):
    """Run the language model's attention layers with `split_cache_attention` over `cache` (the config's
    attention implementation is restored afterwards)."""
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = SPLIT_CACHE_ATTENTION
    token = _ACTIVE_CACHE.set(cache)
    try:
        yield
    finally:
        _ACTIVE_CACHE.reset(token)
        config._attn_implementation_internal = previous


def cache_keyword(module: nn.Module) -> str:
    """The keyword a decoder layer or model takes its cache by: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def attention_bias(attention_mask: torch.Tensor, position_ids: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Additive float32 mask `[B, 1, S, P+S]` over `[past slots; new tokens]`: causal, padding-aware, optionally
    sliding-window. Float32 whatever the model's dtype: it is added to scores cast to float32.

    Slots are compared by position (`cumsum(attention_mask) - 1`), not by index, so masked slots anywhere
    (left padding, unused capacity of a preallocated cache) do not count; for the tokens that attend, this
    is the same as transformers' index-based mask, since their positions are consecutive. Masked entries get
    float32's most negative finite value (as transformers does), so a fully masked row (a left-padding
    position) yields a uniform softmax instead of NaN.
    """
    key_pos = attention_mask.cumsum(-1) - 1
    query_pos = position_ids
    allowed = key_pos[:, None, :] <= query_pos[:, :, None]
    if sliding_window is not None:
        allowed = allowed & (query_pos[:, :, None] - key_pos[:, None, :] < sliding_window)
    allowed = allowed[:, None] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)


def layer_windows(config) -> list[int | None]:
    """Each decoder layer's sliding window: Mistral applies `sliding_window` to every layer, Qwen2 only to
    layers whose `layer_types` entry is "sliding_attention" (and sets the window to None when disabled)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return [None] * config.num_hidden_layers
    if layer_types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


class DecoderWithCache(nn.Module):
    """One step of the language model: embeddings + mask + positions + past KV -> last-token logits + the new KV.

    Serves both prefill (sequence length S, no past) and decode (S = 1). The past is the runtime's
    preallocated cache (`[B, kv_heads, capacity, D]`, unused slots masked by `attention_mask`), read in
    place; only the new tokens' keys and values come out, for the runtime to write into its buffers.
    Only the last position's logits are produced, so no `[B, S, vocab]` tensor is ever materialised; they are
    float32 whatever the model's dtype (they are sampled from).
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.windows = layer_windows(language_model.config)
        register_attention_functions()

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values: tuple[torch.Tensor, ...]):
        """`past_key_values` is flat: (layer 0 key, layer 0 value, layer 1 key, ...), each `[B, kv_heads, P, D]`."""
        pairs = list(zip(past_key_values[0::2], past_key_values[1::2]))
        cache = _TensorCache(pairs)
        biases = {window: attention_bias(attention_mask, position_ids, window) for window in set(self.windows)}
        hidden = inputs_embeds
        position_embeddings = self.language_model.rotary_emb(hidden, position_ids=position_ids)
        with _split_cache_attention(self.language_model.config, cache):
            for layer, window in zip(self.language_model.layers, self.windows):
                hidden = layer(
                    hidden,
                    attention_mask=biases[window],
                    position_embeddings=position_embeddings,
                    position_ids=position_ids,
                    use_cache=True,
                    **{cache_keyword(layer): cache},
                )
        hidden = self.language_model.norm(hidden[:, -1:, :])
        logits = self.lm_head(hidden)[:, 0, :].float()
        new = [tensor for pair in cache.new for tensor in pair]
        return (logits, *new)


@dataclass(frozen=True)
class GraphIO:
    """A graph's input and output names, and its named dynamic axes: `{tensor name: {axis: axis name}}`."""

    inputs: list[str]
    outputs: list[str]
    axes: dict[str, dict[int, str]]


VISION_IO = GraphIO(["pixel_values"], ["image_features"], {"pixel_values": {0: "tiles"}, "image_features": {0: "tiles"}})
PROJECTOR_IO = GraphIO(
    ["image_features"],
    ["image_embeds"],
    {"image_features": {0: "tiles", 1: "tokens"}, "image_embeds": {0: "tiles", 1: "tokens"}},
)
VIDEO_POOL_IO = GraphIO(
    ["image_features"],
    ["pooled_features"],
    {"image_features": {0: "frames"}, "pooled_features": {0: "frames"}},
)


def kv_cache_spec(text_config) -> dict[str, int]:
    """The decoder's KV cache layout (the manifest's `graphs.decoder.kv_cache`): layers, KV heads, head size."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return {"num_layers": text_config.num_hidden_layers, "num_kv_heads": text_config.num_key_value_heads, "head_dim": head_dim}


def decoder_io(kv_cache: dict[str, int]) -> GraphIO:
    """The decoder graph's inputs (embeddings, mask, positions, past keys and values) and outputs (logits, new ones)."""
    return GraphIO(
        ["inputs_embeds", "attention_mask", "position_ids", *past_names(kv_cache)],
        ["logits", *new_names(kv_cache)],
        {
            "inputs_embeds": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch"},
            **{name: {0: "batch", 2: "past_sequence"} for name in past_names(kv_cache)},
            **{name: {0: "batch", 2: "sequence"} for name in new_names(kv_cache)},
        },
    )


def decoder_example(hidden_size: int, kv_cache: dict[str, int], dtype: torch.dtype, generator: torch.Generator) -> tuple:
    """Random decoder inputs to trace the graph with: 3 new tokens after 5 past ones, batch 2 (distinct sizes > 1,
    so no axis gets specialised during tracing); float tensors in `dtype`."""
    batch, seq, past_len = 2, 3, 5
    embeds = torch.randn(batch, seq, hidden_size, generator=generator).to(dtype)
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    shape = (batch, kv_cache["num_kv_heads"], past_len, kv_cache["head_dim"])
    past = tuple(torch.randn(shape, generator=generator).to(dtype) for _ in range(2 * kv_cache["num_layers"]))
    return embeds, mask, positions, past
