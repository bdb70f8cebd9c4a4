"""The OpenAI Chat Completions objects (pydantic): the request, the response, its stream chunks, the model list and
the error; and the runtime `Request` a validated request becomes.

Unknown fields are ignored, as OpenAI-compatible servers do. Known OpenAI parameters this server does not implement
are accepted at their default value only; any other value is a 400 naming the parameter.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from llava_rt.runtime import Request, SearchOptions
from llava_rt.runtime.console import one_line

# parameter -> the values meaning "not used" (null always does)
UNSUPPORTED = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
}
_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict"}  # pydantic's names of union members in error locations
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, one_line(message), param

    def response(self) -> "ErrorResponse":
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.status))


class _Strict(BaseModel):
    """JSON types are taken as they are: no "5" for 5, no 1 for true."""

    model_config = ConfigDict(strict=True)


class MediaURL(_Strict):
    url: str


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]
PLACEHOLDERS = {"image_url": "image", "video_url": "video"}


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # "developer" is OpenAI's newer name for "system"
    content: str | list[ContentPart]

    def runtime_message(self) -> dict[str, Any]:
        """The message in transformers' chat format, media parts as placeholders."""
        content = self.content
        if not isinstance(content, str):
            content = [{"type": "text", "text": p.text} if p.type == "text" else {"type": PLACEHOLDERS[p.type]} for p in content]
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off (vLLM's convention)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def token_limit(self) -> int | None:
        """The most tokens the answer may have, when the client set it (`max_completion_tokens` first)."""
        return self.max_completion_tokens or self.max_tokens

    def media_urls(self, part_type: Literal["image_url", "video_url"]) -> list[str]:
        """The URLs of every image (or video) part, in order."""
        return [
            getattr(part, part_type).url
            for message in self.messages
            if not isinstance(message.content, str)
            for part in message.content
            if part.type == part_type
        ]

    def search_options(self) -> SearchOptions:
        """The sampling options the client set; the others come from the bundle's generation config."""
        top_k = 0 if self.top_k == -1 else self.top_k
        stop = self.stop if self.stop is not None else ()
        return SearchOptions(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(stop) if isinstance(stop, list) else stop,
        )

    def runtime_request(self, images: list, videos: list, num_frames: int, max_new_tokens: int) -> Request:
        """The runtime's `Request`: these messages with their decoded images and videos in order. Raises `InputError`."""
        return Request(
            messages=[message.runtime_message() for message in self.messages],
            images=images,
            videos=videos,
            num_frames=num_frames,
            max_new_tokens=max_new_tokens,
            search=self.search_options(),
        )


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """The most specific error of a validation as `location: message`, and the parameter it is about. Locations
    leave out pydantic's labels of union members (`str`, `list[...]`): `messages.0.content: ...`."""
    located = []
    for error in exc.errors(include_url=False):
        path = [str(p) for p in error["loc"] if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_LABELS)]
        located.append((path, error["msg"]))
    path, message = max(located, key=lambda item: len(item[0]))
    return (f"{'.'.join(path)}: {message}" if path else message), (path[0] if path else None)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """A request body as a `ChatCompletionRequest`; malformed JSON, a schema violation or an unsupported parameter
    value is an `APIError` 400."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    for name, defaults in UNSUPPORTED.items():
        if data.get(name) is not None and data[name] not in defaults:
            raise APIError(400, f"{name}={json.dumps(data[name])} is not supported by this server", param=name)
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise APIError(400, message, param=param) from None
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    return request


def check_context(prompt_tokens: int, max_tokens: int | None, context: int) -> None:
    """Refuse (400) a request whose prompt and `max_tokens` do not fit the model's context together."""
    if max_tokens is not None and prompt_tokens + max_tokens > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested {prompt_tokens + max_tokens} "
            f"tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). Please reduce the length of the "
            "messages or completion.",
            param="max_tokens",
        )


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    """Token counts; `prompt_tokens_details.cached_tokens` are the prompt tokens whose KV came from the prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> "Usage":
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """What a stream chunk adds; fields not set are left out (`{}` on the last chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, serialize) -> dict[str, Any]:
        return {key: value for key, value in serialize(self).items() if value is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llava-rt"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
