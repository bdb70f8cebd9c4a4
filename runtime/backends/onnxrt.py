"""The onnxruntime backend: a graph run by an `onnxruntime.InferenceSession`."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import numpy as np

from ..errors import BundleError
from . import TensorSpec

# onnxruntime's element type names -> numpy dtype names (the manifest's spelling).
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bool)": "bool",
    **{f"tensor({kind}{bits})": f"{kind}{bits}" for kind in ("int", "uint") for bits in (8, 16, 32, 64)},
}
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def onnxruntime_message(exc: BaseException) -> str:
    """onnxruntime's message on one line, without its `[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :` prefix
    (the useful part often comes after the first line break)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return _ORT_PREFIX.sub("", text) or type(exc).__name__


@cache
def _run_errors() -> tuple[type[Exception], ...]:
    """What `InferenceSession.run` raises on bad feeds: its own exception types, ValueError, RuntimeError."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = (value for value in vars(state).values() if isinstance(value, type) and issubclass(value, Exception))
    return (ValueError, RuntimeError, *own)


def _spec(value) -> TensorSpec:
    return TensorSpec(value.name, ORT_DTYPES.get(value.type, value.type), tuple(value.shape))


class OnnxRuntimeSession:
    """An ONNX graph run by onnxruntime (CPU unless other providers are asked for): every graph optimization,
    sequential execution on `threads` intra-op threads (onnxruntime's default: one per physical core).
    Errors while loading or running become `BundleError`s naming the graph."""

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        self.name = path.name
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise BundleError(f"onnxruntime cannot load {path.name}: {onnxruntime_message(exc)}") from None
        self.inputs = [_spec(value) for value in self._session.get_inputs()]
        self.outputs = [_spec(value) for value in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(None, feeds)
        except _run_errors() as exc:
            raise BundleError(f"onnxruntime failed to run {self.name}: {onnxruntime_message(exc)}") from None
        return dict(zip((o.name for o in self.outputs), values))
