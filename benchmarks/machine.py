"""What the machine allows: streaming-read memory bandwidth (the ceiling of batch-1 decode), on the CPU or a CUDA
GPU, and peak memory: resident on the CPU, held on the GPU."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BANDWIDTH_BUFFER_BYTES = 1 << 30  # far larger than any last-level cache
ROWS = 4096


def _reduce_sum_session(threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
        "stream_read",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "columns"]),
            helper.make_tensor_value_info("axes", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure_bandwidth(threads: int, repeats: int = 5, nbytes: int = BANDWIDTH_BUFFER_BYTES) -> float:
    """Bytes per second of a streaming read (row sums over a 1 GiB buffer, rows split between `threads` threads);
    the best of `repeats`. (A sum over one flat vector would run on one thread only.)"""
    session = _reduce_sum_session(threads)
    feeds = {"x": np.ones((ROWS, nbytes // 4 // ROWS), dtype=np.float32), "axes": np.array([1], dtype=np.int64)}
    session.run(None, feeds)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - started)
    return feeds["x"].nbytes / best


def measure_device_bandwidth(repeats: int = 5, nbytes: int = 4 * BANDWIDTH_BUFFER_BYTES) -> float:
    """Bytes per second of a streaming read of GPU memory (torch row sums over 4 GiB, far larger than the L2 cache,
    timed with the device synchronized); the best of `repeats`."""
    import torch

    x = torch.ones((ROWS, nbytes // 4 // ROWS), dtype=torch.float32, device="cuda")
    x.sum(dim=1)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        x.sum(dim=1)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return x.nbytes / best


def device_memory_used_bytes(index: int = 0) -> int:
    """Memory in use on GPU `index`, every process's, as the driver reports it (`nvidia-smi`). It covers what torch's
    counters cannot see: onnxruntime's CUDA arena, cuBLAS workspaces, the CUDA context."""
    query = ["nvidia-smi", f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    return int(subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()) * 2**20


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    On Linux this is `VmHWM`: `ru_maxrss` would also count the parent's memory at fork time.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
