"""Chat messages in transformers' format and their rendering with the bundle's Jinja chat template."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext

from .errors import BundleError, InputError, LlavaRtError
from .template_sandbox import MAX_CHARS, MAX_SECONDS, TemplateSandbox, plain, render_budget

ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image", "video")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate a conversation; plain-string content becomes `[{"type": "text", "text": ...}]`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role', 'content'} dicts")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"message {index} must be a dict with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise InputError(f"message {index} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)):
            raise InputError(f"message {index} content must be a string or a list of items")
        for item in content:
            if not isinstance(item, dict) or item.get("type") not in CONTENT_TYPES:
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                raise InputError(f"message {index} has unsupported content type {kind!r} (expected text, image or video)")
            if item["type"] == "text" and not isinstance(item.get("text"), str):
                raise InputError(f"message {index} has a text item without a 'text' string")
        normalized.append({**message, "content": list(content)})
    return normalized


def media_items(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The content items of one kind ("image" or "video") of a conversation, in order."""
    return [item for message in messages for item in message["content"] if item["type"] == kind]


def user_turn(prompt: str, num_images: int, num_videos: int = 0) -> list[dict[str, Any]]:
    """One user message: the images, then the videos, then the text (what `llava-run --prompt` sends)."""
    media = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
    return [{"role": "user", "content": [*media, {"type": "text", "text": prompt}]}]


class _GenerationBlocks(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` tag (marks assistant text); renders its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A Jinja chat template rendered the way transformers renders it (trimmed blocks, its extra tag, filter and
    globals), in `TemplateSandbox`: the template sees plain data only (media objects in the messages become
    placeholders), and a render is bounded to `max_chars` characters and `max_seconds`.

    Raises `BundleError` when the source does not compile; `render` raises `InputError`.
    """

    def __init__(self, source: str, special_tokens: dict[str, str], max_chars: int = MAX_CHARS, max_seconds: float = MAX_SECONDS):
        self._environment = TemplateSandbox(
            filters={"tojson": _tojson},
            globals={"raise_exception": _raise_exception, "strftime_now": _strftime_now},
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols", _GenerationBlocks],
        )
        try:
            self._template = self._environment.compile_budgeted(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise BundleError(f"the chat template does not compile: {_one_line(exc.message)} (line {exc.lineno})") from None
        self._special_tokens = plain(special_tokens)
        self.max_chars, self.max_seconds = max_chars, max_seconds

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a normalized conversation; template errors and an exceeded budget become `InputError`."""
        variables = {**self._special_tokens, "messages": plain(messages), "add_generation_prompt": bool(add_generation_prompt)}
        pieces, size = [], 0
        try:
            with render_budget(self.max_chars, self.max_seconds) as budget:
                for piece in self._template.generate(variables):
                    size += len(piece)
                    budget.check_size(size)
                    budget.check_time()
                    pieces.append(piece)
        except LlavaRtError:
            raise
        except Exception as exc:  # template code can fail in any way (TypeError, ZeroDivisionError, RecursionError, ...)
            raise InputError(f"chat template rejected the messages: {_one_line(exc) or type(exc).__name__}") from None
        return "".join(pieces)
