"""Text that is not valid Unicode (lone surrogates: undecodable bytes of an argument or input line) is refused by the
tokenizer with a one-line `InputError`, from the API and from the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import assert_one_line_error
from llava_rt.export.tiny_checkpoint import build_tokenizer
from llava_rt.runtime.errors import InputError
from llava_rt.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    build_tokenizer(400).save(str(path))
    return Tokenizer(path)


def test_lone_surrogates_are_input_errors(tokenizer):
    with pytest.raises(InputError, match=r"lone surrogate '\\udcff' in 'bad \\udcff bytes'") as error:
        tokenizer.encode("bad \udcff bytes")
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match=r"lone surrogate '\\ud83d' in '\\ud83d'"):
        tokenizer.encode("\ud83d")  # half of a surrogate pair
    with pytest.raises(InputError, match="must be a string"):
        tokenizer.encode(b"bytes")
    assert tokenizer.decode(tokenizer.encode("caf\u00e9 \U0001f389")) == "caf\u00e9 \U0001f389"


def test_pipeline_prompt_with_a_lone_surrogate(pipelines):
    with pytest.raises(InputError, match="lone surrogate"):
        pipelines["mistral"].prepare(prompt="caf\udce9 au lait")


def test_cli_argument_that_is_not_utf8(variants):
    command = [sys.executable, "-m", "llava_rt.runtime.cli", str(variants["mistral"].bundle), "--prompt", b"caf\xe9 au lait"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, "llava-run", r"lone surrogate '\udce9' in '")
    assert r"caf\udce9 au lait" in result.stderr
