"""Incremental detokenization with stop strings, in time linear in the tokens and the text.

Each token is decoded within a short window of the tokens before it, as `tokenizers`' `DecodeStream` does: the new
text is the window's text minus the window's text without the new tokens. A window closes only after a token
whose text cannot change any more: not an unfinished UTF-8 sequence (a byte-level tokenizer decodes it to U+FFFD),
not a ByteFallback byte token (a run of them becomes text only as a whole). Ids that decoding skips (special tokens,
ids outside the vocabulary) never enter a window. Stop strings are found with Knuth-Morris-Pratt.
"""

from __future__ import annotations

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes an unfinished UTF-8 sequence to


class _StopMatcher:
    """Knuth-Morris-Pratt search for one non-empty stop string. `state` is the length of the longest prefix of it that
    ends the text fed so far; the failure table is built only as far as the matches reach."""

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self._borders = [0]  # _borders[i]: the longest proper border of stop[: i + 1]

    def _extend(self, size: int) -> None:
        stop, borders = self.stop, self._borders
        for i in range(len(borders), size):
            k = borders[i - 1]
            while k and stop[i] != stop[k]:
                k = borders[k - 1]
            borders.append(k + 1 if stop[i] == stop[k] else 0)

    def feed(self, text: str) -> int | None:
        """Advance over `text`; the index in it just past the first complete match, or None."""
        stop, borders, state = self.stop, self._borders, self.state
        for position, char in enumerate(text):
            while state and stop[state] != char:
                state = borders[state - 1]
            if stop[state] == char:
                state += 1
                if state == len(stop):
                    self.state = state
                    return position + 1
                if state > len(borders):
                    self._extend(state)
        self.state = state
        return None


class TextStream:
    """One sequence's text as tokens arrive, released in pieces that concatenate to `tokenizer.decode(tokens)`
    (`text`). A piece never splits a character and never holds text that may still begin a stop string; once one
    appears, `stopped` is set and the text ends right before it."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stopped = False
        self._window: list[int] = []  # ids since the start of the decode window
        self._read = 0  # the window's ids before this index decode to `_prefix`, already added to the text
        self._prefix = ""
        self._matchers = [_StopMatcher(s) for s in stop]
        self._released: list[str] = []
        self._pending = ""  # added but not released: it may begin a stop string

    @property
    def text(self) -> str:
        """All text added so far, released or not (everything, once flushed)."""
        if len(self._released) > 1:
            self._released[:] = ["".join(self._released)]
        return "".join(self._released) + self._pending

    def push(self, token: int) -> str:
        """Add a token; returns the newly final text (maybe empty)."""
        if self.stopped or self.tokenizer.is_skipped(token):
            return ""
        self._window.append(token)
        if token in self.tokenizer.byte_tokens:
            return ""
        text = self.tokenizer.decode(self._window)
        if len(text) <= len(self._prefix) or text.endswith(REPLACEMENT):
            return ""
        piece = text[len(self._prefix) :]
        self._window = self._window[self._read :]
        self._read, self._prefix = len(self._window), self.tokenizer.decode(self._window)
        return self._add(piece)

    def flush(self) -> str:
        """Release everything left (the sequence has ended), decoding the tokens still held as they are."""
        released = ""
        if not self.stopped and self._read < len(self._window):
            piece = self.tokenizer.decode(self._window)[len(self._prefix) :]
            self._window, self._read, self._prefix = [], 0, ""
            released = self._add(piece)
        return released + self._release(len(self._pending))

    def _add(self, piece: str) -> str:
        """Append decoded text, cut it before the earliest stop string that completes in it, release what is final."""
        self._pending += piece
        offset = len(self._pending) - len(piece)
        starts = [offset + end - len(m.stop) for m in self._matchers if (end := m.feed(piece)) is not None]
        if starts:
            self._pending, self.stopped = self._pending[: min(starts)], True
            return self._release(len(self._pending))
        return self._release(len(self._pending) - max((m.state for m in self._matchers), default=0))

    def _release(self, count: int) -> str:
        piece, self._pending = self._pending[:count], self._pending[count:]
        if piece:
            self._released.append(piece)
        return piece
