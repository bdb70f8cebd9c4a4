"""Incremental detokenization with stop strings: text released piece by piece concatenates to the final text."""

from __future__ import annotations

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes an unfinished UTF-8 sequence to


class TextStream:
    """One sequence's text as tokens arrive. Each `push` decodes the whole sequence and releases only what can no
    longer change: not a trailing partial character, not a suffix that may be the start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False
        self._released = 0

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that may still change or may begin a stop string."""
        partial = len(text) - len(text.rstrip(REPLACEMENT))
        prefix = max((j for s in self.stop for j in range(1, len(s)) if text.endswith(s[:j])), default=0)
        return max(partial, prefix)

    def push(self, token: int) -> str:
        """Add a token; returns the newly final text (maybe empty). Sets `stopped` when a stop string appears;
        the text then ends right before it."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            self.text, self.stopped = text[: min(cuts)], True
            return self.flush()
        self.text = text
        return self._release(len(text) - self._held_back(text))

    def flush(self) -> str:
        """Release everything left (the sequence has ended)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        piece = self.text[self._released : max(end, self._released)]
        self._released = max(end, self._released)
        return piece
