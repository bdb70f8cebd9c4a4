"""`Request`: one validated request (a conversation or a prompt, its images and videos, how to generate).

Every entry point (`Pipeline.generate`, `stream`, `start`, `generate_batch`, `ChatSession`, the CLI) builds
one, so what a request may hold is written and checked in one place.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field, fields
from numbers import Integral
from typing import Any, Sequence

from .chat import media_items, normalize_messages
from .errors import InputError
from .image_processing import ImageInput
from .sampling import SearchOptions
from .video import VideoInput

DEFAULT_NUM_FRAMES = 8
DEFAULT_MAX_NEW_TOKENS = 128


def short_repr(value: Any) -> str:
    """A repr short enough for a one-line error message."""
    return reprlib.repr(value)


def check_positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1, else `InputError` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {short_repr(value)}")
    return int(value)


def media_list(kind: str, given: Any) -> list[Any]:
    """`given` images (or videos) as a list; a single path or a non-sequence is an `InputError`."""
    if given is None:
        return []
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        raise InputError(f"{kind}s must be a list of {kind}s, got {type(given).__name__}")
    return list(given)


def _collect_media(messages: list[dict[str, Any]], kind: str, given: list[Any]) -> list[Any]:
    """The images (or videos) of a conversation: carried by its items, else taken in order from `given`."""
    items = media_items(messages, kind)
    embedded = [item.get(kind, item.get("path", item.get("url"))) for item in items]
    if any(source is not None for source in embedded):
        if given:
            raise InputError(f"give {kind}s either inside the messages or as {kind}s=, not both")
        if any(source is None for source in embedded):
            raise InputError(f"some {kind} items carry a {kind} and some do not")
        return embedded
    if len(items) != len(given):
        raise InputError(f"the messages have {len(items)} {kind} placeholders but {len(given)} {kind}s were given")
    return given


@dataclass(frozen=True)
class Request:
    """One request, validated when built.

    Either `messages` (transformers' chat format; images and videos inside their items or given in order as
    `images`/`videos`) or a `prompt`, rendered as one user turn (the images, then the videos, then the text)
    unless `apply_chat_template=False`, in which case it is used verbatim and must hold one `<image>` per image
    and one `<video>` per video. Images are paths, PIL images or HxWx3 uint8 arrays; videos are paths (PyAV)
    or TxHxWx3 uint8 arrays, of which `num_frames` frames are sampled uniformly. At most `max_new_tokens`
    tokens are generated (fewer when the model's context ends first: finish reason "length"). `search` holds
    the sampling options; unset ones come from the bundle's generation config.
    """

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    images: Sequence[ImageInput] = ()
    videos: Sequence[VideoInput] = ()
    num_frames: int = DEFAULT_NUM_FRAMES
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    apply_chat_template: bool = True
    search: SearchOptions = field(default_factory=SearchOptions)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise InputError("give exactly one of messages= or prompt=")
        images, videos = media_list("image", self.images), media_list("video", self.videos)
        if self.messages is not None:
            messages = normalize_messages(self.messages)
            object.__setattr__(self, "messages", messages)
            images, videos = _collect_media(messages, "image", images), _collect_media(messages, "video", videos)
        elif not isinstance(self.prompt, str):
            raise InputError(f"prompt must be a string, got {type(self.prompt).__name__}")
        object.__setattr__(self, "images", tuple(images))
        object.__setattr__(self, "videos", tuple(videos))
        object.__setattr__(self, "num_frames", check_positive_int("num_frames", self.num_frames))
        object.__setattr__(self, "max_new_tokens", check_positive_int("max_new_tokens", self.max_new_tokens))
        if not isinstance(self.apply_chat_template, bool):
            raise InputError(f"apply_chat_template must be True or False, got {short_repr(self.apply_chat_template)}")
        if not isinstance(self.search, SearchOptions):
            raise InputError(f"search must be a SearchOptions, got {short_repr(self.search)}")

    @classmethod
    def build(cls, messages: Any = None, /, **arguments: Any) -> "Request":
        """A `Request` from `generate`-style arguments: the request's fields, plus search options as keywords
        (`temperature=0.7`, ...; see `SearchOptions`). A `Request` passed as `messages` is returned as is."""
        if isinstance(messages, Request):
            if arguments:
                raise InputError(f"give a Request or keyword arguments, not both (got {', '.join(sorted(arguments))})")
            return messages
        if "messages" in arguments:
            if messages is not None:
                raise InputError("messages given twice (positionally and as messages=)")
            messages = arguments.pop("messages")
        names = {f.name for f in fields(cls)}
        options = {key: arguments.pop(key) for key in list(arguments) if key not in names}
        if options:
            if "search" in arguments:
                raise InputError(f"give search= or search keywords, not both (got {', '.join(sorted(options))})")
            arguments["search"] = SearchOptions.from_keywords(**options)
        return cls(messages, **arguments)
