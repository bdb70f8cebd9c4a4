"""The bundle's `tokenizer.json`, through the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer

from .errors import InputError


class Tokenizer:
    """Encode prompts (special tokens such as BOS added as the tokenizer's post-processor says) and decode ids."""

    def __init__(self, path: Path):
        self._tokenizer = _Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Text that is not valid Unicode (a lone surrogate, which is how undecodable bytes of a
        command-line argument or an input line arrive) raises `InputError`."""
        if not isinstance(text, str):
            raise InputError(f"text to tokenize must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            near = text[max(exc.start - 20, 0) : exc.start + 20]
            raise InputError(
                f"the text is not valid Unicode: lone surrogate {text[exc.start]!r} in {near!r} "
                "(bytes that are not UTF-8 in an argument or input line?)"
            ) from None
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
