"""A multi-turn conversation that keeps its KV cache, so each turn prefills only what is new."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .errors import InputError
from .feature_cache import FeatureCache
from .image_processing import ImageInput
from .kv_cache import KVCache, common_prefix
from .pipeline import DecodingRun, GenerationResult, Pipeline
from .request import Request, media_list
from .video import VideoInput

DEFAULT_FEATURE_CACHE_MB = 256


class ChatSession:
    """System, user and assistant turns, with images and videos in any turn.

    Each turn renders the whole conversation with the chat template (so the prompt is exactly what
    `apply_chat_template` gives), tokenizes it, and reuses the KV cache of the longest prefix of tokens it
    already holds; only the rest is prefilled. Images and videos seen before come from a feature cache.
    A turn enters `messages` (its user message and the answer together) only once its answer is complete or
    its stream is closed; a turn that fails or is abandoned leaves the conversation as it was.
    Not safe to share between threads: a conversation is one sequence of turns.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        system: str | None = None,
        feature_cache_mb: float = DEFAULT_FEATURE_CACHE_MB,
        reuse_kv_cache: bool = True,
    ):
        if system is not None and not isinstance(system, str):
            raise InputError(f"the system prompt must be a string, got {type(system).__name__}")
        self.pipeline = pipeline
        self.messages: list[dict[str, Any]] = []
        if system is not None:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        self.feature_cache = FeatureCache(feature_cache_mb) if feature_cache_mb > 0 else None
        self.reuse_kv_cache = reuse_kv_cache
        self.last_result: GenerationResult | None = None
        self._cached_ids = np.zeros(0, dtype=np.int64)
        self._cache: KVCache | None = None

    def reset(self) -> None:
        """Forget the turns (and the KV cache); keep the system message and the feature cache."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self._cached_ids, self._cache = np.zeros(0, dtype=np.int64), None

    def _start(
        self, text: str, *, images: Sequence[ImageInput] = (), videos: Sequence[VideoInput] = (), **request: Any
    ) -> "ChatTurn":
        """Validate and prepare a turn and start decoding its answer; the conversation is not changed yet."""
        if not isinstance(text, str):
            raise InputError(f"a chat turn's text must be a string, got {type(text).__name__}")
        content = [{"type": "image", "image": image} for image in media_list("image", images)]
        content += [{"type": "video", "video": video} for video in media_list("video", videos)]
        message = {"role": "user", "content": [*content, {"type": "text", "text": text}]}
        turn = Request.build([*self.messages, message], **request)
        options = self.pipeline.search_options(turn.search)
        prepared = self.pipeline.prepare(turn)
        reuse = None
        if self.reuse_kv_cache and self._cache is not None:
            shared = min(common_prefix(self._cached_ids, prepared.input_ids), len(prepared.input_ids) - 1)
            if shared > 0:
                reuse = (shared, self._cache)
                self._cached_ids = self._cached_ids[:shared]  # the run overwrites the cache after these
        run = self.pipeline.run(
            [prepared], max_new_tokens=turn.max_new_tokens, search=options, feature_cache=self.feature_cache, reuse=reuse
        )
        return ChatTurn(self, message, run)

    def _commit(self, message: dict[str, Any], run: DecodingRun, result: GenerationResult) -> GenerationResult:
        """Add the user message and its answer to the conversation, and keep the KV cache of what was fed."""
        answer = {"role": "assistant", "content": [{"type": "text", "text": result.text}]}
        self.messages.extend([message, answer])
        fed = result.token_ids[:-1]  # the last token was chosen, never fed: it has no KV yet
        cache = run.generator.cache
        self._cached_ids = np.concatenate([run.requests[0].input_ids, np.array(fed, dtype=np.int64)])[: cache.length]
        self._cache = cache
        self.last_result = result
        return result

    def send(self, text: str, **request: Any) -> GenerationResult:
        """Add a user turn (its `images` and `videos` first, then the text) and return the assistant's answer.

        Other arguments (`num_frames`, `max_new_tokens`, `search` or search keywords) as for `Pipeline.start`.
        """
        turn = self._start(text, **request)
        for _ in turn:
            pass
        return turn.result

    def stream(self, text: str, **request: Any) -> "ChatTurn":
        """Like `send`, returning the turn: iterate it for the answer's text pieces. Bad input raises here,
        before iteration."""
        return self._start(text, **request)


class ChatTurn:
    """One turn's answer as it is decoded; iterate for text pieces. The turn enters the conversation when the
    answer completes, or when `close()` ends it early with the answer so far (finish reason "abort"); `result`
    is then set. Dropping it unfinished without `close()` leaves the conversation unchanged."""

    def __init__(self, session: ChatSession, message: dict[str, Any], run: DecodingRun):
        self._session, self._message, self._run = session, message, run
        self._pieces = self._decode()
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _decode(self) -> Iterator[str]:
        for _, piece in self._run:
            if piece:
                yield piece
        self.result = self._session._commit(self._message, self._run, self._run.results[0])

    def close(self) -> None:
        """End the answer here and record the turn with what was generated (nothing, if decoding never began)."""
        self._pieces.close()
        if self.result is None and self._run.generator is not None and self._run.streams:
            self.result = self._session._commit(self._message, self._run, self._run.partial_results()[0])
