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
    """An ONNX graph run by onnxruntime (CPU unless other providers are asked for).

    Graphs run sequentially on `threads` intra-op threads (onnxruntime's default: one per physical core),
    with every graph optimization. With `optimized_path`, the optimized graph is saved there on the first
    load (at the portable "extended" level, weights in `<name>.data`) and later loads start from it,
    skipping most of the optimization work.
    """

    def __init__(
        self, path: Path, threads: int | None = None, providers: list[str] | None = None, optimized_path: Path | None = None
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        source, saving = path, None
        if optimized_path is not None and optimized_path.is_file():
            source = optimized_path
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        elif optimized_path is not None:
            saving = optimized_path.with_name(f".{optimized_path.name}.partial")
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.optimized_model_filepath = str(saving)
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", f"{optimized_path.name}.data"
            )
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        else:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(source), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise BundleError(f"onnxruntime cannot load {path.name}: {exc}".splitlines()[0]) from None
        if saving is not None:
            saving.replace(optimized_path)  # the weights file is complete by now; the graph file marks the cache entry done
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
