"""Search options and logits processing equal to transformers' processors and warpers, in transformers' order:
repetition penalty, then (when sampling) temperature, top-k, top-p, min-p."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, fields, replace
from numbers import Integral, Real
from typing import Any

import numpy as np

from .errors import InputError

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")
_REAL_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty")
_INTEGER_FIELDS = ("top_k", "seed", "min_new_tokens")


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SearchOptions:
    """How the next token is chosen. `None` fields fall back to the bundle's generation config, then to
    transformers' `GenerationConfig` defaults (temperature 1, top-k 50, top-p 1, no min-p, penalty 1).
    Types are checked when built (`InputError`); ranges when resolved against the generation config.
    Temperature 0 means greedy, as in the OpenAI API and llama.cpp."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    min_new_tokens: int = 0  # end-of-sequence tokens are not chosen before this many new tokens (as transformers')
    stop: tuple[str, ...] | str = ()  # one string or several

    def __post_init__(self) -> None:
        for name in _REAL_FIELDS:
            value = getattr(self, name)
            if value is not None and not _is_real(value):
                raise InputError(f"{name} must be a number, got {reprlib.repr(value)}")
        for name in _INTEGER_FIELDS:
            value = getattr(self, name)
            if value is not None and not _is_integer(value):
                raise InputError(f"{name} must be an integer, got {reprlib.repr(value)}")
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise InputError(f"do_sample must be True or False, got {reprlib.repr(self.do_sample)}")
        if self.seed is not None and self.seed < 0:
            raise InputError(f"seed must be an integer >= 0, got {self.seed}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or any(not isinstance(s, str) or not s for s in stop):
            raise InputError(f"stop must be a non-empty string or a list of them, got {reprlib.repr(self.stop)}")
        object.__setattr__(self, "stop", tuple(stop))

    @classmethod
    def from_keywords(cls, **options: Any) -> "SearchOptions":
        """`SearchOptions(**options)`, with an unknown option an `InputError` naming it."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"unknown generation option(s): {', '.join(unknown)}")
        return cls(**options)

    def resolve(self, generation_config: dict[str, Any]) -> "SearchOptions":
        """Fill unset fields from the generation config and validate. Giving any sampling parameter
        (temperature, top-k, top-p, min-p) without `do_sample` turns sampling on."""
        defaults = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0}
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in defaults:
                value = generation_config.get(field.name, defaults[field.name])
                value = defaults[field.name] if value is None else value
            values[field.name] = value
        if self.do_sample is None and any(getattr(self, key) is not None for key in SAMPLING_KEYS):
            values["do_sample"] = True
        if values["temperature"] == 0:
            values["do_sample"] = False
        resolved = replace(self, **values)
        resolved.validate()
        return resolved

    def validate(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise InputError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_new_tokens < 0:
            raise InputError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def process_logits(logits: np.ndarray, histories: list[np.ndarray], options: SearchOptions) -> np.ndarray:
    """Processed scores `[B, V]` (float32; removed tokens at -inf). `histories[b]` are row b's prompt and
    generated ids, which the repetition penalty looks at."""
    scores = logits.astype(np.float32, copy=True)
    if options.repetition_penalty != 1.0:
        for row, history in enumerate(histories):
            ids = np.unique(history[history < scores.shape[-1]])
            chosen = scores[row, ids]
            scores[row, ids] = np.where(chosen < 0, chosen * options.repetition_penalty, chosen / options.repetition_penalty)
    if not options.do_sample:
        return scores
    if options.temperature != 1.0:
        scores = scores / np.float32(options.temperature)
    if options.top_k:
        kth = -np.partition(-scores, min(options.top_k, scores.shape[-1]) - 1, axis=-1)[
            :, min(options.top_k, scores.shape[-1]) - 1
        ]
        scores = np.where(scores < kth[:, None], -np.inf, scores)
    if options.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(_softmax(sorted_scores), axis=-1)
        remove_sorted = cumulative <= (1 - options.top_p)
        remove_sorted[:, -1] = False  # keep at least one token
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        scores = np.where(remove, -np.inf, scores)
    if options.min_p is not None:
        probs = _softmax(scores)
        remove = probs < options.min_p * probs.max(axis=-1, keepdims=True)
        remove[np.arange(len(probs)), probs.argmax(axis=-1)] = False
        scores = np.where(remove, -np.inf, scores)
    return scores.astype(np.float32)


def choose_tokens(scores: np.ndarray, options: SearchOptions, rng: np.random.Generator) -> np.ndarray:
    """Argmax when not sampling; otherwise one draw per row from softmax(scores)."""
    if not options.do_sample:
        return np.argmax(scores, axis=-1).astype(np.int64)
    probs = _softmax(scores.astype(np.float64))
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random(len(probs)) * cumulative[:, -1]
    return np.array([np.searchsorted(row, draw, side="right") for row, draw in zip(cumulative, draws)], dtype=np.int64)


def next_token_ids(
    logits: np.ndarray,
    histories: list[np.ndarray],
    options: SearchOptions,
    rng: np.random.Generator,
    blocked: np.ndarray | None = None,
) -> np.ndarray:
    """Each row's next token (`[B]`) from host last-token logits: processed, then argmax or a draw. `histories` as for
    `process_logits` (read only by the repetition penalty); `blocked` ids (end-of-sequence tokens before
    `min_new_tokens`) are never chosen."""
    if blocked is not None:
        logits = logits.copy()
        logits[:, blocked] = -np.inf
    return choose_tokens(process_logits(logits, histories, options), options, rng)
