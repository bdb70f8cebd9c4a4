"""Incremental detokenization: pieces concatenate to `tokenizer.decode(ids)` for byte-level and SentencePiece-style
(ByteFallback) tokenizers, never split a character, stop strings are exact, and the work is linear."""

from __future__ import annotations

import random
import signal
import string
from contextlib import contextmanager

import pytest
from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

from llava_rt.export.tiny_checkpoint import build_tokenizer
from llava_rt.runtime.detokenize import TextStream
from llava_rt.runtime.tokenizer import Tokenizer

TEXT = "héllo wörld, 日本語のテキスト 🎉 ok — naïve café, emoji 👩‍👩‍👧 and ∑ x² done"


def _sentencepiece_style() -> HFTokenizer:
    """Llama-2's tokenizer.json layout: Metaspace-like normalizer, BPE with byte fallback, Replace/ByteFallback/Fuse/Strip."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "▁the", "ing", "é", "日", "▁▁", "\ufffd", "▁hello", "!", "▁<", *string.ascii_letters, ",", "."]
    tokenizer = HFTokenizer(
        models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return tokenizer


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tokenizer") / f"{request.param}.json"
    (build_tokenizer(400) if request.param == "byte-level" else _sentencepiece_style()).save(str(path))
    return Tokenizer(path)


def _stream(tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    return pieces, stream


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return [i for i in tokenizer.encode(text) if not tokenizer.is_skipped(i)]


def test_random_ids_decode_to_the_full_text(tokenizer):
    """Any id sequence (special tokens, byte tokens, invalid UTF-8, ids past the vocabulary) streams to `decode(ids)`."""
    size = tokenizer._tokenizer.get_vocab_size()
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randrange(size + 3) for _ in range(rng.randrange(1, 40))]
        pieces, stream = _stream(tokenizer, ids)
        assert "".join(pieces) == stream.text == tokenizer.decode(ids), ids


def test_multibyte_characters_are_never_split(tokenizer):
    ids = _ids(tokenizer, TEXT)
    pieces, stream = _stream(tokenizer, ids)
    assert "".join(pieces) == stream.text == tokenizer.decode(ids) == TEXT.lstrip()
    assert not any("\ufffd" in piece for piece in pieces)
    assert len([p for p in pieces if p]) > 5


def _reference(tokenizer: Tokenizer, ids: list[int], stops: tuple[str, ...]) -> tuple[str, bool]:
    """The specification: after each token, once a stop string is in the decoded text, the text ends before the
    earliest one."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            return text[: min(cuts)], True
    return tokenizer.decode(ids), False


@pytest.mark.parametrize(
    "text, stops",
    [
        ("The answer is yes. END of text", ("END",)),  # spans tokens
        ("aaaab aaab", ("aaab",)),  # a failed partial match restarts inside itself (KMP borders)
        ("abababc", ("ababc",)),
        ("xx abcd yy", ("abcd", "bc")),  # in one token: the earliest start wins, not the earliest end
        ("xx abcd yy", ("c", "abcd")),  # in two tokens: the first complete stop string
        ("hello 日本語 world", ("本語",)),  # multi-byte characters in the stop string
        ("no stop here", ("stop!", "zzz")),
        ("The EN of it, then END", ("END",)),  # held back "EN" is released when the match fails
    ],
)
def test_stop_strings_cut_exactly(tokenizer, text, stops):
    ids = _ids(tokenizer, text)
    pieces, stream = _stream(tokenizer, ids, stops)
    assert ("".join(pieces), stream.stopped) == (stream.text, stream.stopped) == _reference(tokenizer, ids, stops)


def test_text_that_may_begin_a_stop_string_is_held_back_until_it_cannot(tokenizer):
    ids = _ids(tokenizer, "The ENd of it")
    stream = TextStream(tokenizer, ("END",))
    released, held = "", 0
    for n, token in enumerate(ids, 1):
        released += stream.push(token)
        text = tokenizer.decode(ids[:n])
        held += text.endswith(("E", "EN"))
        assert released == (text[: text.rindex("E")] if text.endswith(("E", "EN")) else text)
    assert held and released + stream.flush() == "The ENd of it" and not stream.stopped


def test_random_stop_strings_equal_the_reference(tokenizer):
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice("ab c") for _ in range(rng.randrange(1, 40)))
        stops = tuple("".join(rng.choice("ab c") for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(1, 4)))
        ids = _ids(tokenizer, text)
        stream = TextStream(tokenizer, stops)
        released = ""
        for n, token in enumerate(ids, 1):
            released += stream.push(token)
            partial, _ = _reference(tokenizer, ids[:n], stops)
            assert partial.startswith(released) and not any(s in released for s in stops)
            if stream.stopped:
                break
        released += stream.flush()
        assert (released, stream.stopped) == _reference(tokenizer, ids, stops), (text, stops)


@contextmanager
def _deadline(seconds: int):
    """Turn a hang into a failure (generous: the work below takes well under a second)."""

    def expire(signum, frame):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class _CountingTokenizer(Tokenizer):
    """The real tokenizer, counting the ids it is asked to decode."""

    decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return super().decode(ids, skip_special_tokens)


def test_long_generation_and_megabyte_stop_string_take_linear_work(tmp_path):
    path = tmp_path / "tokenizer.json"
    build_tokenizer(400).save(str(path))
    tokenizer = _CountingTokenizer(path)
    ids = (_ids(tokenizer, "ab ab ab ab ") * 1000)[:2000]
    stop = "ab " * 350_000  # 1 MB, and the text matches its beginning all along
    with _deadline(60):
        stream = TextStream(tokenizer, (stop, "zz"))
        pieces = [stream.push(token) for token in ids]
        pieces.append(stream.flush())
    text = tokenizer.decode(ids)
    assert not any(pieces[:-1]) and pieces[-1] == text == stream.text  # all held back, since it may begin the stop
    assert tokenizer.decoded <= 4 * len(ids) + len(text)  # each id decoded a bounded number of times
