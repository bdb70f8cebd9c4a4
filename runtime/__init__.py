"""The torch-free llava-rt runtime: load a bundle and generate.

from llava_rt.runtime import Pipeline
pipe = Pipeline.load("bundle/")
print(pipe.generate(prompt="What is shown here?", images=["cat.png"]).text)
"""

from .bundle import Bundle, load_bundle
from .errors import BackendUnavailable, BundleError, CheckpointError, ExportError, InputError, LlavaRtError
from .pipeline import GenerationResult, Pipeline

__all__ = [
    "BackendUnavailable",
    "Bundle",
    "BundleError",
    "CheckpointError",
    "ExportError",
    "GenerationResult",
    "InputError",
    "LlavaRtError",
    "Pipeline",
    "load_bundle",
]
