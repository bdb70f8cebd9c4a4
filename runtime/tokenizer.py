"""The bundle's `tokenizer.json`, through the `tokenizers` library."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer

from .errors import InputError

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # what the ByteFallback decoder turns into one raw byte


def _decoder_types(config: dict | None) -> set[str]:
    """The types of a decoder and of the decoders of its `Sequence`s."""
    if not config:
        return set()
    return {config["type"]}.union(*(_decoder_types(d) for d in config.get("decoders", [])))


class Tokenizer:
    """Encode prompts (special tokens such as BOS added as the tokenizer's post-processor says) and decode ids."""

    def __init__(self, path: Path):
        self._tokenizer = _Tokenizer.from_file(str(path))
        self._special = frozenset(i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special)
        decoder = self._tokenizer.decoder
        fallback = "ByteFallback" in _decoder_types(json.loads(decoder.__getstate__()) if decoder is not None else None)
        vocab = self._tokenizer.get_vocab() if fallback else {}
        # ids decoded to raw bytes: a run of them becomes text (or one U+FFFD per byte) only as a whole
        self.byte_tokens = frozenset(i for token, i in vocab.items() if _BYTE_TOKEN.fullmatch(token))

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

    def is_skipped(self, token: int) -> bool:
        """Whether `decode` (skipping special tokens) drops this id: a special token or an id outside the vocabulary."""
        return token in self._special or self._tokenizer.id_to_token(token) is None
