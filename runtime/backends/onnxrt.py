"""The onnxruntime backend: a graph run by an `onnxruntime.InferenceSession` on the CPU, or on an NVIDIA GPU through
the CUDA or TensorRT execution provider (`onnxruntime-gpu`), with IO binding for arrays kept on the device."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, BundleError, InputError
from . import BackendConfig, TensorSpec, cupy_module

# onnxruntime's element type names -> numpy dtype names (the manifest's spelling).
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bool)": "bool",
    **{f"tensor({kind}{bits})": f"{kind}{bits}" for kind in ("int", "uint") for bits in (8, 16, 32, 64)},
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GPU_PACKAGE = "the GPU build of onnxruntime: pip uninstall onnxruntime && pip install onnxruntime-gpu"
# Defaults per graph variant precision; passed options override them. The CUDA provider's fp32 matmuls use TF32
# unless told not to (fp32 is the token-exact reference). onnxruntime's TensorRT provider builds a weakly typed
# network: the flags let it use the kernels the variant's dtypes ask for (a Q/DQ graph fails to build without int8).
CUDA_PRECISION_OPTIONS = {"fp32": {"use_tf32": "0"}}
TRT_PRECISION_OPTIONS = {"fp16": {"trt_fp16_enable": "True"}, "int8": {"trt_int8_enable": "True"}}
GPU = 0  # the device index arrays are bound at: the first visible GPU
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


def providers(config: BackendConfig, precision: str, engine_cache: Path | None) -> list[tuple[str, dict[str, str]]]:
    """onnxruntime's provider list for `config.device`, first choice first, the passed options on that one. A GPU
    device keeps the CPU provider last: onnxruntime places there only the nodes its GPU kernels lack (shape
    arithmetic). The TensorRT provider caches its engines and timing cache in `engine_cache`."""
    import onnxruntime as ort

    wanted = PROVIDERS[config.device]
    if wanted not in ort.get_available_providers():
        raise BackendUnavailable(
            f"device {config.device} needs onnxruntime's {wanted}, which this onnxruntime lacks; install {GPU_PACKAGE}"
        )
    options = dict(config.provider_options)
    if config.device == "cpu":
        if options:
            raise InputError("onnxruntime's CPU provider takes no provider options (they are for --device cuda or tensorrt)")
        return [(wanted, {})]
    if options.get("device_id", "0") != "0":  # cupy allocates the KV cache on its current device, the first
        raise InputError("only the first visible GPU is supported: choose it with CUDA_VISIBLE_DEVICES, not device_id")
    cuda = {**CUDA_PRECISION_OPTIONS.get(precision, {}), **(options if config.device == "cuda" else {})}
    if config.device == "cuda":
        return [(wanted, cuda), ("CPUExecutionProvider", {})]
    trt = {**TRT_PRECISION_OPTIONS.get(precision, {}), **_engine_cache_options(engine_cache, options), **options}
    return [(wanted, trt), ("CUDAExecutionProvider", cuda), ("CPUExecutionProvider", {})]


def _engine_cache_options(directory: Path | None, options: dict[str, str]) -> dict[str, str]:
    """The TensorRT provider's engine and timing caches in `directory`, created now, unless the caller chose a path."""
    if directory is None or "trt_engine_cache_path" in options:
        return {}
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(
            f"cannot create the TensorRT engine cache {directory} ({exc.strerror}); make the bundle writable or pass "
            "--provider-option trt_engine_cache_path=DIR"
        ) from None
    path = str(directory)
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": path,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": path,
    }


class OnnxRuntimeSession:
    """An ONNX graph run by onnxruntime: every graph optimization, sequential execution on `threads` intra-op threads
    (onnxruntime's default: one per physical core), on `config.device`. Errors while loading or running become
    `BundleError`s naming the graph; a device whose provider is missing or does not start, `BackendUnavailable`
    (never a silent run on the CPU). `name` names the graph in errors (default: the file's name).

    Each session has its own intra-op threads, which spin for a while after a run, ready for the next. With
    `stop_spinning` they stop when a run ends: for sessions that take turns with others on the same cores (a
    graph's segments between decode steps), whose spinning threads would slow the next session's run."""

    def __init__(
        self,
        path: Path,
        config: BackendConfig,
        precision: str = "fp32",
        engine_cache: Path | None = None,
        name: str | None = None,
        stop_spinning: bool = False,
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if config.threads:
            options.intra_op_num_threads = config.threads
        if stop_spinning:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        self.name = name or path.name
        chosen = providers(config, precision, engine_cache)
        self.arrays = CudaArrays() if config.device != "cpu" else HostArrays()
        self.array_module = self.arrays.module
        try:
            self._session = ort.InferenceSession(str(path), options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs and bad provider options
            raise BundleError(f"onnxruntime cannot load {self.name}: {onnxruntime_message(exc)}") from None
        provider = chosen[0][0]
        if self._session.get_providers()[0] != provider:  # onnxruntime only logs a provider that failed to start
            raise BackendUnavailable(f"onnxruntime could not start its {provider} (see its log above); install {GPU_PACKAGE}")
        self.inputs = [_spec(value) for value in self._session.get_inputs()]
        self.outputs = [_spec(value) for value in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on host arrays; every output as a host array (onnxruntime copies to and from its device)."""
        try:
            values = self._session.run(None, feeds)
        except _run_errors() as exc:
            raise BundleError(f"onnxruntime failed to run {self.name}: {onnxruntime_message(exc)}") from None
        return dict(zip((o.name for o in self.outputs), values))

    def bind(self) -> "OnnxRuntimeBinding":
        return OnnxRuntimeBinding(self)


class OnnxRuntimeBinding:
    """onnxruntime's IO binding over arrays of the session's `arrays` (see `Binding`). Each array stays referenced
    while bound, so its memory outlives the runs that read or write it."""

    def __init__(self, session: OnnxRuntimeSession):
        self._session, self._arrays = session, session.arrays
        self._binding = session._session.io_binding()
        self._bound: dict[str, tuple[Any, Any]] = {}  # input name -> (array given, array bound)
        self._given: dict[str, Any] = {}  # output name -> preallocated array or None, in the order first bound

    def input(self, name: str, array: Any) -> None:
        if name in self._bound and self._bound[name][0] is array:
            return
        self._bound[name] = (array, self._arrays.bind_input(self._binding, name, array))

    def output(self, name: str, array: Any = None) -> None:
        if array is not None and self._given.get(name) is array:
            return
        self._arrays.bind_output(self._binding, name, array)
        self._given[name] = array

    def run(self) -> dict[str, Any]:
        self._arrays.synchronize()
        try:
            self._session._session.run_with_iobinding(self._binding)
        except _run_errors() as exc:
            raise BundleError(f"onnxruntime failed to run {self._session.name}: {onnxruntime_message(exc)}") from None
        outputs = {}
        for (name, given), value in zip(self._given.items(), self._binding.get_outputs()):  # in the order first bound
            outputs[name] = self._arrays.wrap(value) if given is None else given
        return outputs


def _bind_host_input(binding, name: str, array: np.ndarray) -> np.ndarray:
    """Bind a host array; returns the array bound (a contiguous copy where it was not), which must stay alive."""
    array = np.ascontiguousarray(array)
    binding.bind_cpu_input(name, array)
    return array


class HostArrays:
    """Arrays on the CPU: numpy, bound to onnxruntime without a copy."""

    module = np

    def bind_input(self, binding, name: str, array: np.ndarray) -> np.ndarray:
        return _bind_host_input(binding, name, array)

    def bind_output(self, binding, name: str, array: np.ndarray | None) -> None:
        if array is None:
            binding.bind_output(name, "cpu")
        else:
            binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)

    def synchronize(self) -> None:
        pass

    def wrap(self, value) -> np.ndarray:
        return value.numpy()


class CudaArrays:
    """Arrays on an NVIDIA GPU: cupy arrays, bound to onnxruntime by device pointer.

    cupy rather than cuda-python's `cudaMemcpy2DAsync`: the decode loop needs zeroed allocations, strided writes of
    the new keys and values into the cache and an argmax on the device, and cupy gives all three as numpy's own
    expressions (`buffer[:, :, n:n + 1] = new`, `argmax`), so the loop is the same code on the CPU and the GPU;
    cuda-python would need hand-computed 2-D copy geometry and a compiled argmax kernel.
    onnxruntime runs on its own CUDA stream: cupy's work is finished before each run, and onnxruntime's is when
    the run returns."""

    def __init__(self):
        self.module = cupy_module()

    def bind_input(self, binding, name: str, array):
        if isinstance(array, np.ndarray) or array.size == 0:  # host arrays and empty pasts: onnxruntime copies them
            return _bind_host_input(binding, name, self.module.asnumpy(array))
        array = self.module.ascontiguousarray(array)
        binding.bind_input(name, "cuda", GPU, array.dtype, array.shape, array.data.ptr)
        return array

    def bind_output(self, binding, name: str, array) -> None:
        if array is None:
            binding.bind_output(name, "cuda", GPU)
        else:
            binding.bind_output(name, "cuda", GPU, array.dtype, array.shape, array.data.ptr)

    def synchronize(self) -> None:
        self.module.cuda.get_current_stream().synchronize()

    def wrap(self, value):
        """A cupy view of an onnxruntime-allocated device output, keeping the OrtValue (its owner) alive."""
        cupy = self.module
        dtype = np.dtype(ORT_DTYPES[value.data_type()])
        size = int(np.prod(value.shape())) * dtype.itemsize
        memory = cupy.cuda.UnownedMemory(value.data_ptr(), size, value, GPU)
        return cupy.ndarray(tuple(value.shape()), dtype, cupy.cuda.MemoryPointer(memory, 0))
