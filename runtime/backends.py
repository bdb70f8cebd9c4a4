"""Inference backends behind one small interface: named numpy inputs in, named numpy outputs out."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import BackendUnavailable, BundleError


class Session(Protocol):
    """A loaded graph."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntimeSession:
    """An ONNX graph run by onnxruntime (CPU unless other providers are asked for): every graph optimization,
    sequential execution on `threads` intra-op threads (onnxruntime's default: one per physical core)."""

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise BundleError(f"onnxruntime cannot load {path.name}: {exc}".splitlines()[0]) from None
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self._session.run(None, feeds)))


BACKENDS = {"onnxruntime": OnnxRuntimeSession}


def open_session(path: Path, backend: str = "onnxruntime", **options) -> Session:
    """Load a graph with the named backend."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r} (available: {', '.join(BACKENDS)})")
    return BACKENDS[backend](path, **options)
