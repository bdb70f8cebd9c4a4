"""One exception hierarchy for the whole project; CLIs turn these into one-line errors."""


class LlavaRtError(Exception):
    """Base class of every error llava-rt raises on purpose."""


class InputError(LlavaRtError):
    """The caller's input (prompt, image, messages, options) is unusable."""


class MediaTooLarge(InputError):
    """An image or video frame is over the pixel limit (a server answers 413)."""


class QueueFull(LlavaRtError):
    """The scheduler's queue of waiting requests is full (a server answers 429)."""


class SchedulerClosed(LlavaRtError):
    """The scheduler has been closed and takes no more requests (a server answers 503)."""


class BundleError(LlavaRtError):
    """A bundle is missing, incomplete, tampered with or of an unsupported format."""


class CheckpointError(LlavaRtError):
    """A checkpoint directory is missing or is not a supported LLaVA checkpoint."""


class ExportError(LlavaRtError):
    """Exporting or verifying a graph failed."""


class BackendUnavailable(LlavaRtError):
    """An optional inference backend is not installed."""
