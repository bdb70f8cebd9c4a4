"""Cache-affinity keys of a chat completion request: one digest per growing prefix of its content (each message's
text and media in order), so that a request sharing a prefix with an earlier one (a continued conversation, the same
image, the same long system prompt) can be sent to the replica whose caches hold it. Only prefixes worth a cache
hit get a key: short openings (a greeting, a one-line system prompt) would pile every request onto one replica."""

from __future__ import annotations

import hashlib
import json

MIN_PREFIX_CHARS = 128  # about the scheduler's 32-token minimum prefix (runtime/scheduler.py: MIN_PREFIX_TOKENS)
MEDIA_CHARS = MIN_PREFIX_CHARS  # an image or a video alone is worth a key: its features and hundreds of positions


def _parts(message: dict) -> list[tuple[str, int]]:
    """A message's content as (canonical text, weight in characters) parts, its role folded into each."""
    role, content = message.get("role"), message.get("content")
    if isinstance(content, str) or content is None:
        content = [{"type": "text", "text": content or ""}]
    if not isinstance(content, list):
        return [(json.dumps([role, content], sort_keys=True), 0)]
    parts = []
    for part in content:
        text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
        weight = len(text) if isinstance(text, str) else MEDIA_CHARS
        parts.append((json.dumps([role, part], sort_keys=True), weight))
    return parts


def prefix_keys(body: bytes) -> tuple[str, ...]:
    """The keys of a `POST /v1/chat/completions` body's prefixes worth caching, shortest first; none for a body that
    is not a chat request (the replica answers it with its error)."""
    try:
        messages = json.loads(body)["messages"]
    except (ValueError, TypeError, KeyError):
        return ()
    if not isinstance(messages, list):
        return ()
    digest, weight, keys = hashlib.sha256(), 0, []
    for message in messages:
        for text, part_weight in _parts(message) if isinstance(message, dict) else [(repr(message), 0)]:
            digest.update(text.encode())
            weight += part_weight
            if weight >= MIN_PREFIX_CHARS:
                keys.append(digest.copy().hexdigest()[:32])
    return tuple(keys)
