"""Token-by-token decoding over the decoder graph's KV cache (in the spirit of onnxruntime-genai's Generator)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from .backends import Session
from .kv_cache import KVCache, new_names
from .sampling import SearchOptions, choose_tokens, process_logits


class Generator:
    """Prefill a left-padded batch (optionally after the tokens already in `cache`), then one token per call.

    Positions follow transformers' `generate`: `cumsum(attention_mask) - 1` (0 on padding), then +1 per step.
    `attention_mask` covers the cached tokens and the new ones; `inputs_embeds` only the new ones. At most
    `max_new_tokens` tokens are generated, and never more than the context leaves (`max_length` minus the
    prompt, as transformers stops). After the prefill the cache is given room for every token the run may
    generate, so decode steps only write into it.
    """

    def __init__(
        self,
        decoder: Session,
        embed: Callable[[np.ndarray], np.ndarray],
        inputs_embeds: np.ndarray,
        attention_mask: np.ndarray,
        cache: KVCache,
        options: SearchOptions,
        prompt_ids: list[np.ndarray],
        eos_token_ids: list[int],
        max_new_tokens: int,
        max_length: int,
    ):
        self.decoder, self.embed, self.options = decoder, embed, options
        self.prompt_ids, self.max_length = prompt_ids, max_length
        room = max_length - attention_mask.shape[1]
        self.context_limited = max_new_tokens > room  # the context, not max_new_tokens, ends the run
        self.max_new_tokens = min(max_new_tokens, room)
        self.eos = np.array(eos_token_ids, dtype=np.int64)
        self.attention_mask = attention_mask
        positions = np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int64)
        self.positions = positions[:, -inputs_embeds.shape[1] :]
        self.cache = cache
        self._feeds = {"inputs_embeds": inputs_embeds, "position_ids": self.positions, **self._cache_feeds()}
        self.tokens: list[list[int]] = [[] for _ in range(len(attention_mask))]
        self.finished = np.zeros(len(attention_mask), dtype=bool)  # ended by end-of-sequence or a stop string
        self.rng = np.random.default_rng(options.seed)
        self.prefill_s = self.decode_s = 0.0
        self.decode_steps = 0

    @property
    def is_done(self) -> bool:
        return bool(self.finished.all()) or max(len(t) for t in self.tokens) >= self.max_new_tokens

    @property
    def context_full(self) -> bool:
        """Some row was cut by the model's context (rather than by max_new_tokens or a stop)."""
        return self.context_limited and not self.finished.all() and max(len(t) for t in self.tokens) >= self.max_new_tokens

    def finish_reason(self, row: int) -> str:
        """ "stop" (end-of-sequence or a stop string) or "length" (max_new_tokens, the context, or not finished)."""
        return "stop" if self.finished[row] else "length"

    def _cache_feeds(self) -> dict[str, np.ndarray]:
        cached = self.cache.length
        return self.cache.feeds(self.attention_mask[:, :cached], self.attention_mask[:, cached:])

    def finish(self, row: int) -> None:
        """Stop a row (a stop string appeared); its tokens so far are kept."""
        self.finished[row] = True

    def generate_next_token(self) -> np.ndarray:
        """Run the decoder once and choose each row's next token; returns them (`[B]`, finished rows included)."""
        started = time.perf_counter()
        prefill = not any(self.tokens)
        outputs = self.decoder.run(self._feeds)
        if prefill:
            self.cache.reserve(self.attention_mask.shape[1] + self.max_new_tokens)
        self.cache.append({name: outputs[name] for name in new_names(self.cache.spec)})
        histories = []  # only the repetition penalty reads them
        if self.options.repetition_penalty != 1.0:
            histories = [np.concatenate([ids, np.array(t, dtype=np.int64)]) for ids, t in zip(self.prompt_ids, self.tokens)]
        logits = outputs["logits"]
        if max(len(t) for t in self.tokens) < self.options.min_new_tokens:
            logits = logits.copy()
            logits[:, self.eos] = -np.inf
        scores = process_logits(logits, histories, self.options)
        next_tokens = choose_tokens(scores, self.options, self.rng)
        for row in np.flatnonzero(~self.finished):
            self.tokens[row].append(int(next_tokens[row]))
        self.finished |= np.isin(next_tokens, self.eos)
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((len(next_tokens), 1), np.int64)], axis=1)
        self.positions = self.positions[:, -1:] + 1
        self._feeds = {"inputs_embeds": self.embed(next_tokens[:, None]), "position_ids": self.positions, **self._cache_feeds()}
        elapsed = time.perf_counter() - started
        if prefill:
            self.prefill_s += elapsed
        else:
            self.decode_s += elapsed
            self.decode_steps += 1
        return next_tokens
