"""The TensorRT backend: a serialized plan run with `execute_async_v3` on a CUDA stream, its inputs and outputs in
device buffers bound with `set_tensor_address`.

Device memory, streams and copies go through cuda-python's `cuda.bindings.runtime` (NVIDIA's maintained binding
of the CUDA runtime, one small wheel, present on our GPU machines; polygraphy's `polygraphy.cuda` wraps the same
calls but pulls the rest of polygraphy). TensorRT API as documented for 10.x and 11.x:
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Runtime.html (Runtime,
deserialize_cuda_engine, engine_host_code_allowed), .../Core/Engine.html (num_io_tensors, get_tensor_name,
get_tensor_mode, get_tensor_dtype, get_tensor_shape), .../Core/ExecutionContext.html (set_input_shape,
get_tensor_shape, set_tensor_address, execute_async_v3), and the 10.x -> 11.x migration pages
(api/migration/tensorrt-10x-to-11x-python-api-reference.html), which leave these calls unchanged.

A plan is executable code: open only plans listed in a verified bundle's checksum table (`engine_plans`).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, BundleError, InputError
from . import TensorSpec, cupy_module

TENSORRT_EXTRA = 'pip install "llava-rt[tensorrt]" (TensorRT wheels come from NVIDIA\'s package index)'


def _cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        raise BackendUnavailable(f"the TensorRT backend needs cuda-python (cuda.bindings): {TENSORRT_EXTRA}") from None
    return runtime


def import_tensorrt():
    """The `tensorrt` module, or `BackendUnavailable` naming how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(f"TensorRT is not installed: {TENSORRT_EXTRA}") from None
    return tensorrt


def cuda_call(result):
    """The values of a `cuda.bindings.runtime` call (it returns `(error, *values)`); an error is a `BackendUnavailable`."""
    runtime = _cudart()
    error, *values = result
    if error != runtime.cudaError_t.cudaSuccess:
        name, text = runtime.cudaGetErrorName(error)[1], runtime.cudaGetErrorString(error)[1]
        raise BackendUnavailable(f"CUDA error {name.decode()}: {text.decode()}")
    return values[0] if len(values) == 1 else tuple(values)


def compute_capability() -> str:
    """The current GPU's compute capability, "MAJOR.MINOR"."""
    runtime = _cudart()
    try:
        properties = cuda_call(runtime.cudaGetDeviceProperties(cuda_call(runtime.cudaGetDevice())))
    except BackendUnavailable as exc:
        raise BackendUnavailable(f"no usable NVIDIA GPU: {exc}") from None
    return f"{properties.major}.{properties.minor}"


class DeviceBuffer:
    """Device memory of at least `nbytes`, grown on demand (TensorRT needs an address even for an empty tensor)."""

    def __init__(self):
        self.pointer, self.nbytes = 0, 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.nbytes = max(nbytes, 256)
            self.pointer = int(cuda_call(_cudart().cudaMalloc(self.nbytes)))
        return self.pointer

    def free(self) -> None:
        if self.pointer:
            cuda_call(_cudart().cudaFree(self.pointer))
            self.pointer, self.nbytes = 0, 0


def _numpy_dtype(trt, dtype) -> str:
    return np.dtype(trt.nptype(dtype)).name


def _device_pointer(array: Any) -> int | None:
    """The device address of an array exposing `__cuda_array_interface__` (cupy, numba, torch), else None."""
    interface = getattr(array, "__cuda_array_interface__", None)
    return None if interface is None else int(interface["data"][0])


class TensorRTSession:
    """A TensorRT plan on the current GPU. `run` takes and returns numpy arrays, copied through device buffers kept
    between runs; `bind` runs on device arrays in place. `config.threads`, `precision` (fixed when the plan was
    built) and `engine_cache` (plans live in the bundle) do not apply. One execution context and stream: not safe
    to run from two threads at once."""

    def __init__(self, path: Path, config: Any = None, precision: str = "fp32", engine_cache: Path | None = None):
        trt = import_tensorrt()
        runtime = _cudart()
        self.name = path.name
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        # A version-compatible plan carries its own lean runtime (host code). Whether a plan is trusted is decided
        # before this: only plans of a verified bundle's checksum table are opened.
        self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise BundleError(f"TensorRT {trt.__version__} cannot load {path.name}; rebuild it with llava-engines build")
        self._context = self._engine.create_execution_context()
        self._stream = None
        self._stream = cuda_call(runtime.cudaStreamCreate())
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        specs = {
            name: TensorSpec(
                name,
                _numpy_dtype(trt, self._engine.get_tensor_dtype(name)),
                tuple(None if d < 0 else d for d in self._engine.get_tensor_shape(name)),
            )
            for name in names
        }
        is_input = {name: self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
        self.inputs = [specs[name] for name in names if is_input[name]]
        self.outputs = [specs[name] for name in names if not is_input[name]]
        self._buffers = {name: DeviceBuffer() for name in names}

    @property
    def array_module(self) -> ModuleType:
        """cupy: what `bind` allocates outputs with."""
        return cupy_module()

    def _set_input(self, name: str, array: Any) -> None:
        """Shape and address of one input: a device array in place, a numpy array copied into this session's buffer."""
        spec = next((spec for spec in self.inputs if spec.name == name), None)
        if spec is None:
            raise InputError(f"{self.name} has no input {name!r} (it takes {', '.join(s.name for s in self.inputs)})")
        if np.dtype(array.dtype) != np.dtype(spec.dtype):
            raise InputError(f"{self.name} input {name} is {spec.dtype}, got {array.dtype}")
        if not self._context.set_input_shape(name, tuple(array.shape)):
            raise InputError(f"{self.name} input {name} of shape {list(array.shape)} is outside the plan's profile")
        pointer = _device_pointer(array)
        if pointer is None:
            runtime = _cudart()
            host = np.ascontiguousarray(array)
            pointer = self._buffers[name].ensure(host.nbytes)
            kind = runtime.cudaMemcpyKind.cudaMemcpyHostToDevice
            cuda_call(runtime.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes, kind, self._stream))
            cuda_call(runtime.cudaStreamSynchronize(self._stream))  # `host` may be a temporary copy
        self._context.set_tensor_address(name, pointer)

    def output_shape(self, name: str) -> tuple[int, ...]:
        """The shape output `name` has for the inputs set now."""
        return tuple(self._context.get_tensor_shape(name))

    def _execute(self) -> None:
        if not self._context.execute_async_v3(int(self._stream)):
            raise BundleError(f"TensorRT failed to run {self.name}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runtime = _cudart()
        expected = [spec.name for spec in self.inputs]
        if sorted(feeds) != sorted(expected):
            raise InputError(f"{self.name} takes {', '.join(expected)}, got {', '.join(feeds)}")
        for name, value in feeds.items():
            self._set_input(name, np.asarray(value))
        results = {}
        for spec in self.outputs:
            results[spec.name] = np.empty(self.output_shape(spec.name), dtype=spec.dtype)
            self._context.set_tensor_address(spec.name, self._buffers[spec.name].ensure(results[spec.name].nbytes))
        self._execute()
        kind = runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, array in results.items():
            cuda_call(runtime.cudaMemcpyAsync(array.ctypes.data, self._buffers[name].pointer, array.nbytes, kind, self._stream))
        cuda_call(runtime.cudaStreamSynchronize(self._stream))
        return results

    def bind(self) -> TensorRTBinding:
        return TensorRTBinding(self)

    def close(self) -> None:
        """Free the device buffers and the stream (also done when the session is garbage collected)."""
        for buffer in self._buffers.values():
            buffer.free()
        if self._stream is not None:
            cuda_call(_cudart().cudaStreamDestroy(self._stream))
            self._stream = None

    def __del__(self):
        if hasattr(self, "_buffers"):
            try:
                self.close()
            except BackendUnavailable:  # at interpreter exit the CUDA context may already be gone
                pass


class TensorRTBinding:
    """Inputs and outputs of a `TensorRTSession` on the device: device arrays bound in place, numpy inputs copied
    when bound, outputs written into the arrays given (or cupy arrays allocated to the shapes the inputs give)."""

    def __init__(self, session: TensorRTSession):
        self._session, self._inputs, self._outputs = session, {}, {}

    def input(self, name: str, array: Any) -> None:
        if self._inputs.get(name) is not array:
            self._session._set_input(name, array)
            self._inputs[name] = array

    def output(self, name: str, array: Any = None) -> None:
        if name not in {spec.name for spec in self._session.outputs}:
            raise InputError(f"{self._session.name} has no output {name!r}")
        if array is not None and _device_pointer(array) is None:
            raise InputError(f"output {name} must be a device array (cupy), got {type(array).__name__}")
        self._outputs[name] = array

    def run(self) -> dict[str, Any]:
        session = self._session
        arrays = {}
        for spec in session.outputs:
            array, shape = self._outputs.get(spec.name), session.output_shape(spec.name)
            if array is None:
                array = session.array_module.empty(shape, dtype=spec.dtype)
            elif tuple(array.shape) != shape or np.dtype(array.dtype) != np.dtype(spec.dtype):
                raise InputError(f"output {spec.name} needs {spec.dtype} {list(shape)}, bound {array.dtype} {list(array.shape)}")
            session._context.set_tensor_address(spec.name, _device_pointer(array))
            arrays[spec.name] = array
        session._execute()
        cuda_call(_cudart().cudaStreamSynchronize(session._stream))
        return arrays
