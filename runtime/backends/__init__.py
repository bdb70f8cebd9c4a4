"""Inference backends behind one small interface (`Session`): a loaded graph that knows its inputs and outputs and
runs named tensors. Each backend is a module of this package, imported only when a graph is opened with it."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import BackendUnavailable, InputError


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as the manifest describes it: name, numpy dtype name, dims (ints or axis names)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


class Session(Protocol):
    """A loaded graph."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# backend name -> "module:class" of this package, imported on first use
BACKENDS = {"onnxruntime": "onnxrt:OnnxRuntimeSession"}


def check_threads(threads: object) -> int | None:
    """`threads` as given when it is None (the backend's default) or an int from 1 to the machine's CPU count;
    else `InputError` (onnxruntime segfaults or hangs on absurd thread counts rather than refusing them)."""
    cpus = os.cpu_count() or 1
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus):
        raise InputError(f"threads must be an integer from 1 to {cpus} (this machine's CPU count), got {threads!r}")
    return threads


def open_session(path: Path, backend: str = "onnxruntime", threads: int | None = None, **options) -> Session:
    """Load a graph with the named backend."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r} (available: {', '.join(BACKENDS)})")
    module, name = BACKENDS[backend].split(":")
    session_class = getattr(importlib.import_module(f".{module}", __name__), name)
    return session_class(path, threads=check_threads(threads), **options)
