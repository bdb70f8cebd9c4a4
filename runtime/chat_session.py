"""A multi-turn conversation that keeps its KV cache, so each turn prefills only what is new."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .errors import InputError
from .feature_cache import FeatureCache
from .image_processing import ImageInput
from .kv_cache import KVCache
from .pipeline import DEFAULT_NUM_FRAMES, DecodingRun, GenerationResult, Pipeline
from .sampling import SearchOptions
from .video import VideoInput

DEFAULT_FEATURE_CACHE_MB = 256


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(a[:n] != b[:n])
    return int(mismatch[0]) if len(mismatch) else n


class ChatSession:
    """System, user and assistant turns, with images and videos in any turn.

    Each turn renders the whole conversation with the chat template (so the prompt is exactly what
    `apply_chat_template` gives), tokenizes it, and reuses the KV cache of the longest prefix of tokens it
    already holds; only the rest is prefilled. Images and videos seen before come from a feature cache.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        system: str | None = None,
        feature_cache_mb: float = DEFAULT_FEATURE_CACHE_MB,
        reuse_kv_cache: bool = True,
    ):
        self.pipeline = pipeline
        self.messages: list[dict[str, Any]] = []
        if system is not None:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        self.feature_cache = FeatureCache(feature_cache_mb) if feature_cache_mb > 0 else None
        self.reuse_kv_cache = reuse_kv_cache
        self._cached_ids = np.zeros(0, dtype=np.int64)
        self._cache: KVCache | None = None

    def reset(self) -> None:
        """Forget the turns (and the KV cache); keep the system message and the feature cache."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self._cached_ids, self._cache = np.zeros(0, dtype=np.int64), None

    def _start(
        self,
        text: str,
        *,
        images: Sequence[ImageInput] = (),
        videos: Sequence[VideoInput] = (),
        num_frames: int = DEFAULT_NUM_FRAMES,
        max_new_tokens: int = 128,
        search: SearchOptions | None = None,
        **search_options,
    ) -> DecodingRun:
        if not isinstance(text, str):
            raise InputError("a chat turn's text must be a string")
        content = [{"type": "image", "image": image} for image in images]
        content += [{"type": "video", "video": video} for video in videos]
        self.messages.append({"role": "user", "content": [*content, {"type": "text", "text": text}]})
        try:
            options = self.pipeline.search_options(search, **search_options)
            request = self.pipeline.prepare(self.messages, num_frames=num_frames)
        except Exception:
            self.messages.pop()
            raise
        reuse = None
        if self.reuse_kv_cache and self._cache is not None:
            shared = min(_common_prefix(self._cached_ids, request.input_ids), len(request.input_ids) - 1)
            if shared > 0:
                reuse = (shared, self._cache)
                self._cached_ids = self._cached_ids[:shared]  # the run overwrites the cache after these
        return self.pipeline.run(
            [request], max_new_tokens=max_new_tokens, search=options, feature_cache=self.feature_cache, reuse=reuse
        )

    def _finish(self, run: DecodingRun) -> GenerationResult:
        result = run.results[0]
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})
        fed = result.token_ids[:-1]  # the last token was chosen, never fed: it has no KV yet
        self._cached_ids = np.concatenate([run.requests[0].input_ids, np.array(fed, dtype=np.int64)])
        self._cache = run.generator.cache
        return result

    def send(self, text: str, **options) -> GenerationResult:
        """Add a user turn (its `images` and `videos` first, then the text) and return the assistant's answer.

        Options: `images`, `videos`, `num_frames`, `max_new_tokens`, `search` and search keywords, as for
        `Pipeline.start`.
        """
        run = self._start(text, **options)
        for _ in run:
            pass
        return self._finish(run)

    def stream(self, text: str, **options) -> Iterator[str]:
        """Like `send`, yielding the answer as it is decoded; the turn is recorded when the stream ends."""
        run = self._start(text, **options)
        return self._stream(run)

    def _stream(self, run: DecodingRun) -> Iterator[str]:
        for _, piece in run:
            if piece:
                yield piece
        self.last_result = self._finish(run)
