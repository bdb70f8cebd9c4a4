"""Inference backends behind one small interface (`Session`): a loaded graph that knows its inputs and outputs and
runs named tensors, from host numpy arrays (`run`) or through a `Binding` of arrays on its device. Each backend is a
module of this package, imported only when a graph is opened with it."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from ..errors import BackendUnavailable, InputError

DEVICES = ("cpu", "cuda", "tensorrt")
# Provider options the runtime cannot honour: replaying one captured CUDA graph for the prefill and for every decode
# step would silently compute with stale shapes (see `decoding.Generator`).
REFUSED_OPTIONS = {"enable_cuda_graph": "CUDA graphs are not supported yet: the decoder's prefill and steps share a session"}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as the manifest describes it: name, numpy dtype name, dims (ints or axis names)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class BackendConfig:
    """How a pipeline's graphs run: the backend, its device (`cpu`, `cuda`, or `tensorrt` for onnxruntime's TensorRT
    provider), intra-op threads, and options passed through to the device's provider (strings, as on the CLI)."""

    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    provider_options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BackendUnavailable(f"unknown backend {self.backend!r} (available: {', '.join(BACKENDS)})")
        if self.device not in DEVICES:
            raise InputError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        check_threads(self.threads)
        for key in self.provider_options:
            if key in REFUSED_OPTIONS:
                raise InputError(f"provider option {key}: {REFUSED_OPTIONS[key]}")


class Binding(Protocol):
    """Inputs and outputs attached to a session once and run many times; binding a name again replaces only it.

    Arrays are numpy arrays or arrays on the session's device (`Session.array_module`). Binding the array already
    bound under a name does nothing: a graph reads arrays on its device in place, so write new contents into them;
    a host array given to a GPU session is copied when bound, so give a new array for new contents."""

    def input(self, name: str, array: Any) -> None: ...

    def output(self, name: str, array: Any = None) -> None:
        """Write output `name` into the preallocated `array`; None: the backend allocates it on its device."""

    def run(self) -> dict[str, Any]:
        """Run the graph; every output, as the array it was written to (on the session's device)."""


class Session(Protocol):
    """A loaded graph. `array_module` is numpy or, on a GPU, cupy: the arrays `bind` works with."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    array_module: ModuleType

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def bind(self) -> Binding: ...


# backend name -> "module:class" of this package, imported on first use. A session class is constructed as
# `cls(path, config: BackendConfig, precision=<the graph variant's precision>, engine_cache=<a directory for
# compiled engines, created on first use>)`.
BACKENDS = {
    "onnxruntime": "onnxrt:OnnxRuntimeSession",
    "tensorrt": "trt:TensorRTSession",
}


def check_threads(threads: object) -> int | None:
    """`threads` as given when it is None (the backend's default) or an int from 1 to the machine's CPU count;
    else `InputError` (onnxruntime segfaults or hangs on absurd thread counts rather than refusing them)."""
    cpus = os.cpu_count() or 1
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus):
        raise InputError(f"threads must be an integer from 1 to {cpus} (this machine's CPU count), got {threads!r}")
    return threads


def parse_provider_options(items: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (the CLI's repeatable `--provider-option`) as a dict; `InputError` for a malformed one."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"--provider-option takes KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    return options


def cupy_module() -> ModuleType:
    """cupy, the device arrays of every GPU backend; `BackendUnavailable` naming the extra when it is missing."""
    try:
        import cupy
    except ImportError:
        raise BackendUnavailable("running on a GPU needs cupy: pip install 'llava-rt[gpu]' (cupy-cuda13x)") from None
    return cupy


def to_host(array: Any) -> np.ndarray:
    """A numpy array of `array`'s contents (itself when it is one; a device array is copied to the host)."""
    return array if isinstance(array, np.ndarray) else array.get()


def open_session(
    path: Path, config: BackendConfig = BackendConfig(), precision: str = "fp32", engine_cache: Path | None = None
) -> Session:
    """Load a graph with `config`'s backend on its device."""
    module, name = BACKENDS[config.backend].split(":")
    session_class = getattr(importlib.import_module(f".{module}", __name__), name)
    return session_class(path, config, precision=precision, engine_cache=engine_cache)
