"""The torch-free llava-rt runtime: load a bundle and generate.

from llava_rt.runtime import Pipeline
pipe = Pipeline.load("bundle/")
print(pipe.generate(prompt="What is shown here?", images=["cat.png"]).text)
"""

from .bundle import Bundle, load_bundle
from .chat_session import ChatSession, ChatTurn
from .errors import (
    BackendUnavailable,
    BundleError,
    CheckpointError,
    ExportError,
    InputError,
    LlavaRtError,
    MediaTooLarge,
    QueueFull,
    SchedulerClosed,
)
from .pipeline import GenerationResult, Pipeline
from .request import Request
from .sampling import SearchOptions

__all__ = [
    "BackendUnavailable",
    "Bundle",
    "BundleError",
    "ChatSession",
    "ChatTurn",
    "CheckpointError",
    "ExportError",
    "GenerationResult",
    "InputError",
    "LlavaRtError",
    "MediaTooLarge",
    "Pipeline",
    "QueueFull",
    "SchedulerClosed",
    "Request",
    "SearchOptions",
    "load_bundle",
]
