"""The tiny bundle the engines tests share (fp16 and int8 variants), exported once per test session, and what they
need around TensorRT: whether it can run here, and copies of the bundle to change."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from llava_rt.export.tiny_checkpoint import TinySpec, build_tiny_checkpoint


def _tensorrt_here() -> str | None:
    """Why TensorRT plans cannot be built and run here, or None when they can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "needs TensorRT (the tensorrt package, from NVIDIA's index)"
    try:
        from llava_rt.runtime.backends.trt import compute_capability

        compute_capability()
    except Exception as exc:  # no cuda-python, no driver, no GPU: each says why
        return f"needs an NVIDIA GPU ({exc})"
    return None


TENSORRT_MISSING = _tensorrt_here()
# For tests that build or run plans (marked `tensorrt` too): skipped, with the reason, where TensorRT or a GPU is missing.
requires_tensorrt = pytest.mark.skipif(TENSORRT_MISSING is not None, reason=str(TENSORRT_MISSING))


def engines_bundle(tmp_path_factory) -> Path:
    """The tiny Mistral checkpoint exported with fp16 and int8 variants, built on first use in the session."""
    from llava_rt.export.exporter import export_bundle

    bundle = tmp_path_factory.getbasetemp() / "engines-bundle"
    if not (bundle / "manifest.json").exists():
        checkpoint = build_tiny_checkpoint(tmp_path_factory.mktemp("engines-checkpoint"), TinySpec(text_model="mistral", seed=3))
        export_bundle(checkpoint, bundle, precisions=("fp16", "int8"), log=lambda message: None)
    return bundle


def copy_bundle(bundle: Path, destination: Path) -> Path:
    """A copy of the bundle to change."""
    return Path(shutil.copytree(bundle, destination))
