"""Token-by-token decoding over the decoder graph's KV cache (in the spirit of onnxruntime-genai's Generator)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from .backends import Session, to_host
from .kv_cache import KVCache, new_names
from .sampling import SearchOptions, next_token_ids

# Prompt tokens per prefill run on the CPU. The OneVision-0.5B preset's int4 decoder through the Pipeline (1000-token
# prompt, 2 threads) peaked at 1223 MiB in one run, 992 in runs of 512, 727 of 256 and 662 of 128, prefilling in
# 5.1, 5.0, 4.8 and 5.0 s. A GPU's memory is not that tight and it prefers one long run: there the default is 0.
PREFILL_CHUNK = 128


class Generator:
    """Prefill a left-padded batch (optionally after the tokens already in `cache`) in runs of at most
    `prefill_chunk` tokens, then one token per call.

    Positions follow transformers' `generate`: `cumsum(attention_mask) - 1` (0 on padding), then +1 per step.
    `attention_mask` covers the cached tokens and the new ones; `inputs_embeds` only the new ones. At most
    `max_new_tokens` tokens are generated, and never more than the context leaves (`max_length` minus the
    prompt, as transformers stops). Before the prefill the cache is given room for the prompt and every token the
    run may generate, so prefill runs and decode steps only write into it.

    The decoder runs through a `Binding` on its device, the same loop on the CPU (numpy) and on a GPU (cupy): the
    cache buffers are bound as the past (rebound only when they grow), each step's outputs go to arrays allocated
    once after the prefill, and the new keys and values are written into the cache where it lives. Per step only
    the embeddings, mask and positions go to the device, and only the chosen token ids come back (greedy search
    takes the argmax on the device); sampling, the repetition penalty and a held-back EOS bring the last logits
    to the host. Decode steps have fixed shapes and addresses within a run (the cache capacity is reserved before
    the prefill), but the prefill shares the session, so CUDA graph capture is not used.
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
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        self.embed, self.options = embed, options
        self.binding, self.xp = decoder.bind(), decoder.array_module
        self.output_names = [output.name for output in decoder.outputs]
        self.greedy = not options.do_sample and options.repetition_penalty == 1.0
        self.prompt_ids, self.max_length = prompt_ids, max_length
        room = max_length - attention_mask.shape[1]
        self.context_limited = max_new_tokens > room  # the context, not max_new_tokens, ends the run
        self.max_new_tokens = min(max_new_tokens, room)
        self.eos = np.array(eos_token_ids, dtype=np.int64)
        self.attention_mask = attention_mask
        positions = np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int64)
        self.positions = positions[:, -inputs_embeds.shape[1] :]
        self.cache = cache
        self.prompt_embeds, self.prefill_chunk = inputs_embeds, prefill_chunk
        self._feeds: dict = {}
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

    def _cache_feeds(self, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The past and the attention mask of a run feeding the tokens of `mask` after the cached ones (an in-place
        decoder's cache inputs are made by `_run`)."""
        if self.cache.in_place:
            return {}
        cached = self.cache.length
        return self.cache.feeds(mask[:, :cached], mask[:, cached:])

    def _run(self, feeds: dict, rows: slice = slice(None)) -> dict:
        """One decoder run over the batch rows `rows` (all but for a row-by-row prefill); the cache records it."""
        count = feeds["inputs_embeds"].shape[1]
        if self.cache.in_place:
            inputs, presents = self.cache.in_place_run(rows, count)
            feeds = {**feeds, **inputs}
            for name, value in presents.items():
                self.binding.output(name, value)
        for name, value in feeds.items():
            self.binding.input(name, value)
        outputs = self.binding.run()
        if self.cache.in_place:
            self.cache.advance(rows, count)
        else:
            self.cache.append({name: outputs[name] for name in new_names(self.cache.spec)})
        return outputs

    def _prefill(self) -> dict:
        """Feed the prompt in runs of at most `prefill_chunk` tokens (all at once when 0) and reserve the cache for
        the whole run; returns the last run's outputs. Shorter runs bound the prefill's activations (the attention
        scores grow with the square of the run's length) and keep its working set small."""
        count = self.prompt_embeds.shape[1]
        self.cache.reserve(self.attention_mask.shape[1] + self.max_new_tokens)
        prompt_mask = self.attention_mask[:, self.attention_mask.shape[1] - count :]
        if self.cache.in_place and len(prompt_mask) > 1 and not prompt_mask.all():
            return self._prefill_rows(prompt_mask.astype(bool))
        return self._prefill_rows_of(slice(None), self.prompt_embeds, self.positions)

    def _prefill_rows(self, prompt_mask: np.ndarray) -> dict:
        """An in-place decoder's prefill of a left-padded batch: each row alone, without its padding (a row's cache
        holds no padding); the logits of each row's last run are gathered."""
        logits = []
        for row, real in enumerate(prompt_mask):
            rows = slice(row, row + 1)
            embeds, positions = self.prompt_embeds[rows][:, real], self.positions[rows][:, real]
            logits.append(self._prefill_rows_of(rows, embeds, positions)["logits"])
        return {"logits": self.xp.concatenate(logits)}

    def _prefill_rows_of(self, rows: slice, embeds: np.ndarray, positions: np.ndarray) -> dict:
        """Feed `embeds` at `positions` to the batch rows `rows` in runs of at most `prefill_chunk` tokens; returns
        the last run's outputs."""
        count = embeds.shape[1]
        start = self.attention_mask.shape[1] - count  # the cached tokens' mask comes first
        chunk = self.prefill_chunk or count
        for begin in range(0, count, chunk):
            end = min(begin + chunk, count)
            for name in self.output_names:  # allocated by the backend for each prefill run; the steps' once, after it
                if name == "logits" or not self.cache.in_place:
                    self.binding.output(name)
            mask = self.attention_mask[:, : start + end]
            feeds = {"inputs_embeds": embeds[:, begin:end], "position_ids": positions[:, begin:end]}
            outputs = self._run({**feeds, **self._cache_feeds(mask)}, rows)
        return outputs

    def _allocate_step_outputs(self, prefill: dict) -> None:
        """Bind each decode step's outputs (last-token logits, one token's keys and values) to arrays of their own
        (an in-place decoder's keys and values go to the cache, bound by `_run`)."""
        for name, value in prefill.items():
            if name == "logits":
                self.binding.output(name, self.xp.empty(value.shape, dtype=value.dtype))
            elif not self.cache.in_place:
                self.binding.output(name, self.xp.empty((*value.shape[:2], 1, *value.shape[3:]), dtype=value.dtype))

    def _choose(self, logits) -> np.ndarray:
        """Each row's next token (`[B]`) from the last-token logits, on the host."""
        holding_eos = max(len(t) for t in self.tokens) < self.options.min_new_tokens
        if self.greedy and not holding_eos:
            return to_host(self.xp.argmax(logits, axis=-1)).astype(np.int64)
        histories = []  # only the repetition penalty reads them
        if self.options.repetition_penalty != 1.0:
            histories = [np.concatenate([ids, np.array(t, dtype=np.int64)]) for ids, t in zip(self.prompt_ids, self.tokens)]
        return next_token_ids(to_host(logits), histories, self.options, self.rng, self.eos if holding_eos else None)

    def finish(self, row: int) -> None:
        """Stop a row (a stop string appeared); its tokens so far are kept."""
        self.finished[row] = True

    def generate_next_token(self) -> np.ndarray:
        """Run the decoder once and choose each row's next token; returns them (`[B]`, finished rows included)."""
        started = time.perf_counter()
        prefill = not any(self.tokens)
        if prefill:
            outputs = self._prefill()
            self._allocate_step_outputs(outputs)
        else:
            outputs = self._run(self._feeds)
        next_tokens = self._choose(outputs["logits"])
        for row in np.flatnonzero(~self.finished):
            self.tokens[row].append(int(next_tokens[row]))
        self.finished |= np.isin(next_tokens, self.eos)
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((len(next_tokens), 1), np.int64)], axis=1)
        self.positions = self.positions[:, -1:] + 1
        step = {"inputs_embeds": self.embed(next_tokens[:, None]), "position_ids": self.positions}
        self._feeds = {**step, **self._cache_feeds(self.attention_mask)}
        elapsed = time.perf_counter() - started
        if prefill:
            self.prefill_s += elapsed
        else:
            self.decode_s += elapsed
            self.decode_steps += 1
        return next_tokens
