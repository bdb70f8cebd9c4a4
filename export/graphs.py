"""The three exportable modules: vision features, projector, and the decoder with an explicit KV cache.

Each wraps submodules of the loaded transformers model, so the exported graphs compute exactly what
transformers computes; only the KV cache plumbing and the attention mask are ours.
"""

from __future__ import annotations

import torch
from torch import nn


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


class _TensorCache:
    """The slice of transformers' `Cache` interface its attention layers use, backed by plain tensors."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        past_key, past_value = self.past[layer_idx]
        key = torch.cat([past_key, key_states], dim=-2)
        value = torch.cat([past_value, value_states], dim=-2)
        self.present.append((key, value))
        return key, value


def attention_bias(attention_mask: torch.Tensor, query_length: int, sliding_window: int | None, dtype) -> torch.Tensor:
    """Additive mask `[B, 1, S, P+S]`: causal, padding-aware and optionally sliding-window.

    Masked entries get the dtype's most negative finite value (as transformers does), so a fully
    masked row (a left-padding position) yields a uniform softmax instead of NaN.
    """
    total = attention_mask.shape[-1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(query_length, device=attention_mask.device) + (total - query_length)
    allowed = key_pos[None, :] <= query_pos[:, None]
    if sliding_window is not None:
        allowed = allowed & (query_pos[:, None] - key_pos[None, :] < sliding_window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


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
    """One step of the language model: embeddings + mask + positions + past KV -> last-token logits + present KV.

    Serves both prefill (sequence length S, past length 0) and decode (S = 1). Only the last
    position's logits are produced, so no `[B, S, vocab]` tensor is ever materialised.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.windows = layer_windows(language_model.config)

    def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values: tuple[torch.Tensor, ...]):
        """`past_key_values` is flat: (layer 0 key, layer 0 value, layer 1 key, ...), each `[B, kv_heads, P, D]`."""
        pairs = list(zip(past_key_values[0::2], past_key_values[1::2]))
        cache = _TensorCache(pairs)
        biases = {
            window: attention_bias(attention_mask, inputs_embeds.shape[1], window, inputs_embeds.dtype)
            for window in set(self.windows)
        }
        hidden = inputs_embeds
        position_embeddings = self.language_model.rotary_emb(hidden, position_ids=position_ids)
        for layer, window in zip(self.language_model.layers, self.windows):
            hidden = layer(
                hidden,
                attention_mask=biases[window],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
        hidden = self.language_model.norm(hidden[:, -1:, :])
        logits = self.lm_head(hidden)[:, 0, :]
        present = [tensor for pair in cache.present for tensor in pair]
        return (logits, *present)
