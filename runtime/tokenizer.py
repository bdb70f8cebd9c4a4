"""The bundle's `tokenizer.json`, through the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer


class Tokenizer:
    """Encode prompts (special tokens such as BOS added as the tokenizer's post-processor says) and decode ids."""

    def __init__(self, path: Path):
        self._tokenizer = _Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
