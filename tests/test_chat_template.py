"""Chat templates run sandboxed: plain data only (the caller's media unreachable), only plain data's attributes,
bounded output and time, one-line errors (BundleError when the source does not compile, InputError when a
render fails)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_rt.runtime import BundleError, InputError
from llava_rt.runtime.chat import ChatTemplate
from llava_rt.runtime.template_sandbox import plain


def conversation(*items) -> list[dict]:
    return [{"role": "user", "content": [*items, {"type": "text", "text": "hi"}]}]


def render(source: str, messages=None, **limits) -> str:
    return ChatTemplate(source, {"bos_token": "<s>"}, **limits).render(messages or conversation())


def rejected(source: str, fragment: str, messages=None, **limits) -> str:
    with pytest.raises(InputError) as caught:
        render(source, messages, **limits)
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message
    return message


EACH_ITEM = "{% for m in messages %}{% for c in m.content %}{{ c.type }}:{{ CALL }};{% endfor %}{% endfor %}"


def test_transformers_features_still_render():
    source = (
        "{{ bos_token }}{% for m in messages %}{% generation %}{{ m.role | upper }}{% endgeneration %}"
        "{% for c in m.content %}{% if c.type == 'text' %}{{ c.text | tojson }}{% else %}<{{ c.type }}>{% endif %}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}|A:{% endif %}"
    )
    messages = conversation({"type": "image", "image": Image.new("RGB", (4, 4))})
    assert render(source, messages) == '<s>USER<image>"hi"|A:'


def test_pil_image_save_is_unreachable(tmp_path):
    written = tmp_path / "saved.png"
    image = Image.new("RGB", (4, 4))
    rejected(
        EACH_ITEM.replace("CALL", f"c.image.save('{written}') if c.image else ''"),
        "rejected the messages",
        conversation({"type": "image", "image": image}),
    )
    assert not written.exists()


def test_array_tofile_and_fill_are_unreachable(tmp_path):
    written = tmp_path / "array.bin"
    array = np.full((4, 4, 3), 9, np.uint8)
    messages = conversation({"type": "image", "image": array})
    rejected(EACH_ITEM.replace("CALL", f"c.image.tofile('{written}') if c.image else ''"), "rejected", messages)
    rejected(EACH_ITEM.replace("CALL", "c.image.fill(0) if c.image else ''"), "rejected", messages)
    assert not written.exists() and (array == 9).all()


def test_media_become_placeholders_and_paths_strings():
    messages = conversation({"type": "image", "image": Image.new("RGB", (4, 4))}, {"type": "video", "video": Path("clip.mp4")})
    assert render(EACH_ITEM.replace("CALL", "c.image or c.video or c.text"), messages) == "image:<Image>;video:clip.mp4;text:hi;"
    assert plain({"a": (np.str_("x"), 1, True, None, 2.5)}) == {"a": ["x", 1, True, None, 2.5]}
    assert type(plain(np.str_("x"))) is str


def test_only_plain_data_attributes_are_reachable():
    assert render("{{ 'a,b'.split(',') | join('+') }}{{ {'k': 1}.items() | list | length }}") == "a+b1"
    rejected("{{ range(3).count(1) }}", "is unsafe")  # a range object is not plain data


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 10**12 }}",
        "{{ 'x' | center(10**12) }}",
        "{{ 'x'.ljust(10**12) }}",
        "{{ '%999999999999s' | format('x') }}",
        "{{ '%999999999999s' % 'x' }}",
        "{{ '{:>999999999999}'.format('x') }}",
        "{{ 2 ** 1000000000000 }}",
        "{% set s = 'x' * 1000 %}{{ s | replace('', s) }}",
        "{% for i in range(100000) %}{{ 'xxxxxxxxxx' }}{% endfor %}",
    ],
)
def test_output_and_values_are_bounded(source):
    started = time.monotonic()
    rejected(source, "more than 100000 characters", max_chars=100_000)
    assert time.monotonic() - started < 5


def test_constant_filters_are_not_folded_into_huge_values_at_compile_time():
    """Jinja evaluates filters of constants while compiling: the size bound holds there too."""
    started = time.monotonic()
    template = ChatTemplate("{{ 'x' | center(1000000000) }}", {})
    assert time.monotonic() - started < 1
    with pytest.raises(InputError, match="more than 1048576 characters"):
        template.render(conversation())


def test_render_time_is_bounded():
    started = time.monotonic()
    rejected(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than 0.3 s", max_seconds=0.3
    )
    assert time.monotonic() - started < 5


def test_exponential_macro_recursion_is_bounded():
    source = "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"
    rejected(source, "longer than 0.3 s", max_seconds=0.3)


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("{{ raise_exception('bad\nthing') }}", "chat template rejected the messages: bad thing"),
        ("{{ 1 / 0 }}", "chat template rejected the messages: division by zero"),
        ("{{ range(200000) | list }}", "chat template rejected the messages: Range too big"),
    ],
)
def test_render_errors_are_one_line_input_errors(source, fragment):
    rejected(source, fragment)


def test_syntax_error_is_a_bundle_error_on_one_line():
    with pytest.raises(BundleError) as caught:
        ChatTemplate("line one\n{% for m in messages %}{{ m }}", {})
    message = str(caught.value)
    assert message.startswith("the chat template does not compile: ") and "\n" not in message


def test_special_tokens_cannot_shadow_messages():
    """The variables a template receives are built in one dict: a special token named `messages` (which the
    manifest schema refuses anyway) cannot make the render fail with a Python TypeError."""
    assert ChatTemplate("{{ messages | length }}", {"messages": "x"}).render(conversation()) == "1"
