"""Continuous batching: requests join and leave one running decoder batch between steps.

A `Scheduler` owns `max_concurrency` slots, each one row of the decoder's batch with its own KV length, positions,
search options, random generator, stop strings, token budget and text stream. A background thread repeats: admit
waiting requests into free slots, run one decode step over every decoding slot, then advance one request's prefill
by one unit: one vision-side graph run (`Pipeline.feature_steps`; with vision segments, one segment over one tile)
or one chunk of `prefill_chunk` prompt tokens. So neither a long prompt nor a large image stalls the running
streams for its whole prefill: each of their tokens waits for at most one unit. On the CPU, load the pipeline with
`vision_segments` (as llava-serve does): a whole vision run is one unit otherwise.

Each slot keeps the keys and values of its last request after it ends. A new request starts in the slot holding the
longest prefix of its prompt (same tokens, same images at the same places), or has that prefix copied from a busy
slot, and prefills only the rest; images entirely inside the reused prefix are not even run through the vision
graphs. Image and video features are shared by all requests through one `FeatureCache`.

Each row has its own positions, mask and cache, and each request draws from its own generator, so what else is in
the batch does not change a request's tokens: greedy output equals `Pipeline.generate`'s and a seeded answer is the
same alone or among others (tested; only kernels rounding differently at another batch size could break a near tie).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from queue import SimpleQueue

import numpy as np

from .backends import to_host
from .detokenize import TextStream
from .errors import InputError, QueueFull, SchedulerClosed
from .feature_cache import FeatureCache
from .kv_cache import SlotKVCache, writes_in_place
from .pipeline import GenerationResult, Pipeline, PreparedRequest
from .request import Request, check_positive_int
from .sampling import SearchOptions, next_token_ids

logger = logging.getLogger("llava_rt")
MEDIA_MARK = np.int64(1) << 62  # media positions' token keys are negative numbers below -2**62
MIN_PREFIX_TOKENS = 32  # a shorter cached prefix (a chat template's opening) is not worth giving a slot's contents up for


@dataclass(frozen=True)
class Event:
    """What one step produced for one request: new text (maybe empty), tokens generated (0 or 1), when
    (`time.monotonic()`), and on a request's last event its finish reason: "stop", "length", "abort" (cancelled
    or the scheduler closed) or "error" (then `error` says why)."""

    text: str
    tokens: int
    time: float
    finish_reason: str | None = None
    error: BaseException | None = None


class Completion:
    """A submitted request. Read its events as they come (`poll`, non-blocking; `events`, blocking), iterate it for its
    text pieces (blocking), or wait for the whole answer (`result`). `cancel` ends it at the next step."""

    def __init__(self, request: Request, prepared: PreparedRequest, options: SearchOptions, notify: Callable[[], None] | None):
        self.id = uuid.uuid4().hex
        self.request, self.prepared, self.options = request, prepared, options
        self.prompt_tokens = len(prepared.input_ids)
        self.created = time.monotonic()
        self.first_token_time: float | None = None
        self.token_ids: list[int] = []
        self.text_pieces: list[str] = []
        self.reused_tokens = 0
        self.token_keys: np.ndarray | None = None  # what each prompt position holds (see `SlotKVCache`)
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._notify = notify
        self._events: SimpleQueue[Event] = SimpleQueue()
        self._done = threading.Event()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the scheduler to end this request at its next step (finish reason "abort")."""
        self._cancelled.set()

    def poll(self) -> list[Event]:
        """The events produced since the last call (never blocks)."""
        events = []
        while not self._events.empty():
            events.append(self._events.get())
        return events

    def events(self) -> Iterator[Event]:
        """The events as they are produced (blocking), up to and including the last one."""
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def __iter__(self) -> Iterator[str]:
        """The answer's text pieces as they are produced (blocking); raises the error of a request that failed."""
        for event in self.events():
            if event.text:
                yield event.text
            if event.error is not None:
                raise event.error

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The whole answer, once the request has ended (waits up to `timeout` seconds; `TimeoutError` after)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished within {timeout} s")
        if self.error is not None:
            raise self.error
        elapsed = (self.first_token_time or self.created) - self.created
        decoding = time.monotonic() - (self.first_token_time or time.monotonic())
        return GenerationResult(
            text="".join(self.text_pieces),
            token_ids=list(self.token_ids),
            prompt=self.prepared.prompt,
            input_tokens=self.prompt_tokens,
            finish_reason=self.finish_reason or "abort",
            timings_ms={"time_to_first_token": elapsed * 1e3},
            tokens_per_s=(len(self.token_ids) - 1) / decoding if decoding > 0 and len(self.token_ids) > 1 else 0.0,
            reused_tokens=self.reused_tokens,
        )

    def _emit(self, event: Event) -> None:
        if event.tokens and self.first_token_time is None:
            self.first_token_time = event.time
        if event.text:
            self.text_pieces.append(event.text)
        if event.finish_reason is not None:
            self.finish_reason, self.error = event.finish_reason, event.error
        self._events.put(event)
        if event.finish_reason is not None:
            self._done.set()
        if self._notify is not None:
            try:
                self._notify()
            except Exception as exc:  # noqa: BLE001 - a caller's callback must not stop the scheduler
                logger.warning("a completion's notify callback failed: %s", exc)


@dataclass
class Slot:
    """One row of the decoder batch and the request it is serving (None when free)."""

    index: int
    completion: Completion | None = None
    prefill: Generator[None, None, None] | None = None  # the request's prefill, one unit per step; None once decoding
    prompt_left: int = 0  # prompt tokens its prefill has still to write: the cache keeps room for them
    stream: TextStream | None = None
    rng: np.random.Generator | None = None
    budget: int = 0  # how many tokens the request may generate (max_new_tokens, within the context)
    next_token: int = 0  # the last token chosen, fed at the next decode step
    freed_at: float = 0.0  # when its last request ended: the least recently used free slot is taken first
    history: list[int] = field(default_factory=list)  # prompt and answer ids, kept for the repetition penalty only


class Scheduler:
    """Serves many requests at once over one pipeline. `submit` from any thread; a background thread (`start`) runs
    the model. `max_concurrency` requests run at once (the decoder batch's rows); `max_queue` more may wait, beyond
    that `submit` raises `QueueFull`. Safe to share between threads; the pipeline can still be used directly too."""

    def __init__(
        self,
        pipeline: Pipeline,
        max_concurrency: int = 4,
        max_queue: int = 64,
        prefill_chunk: int = 32,
        feature_cache_mb: float = 512.0,
    ):
        max_concurrency = check_positive_int("max_concurrency", max_concurrency)
        prefill_chunk = check_positive_int("prefill_chunk", prefill_chunk)
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise InputError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if pipeline.plans is not None:
            pipeline.plans.check_request(batch=max_concurrency)
        self.pipeline, self.max_queue = pipeline, max_queue
        self.prefill_chunk = prefill_chunk
        self.feature_cache = FeatureCache(feature_cache_mb)
        decoder = pipeline.sessions["decoder"]
        self.binding, self.xp, self.outputs = decoder.bind(), decoder.array_module, [o.name for o in decoder.outputs]
        spec = pipeline.manifest["graphs"]["decoder"]["kv_cache"]
        kv_dtype = pipeline.input_dtype("decoder", "past_key_values.0.key")
        in_place = writes_in_place([value.name for value in decoder.inputs])
        variant = pipeline.bundle.variant("decoder", pipeline.selection.variants["decoder"])
        if (variant["precision"], variant["form"]) == ("int8", "onnxruntime") and "activation_scales" not in variant:
            logger.warning(
                "%s quantizes its activations with one scale per tensor (written by an earlier llava-export): a "
                "request's tokens can change with the other requests in its batch; export the bundle again for one "
                "scale per token",
                variant["file"],
            )
        self.cache = SlotKVCache(spec, max_concurrency, kv_dtype, pipeline.max_length, self.xp, in_place)
        self.slots = [Slot(index) for index in range(max_concurrency)]
        self.eos = np.array(pipeline.tokens["eos_token_ids"], dtype=np.int64)
        self._waiting: deque[Completion] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.prefix_cache_hits = self.prefix_cache_tokens = self.generated_tokens = 0

    # ---- the caller's side ---------------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        """Start the background thread (once)."""
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llava-rt-scheduler", daemon=True)
                self._thread.start()
        return self

    def submit(
        self, request: Request, prepared: PreparedRequest | None = None, notify: Callable[[], None] | None = None
    ) -> Completion:
        """Queue a request (prepared here unless `prepared` is given: bad input raises `InputError` now). `notify`
        is called, from the scheduler's thread, whenever the completion has new events. Raises `QueueFull` when
        `max_concurrency + max_queue` requests are already running or waiting."""
        options = self.pipeline.search_options(request.search)
        prepared = prepared if prepared is not None else self.pipeline.prepare(request)
        if self.pipeline.plans is not None:
            context = min(len(prepared.input_ids) + request.max_new_tokens, self.pipeline.max_length)
            self.pipeline.plans.check_request(context=context)
        completion = Completion(request, prepared, options, notify)
        completion.token_keys = self._token_keys(prepared)  # hashes the pixels (once, see `Media.digest`): not under the lock
        with self._wake:
            if self._closing:
                raise SchedulerClosed("the scheduler is closed")
            running = sum(slot.completion is not None for slot in self.slots)
            if running + len(self._waiting) >= len(self.slots) + self.max_queue:
                raise QueueFull(f"{running} requests are running and {len(self._waiting)} waiting, the most this server takes")
            self._waiting.append(completion)
            self._wake.notify()
        self.start()
        return completion

    def generate(self, messages=None, /, **request) -> GenerationResult:
        """Answer one request through the scheduler (arguments as for `Pipeline.start`)."""
        return self.submit(Request.build(messages, **request)).result()

    def stats(self) -> dict[str, int]:
        """Counters for monitoring: running and waiting requests, tokens generated, feature- and prefix-cache hits."""
        with self._wake:
            return {
                "running": sum(slot.completion is not None for slot in self.slots),
                "queued": len(self._waiting),
                "generated_tokens": self.generated_tokens,
                "feature_cache_hits": self.feature_cache.hits,
                "feature_cache_misses": self.feature_cache.misses,
                "prefix_cache_hits": self.prefix_cache_hits,
                "prefix_cache_tokens": self.prefix_cache_tokens,
            }

    def close(self) -> None:
        """Stop the thread; requests still running or waiting end with the finish reason "abort"."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        for slot in self.slots:
            if slot.completion is not None:
                self._finish(slot, "abort")
        while self._waiting:
            self._waiting.popleft()._emit(Event("", 0, time.monotonic(), "abort"))

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the scheduler thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._waiting and all(slot.completion is None for slot in self.slots):
                    self._wake.wait()
                if self._closing:
                    return
                admitted = self._admit()
            for slot in admitted:
                self._start(slot)
            for slot in self.slots:
                if slot.completion is not None and slot.completion.cancelled:
                    self._finish(slot, "abort")
            decoding = [slot for slot in self.slots if slot.completion is not None and slot.prefill is None]
            if decoding:
                self._guarded(decoding, self._decode_step)
            prefilling = [slot for slot in self.slots if slot.prefill is not None]
            if prefilling:
                self._guarded([min(prefilling, key=lambda slot: slot.completion.created)], self._prefill_step)

    def _prefill_step(self, slots: list[Slot]) -> None:
        """Advance the oldest request's prefill by one unit."""
        next(slots[0].prefill, None)

    def _admit(self) -> list[Slot]:
        """Drop cancelled waiting requests and move the others into free slots (under the lock); the slots taken."""
        for completion in [c for c in self._waiting if c.cancelled]:
            self._waiting.remove(completion)
            completion._emit(Event("", 0, time.monotonic(), "abort"))
        admitted = []
        while self._waiting and any(slot.completion is None for slot in self.slots):
            completion = self._waiting.popleft()
            slot = self._place(completion)
            slot.completion = completion
            admitted.append(slot)
        return admitted

    def _place(self, completion: Completion) -> Slot:
        """The free slot for a request: the one holding the longest prefix of its prompt (prefixes under
        `MIN_PREFIX_TOKENS` do not count), then the one keeping the decode steps' rows fewest, then the least recently
        used. A busy slot holding a longer prefix gives it by a copy. At least one prompt token is left to feed."""
        keys = completion.token_keys
        held = self.cache.prefix_lengths(keys)
        held[held < MIN_PREFIX_TOKENS] = 0
        busy = [slot.index for slot in self.slots if slot.completion is not None]

        def rank(slot: Slot) -> tuple:
            rows = max(busy + [slot.index]) - min(busy + [slot.index]) + 1  # the decode steps' rows with it busy
            return -held[slot.index], rows, slot.freed_at, slot.index

        slot = min((slot for slot in self.slots if slot.completion is None), key=rank)
        source = int(np.argmax(held))
        length = min(int(held[source]), len(keys) - 1)
        if held[source] > held[slot.index] and length:
            self.cache.copy_prefix(source, slot.index, length)
        self.cache.keep(slot.index, length)
        if length:
            self.prefix_cache_hits += 1
            self.prefix_cache_tokens += length
        completion.reused_tokens = length
        return slot

    def _token_keys(self, prepared: PreparedRequest) -> np.ndarray:
        """What each prompt position holds: its token id, or for an image or video token its media's identity."""
        keys = prepared.input_ids.copy()
        for media, (start, stop) in zip(prepared.media, self._media_spans(prepared)):
            keys[start:stop] = -MEDIA_MARK - int(media.digest[:15], 16)
        return keys

    def _media_spans(self, prepared: PreparedRequest) -> list[tuple[int, int]]:
        """The `[start, stop)` prompt positions of each image and video, in order."""
        ids, spans = prepared.input_ids, []
        positions = np.flatnonzero(np.isin(ids, [self.pipeline.tokens[f"{m.kind}_token_id"] for m in prepared.media]))
        offset = 0
        for media in prepared.media:
            start = int(positions[offset])
            spans.append((start, start + media.num_tokens))
            offset += media.num_tokens
        return spans

    def _start(self, slot: Slot) -> None:
        completion = slot.completion
        options = completion.options
        slot.stream = TextStream(self.pipeline.tokenizer, options.stop)
        slot.rng = np.random.default_rng(options.seed)
        slot.budget = min(completion.request.max_new_tokens, self.pipeline.max_length - completion.prompt_tokens)
        slot.history = completion.prepared.input_ids.tolist() if options.repetition_penalty != 1.0 else []
        slot.prefill = self._prefill(slot)

    def _guarded(self, slots: list[Slot], work: Callable[[list[Slot]], object]) -> None:
        """Run one unit of work for `slots`; if it fails, those requests end with the error and the others go on."""
        try:
            work(slots)
        except Exception as exc:  # noqa: BLE001 - one failing request must not stop the others
            logger.warning("a request failed: %s", exc)
            for slot in slots:
                if slot.completion is not None:
                    self._finish(slot, "error", exc)

    def _prefill(self, slot: Slot) -> Generator[None, None, None]:
        """The request's prefill as steps: its media features (skipping media inside the reused prefix), then its
        prompt in chunks after the reused prefix; the last chunk's logits give the first token."""
        pipeline, prepared = self.pipeline, slot.completion.prepared
        reused = int(self.cache.lengths[slot.index])
        spans = self._media_spans(prepared)
        needed = [i for i, (_, stop) in enumerate(spans) if stop > reused]
        computed = []
        if needed:
            computed = yield from pipeline.feature_steps([prepared.media[i] for i in needed], self.feature_cache)
        hidden = pipeline.embed_tokens.shape[1]
        features = [np.zeros((m.num_tokens, hidden), pipeline.embeds_dtype) for m in prepared.media]
        for i, value in zip(needed, computed):
            features[i] = value
        embeds, _ = pipeline._inputs_embeds([prepared], features)
        keys = slot.completion.token_keys
        total = len(keys)
        # Room for the whole prompt at once: growing chunk by chunk would copy every slot's cache at each doubling,
        # each copy a stall of every stream (the last of them 0.7 s for a 1500-token prompt beside four streams).
        slot.prompt_left = total - reused
        self._fit({})
        for start in range(reused, total, self.prefill_chunk):
            stop = min(start + self.prefill_chunk, total)
            rows = range(slot.index, slot.index + 1)
            feeds, presents = self.cache.feeds(rows, [slot.index], stop - start)
            positions = np.arange(start, stop, dtype=np.int64)[None]
            outputs = self._run({"inputs_embeds": embeds[:, start:stop], "position_ids": positions, **feeds}, presents)
            self.cache.write([slot.index], [0], outputs, keys[None, start:stop])
            slot.prompt_left = total - stop
            if stop < total:
                yield
        slot.prefill = None
        self._advance([slot], outputs["logits"], [0])

    def _fit(self, extra: dict[int, int]) -> None:
        """Size the cache for the busy slots' tokens plus `extra[slot]` more about to be written (at least the prompt
        a slot's prefill has still to write)."""
        busy = [slot for slot in self.slots if slot.completion is not None]
        needed = max(int(self.cache.lengths[s.index]) + max(extra.get(s.index, 0), s.prompt_left) for s in busy)
        # Each resize copies every slot's rows while every stream waits (0.2-0.6 s on the 2-core VM, most of it first
        # touching the new buffers). A cache written in place costs no compute for its capacity, so it keeps the
        # largest it has grown to, as servers that reserve their cache up front do; a masked one attends over all of
        # it, so it shrinks.
        self.cache.fit(needed, shrink=not self.cache.in_place)

    def _run(self, feeds: dict, bound: dict) -> dict:
        """One decoder run; the outputs in `bound` go to the arrays given there (an in-place decoder's cache), the
        others are allocated by the backend for this run's shapes."""
        for name, value in feeds.items():
            self.binding.input(name, value)
        for name in self.outputs:
            self.binding.output(name, bound.get(name))
        return self.binding.run()

    def _decode_step(self, decoding: list[Slot]) -> None:
        """Feed every decoding slot its last token in one batch over the consecutive slots from the first decoding
        one to the last (the others in between fed a dummy token, their outputs dropped), write the new keys and
        values, choose the next tokens."""
        indices = [slot.index for slot in decoding]
        rows = range(min(indices), max(indices) + 1)
        batch_rows = [index - rows.start for index in indices]
        self._fit(extra={index: 1 for index in indices})
        tokens = np.zeros((len(rows), 1), dtype=np.int64)
        positions = np.zeros((len(rows), 1), dtype=np.int64)
        for slot, row in zip(decoding, batch_rows):
            tokens[row, 0] = slot.next_token
            positions[row, 0] = self.cache.lengths[slot.index]
        feeds, presents = self.cache.feeds(rows, indices, 1)
        outputs = self._run({"inputs_embeds": self.pipeline._embed(tokens), "position_ids": positions, **feeds}, presents)
        self.cache.write(indices, batch_rows, outputs, tokens[batch_rows])
        self._advance(decoding, outputs["logits"], batch_rows)

    def _advance(self, slots: list[Slot], logits, rows: list[int]) -> None:
        """Choose each slot's next token from its row of `logits`, stream its text, end it when it is done."""
        now = time.monotonic()
        chosen = self._choose(slots, logits, rows)
        self.generated_tokens += len(chosen)
        for slot, token in zip(slots, chosen):
            completion = slot.completion
            completion.token_ids.append(token)
            if slot.history:
                slot.history.append(token)
            slot.next_token = token
            text = slot.stream.push(token)
            if token in self.eos or slot.stream.stopped:
                self._finish(slot, "stop", text=text, tokens=1)
            elif len(completion.token_ids) >= slot.budget:
                self._finish(slot, "length", text=text, tokens=1)
            else:
                completion._emit(Event(text, 1, now))

    def _choose(self, slots: list[Slot], logits, rows: list[int]) -> list[int]:
        """Greedy rows by one argmax on the device (end-of-sequence masked for those holding it back); the others
        by their own search options and generator, on the host."""
        chosen: dict[int, int] = {}
        greedy = [i for i, slot in enumerate(slots) if not self._samples(slot.completion.options)]
        if greedy:
            xp = self.xp
            scores = logits[xp.asarray([rows[i] for i in greedy])]  # a copy: the row order of `greedy`
            held = [j for j, i in enumerate(greedy) if self._holds_eos(slots[i])]
            if held:
                scores[xp.asarray(held)[:, None], xp.asarray(self.eos)[None, :]] = -np.inf
            chosen.update(zip(greedy, to_host(xp.argmax(scores, axis=-1)).tolist()))
        for i, slot in enumerate(slots):
            if i not in chosen:
                options = slot.completion.options
                history = [np.array(slot.history, dtype=np.int64)] if slot.history else []
                row = to_host(logits[rows[i] : rows[i] + 1])
                chosen[i] = int(next_token_ids(row, history, options, slot.rng, self.eos if self._holds_eos(slot) else None)[0])
        return [chosen[i] for i in range(len(slots))]

    @staticmethod
    def _samples(options: SearchOptions) -> bool:
        """Whether choosing needs the logits on the host: sampling, or the repetition penalty."""
        return options.do_sample or options.repetition_penalty != 1.0

    @staticmethod
    def _holds_eos(slot: Slot) -> bool:
        return len(slot.completion.token_ids) < slot.completion.options.min_new_tokens

    def _finish(self, slot: Slot, reason: str, error: BaseException | None = None, text: str = "", tokens: int = 0) -> None:
        """End the slot's request: release its remaining text and free the slot (its cache stays for reuse)."""
        completion = slot.completion
        if reason != "error":
            text += slot.stream.flush() if slot.stream is not None else ""
        if reason in ("abort", "error") and slot.prefill is not None:
            slot.prefill.close()
        slot.completion, slot.prefill, slot.stream, slot.prompt_left = None, None, None, 0
        slot.freed_at = time.monotonic()
        completion._emit(Event(text, tokens, time.monotonic(), reason, error))
