"""Splitting an ONNX graph into consecutive segments that run one after the other and give the same outputs.

The scheduler runs a vision tower as many short runs between its decode steps rather than as one long one, so that a
new image does not stall the running streams for the tower's whole time (see `Pipeline(vision_segments=...)`).
Segments are cut between nodes where few tensors cross (one, the hidden state, between two encoder layers), with
about the same weight in each. Nodes computed from weights alone (a quantized graph's DequantizeLinear of each
weight) are copied into the segments that use them, so no weight crosses a cut.

Splitting needs the `onnx` package (the `serve` extra), imported only when a graph is split.
"""

from __future__ import annotations

import ctypes
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import Session
from .errors import BackendUnavailable, BundleError


@dataclass(frozen=True)
class Segment:
    """One segment: its serialized model and the tensors it reads (earlier segments' outputs or the graph's inputs)."""

    model: bytes
    inputs: tuple[str, ...]


def _onnx():
    try:
        import onnx
    except ImportError:
        raise BackendUnavailable("splitting the vision graph into segments needs onnx: pip install 'llava-rt[serve]'") from None
    return onnx


def split_graph(path: Path, count: int) -> tuple[list[str], Iterator[Segment]]:
    """The names of `path`'s graph outputs, and its graph as at most `count` segments of about equal weight (fewer
    where it has fewer places to cut), each serialized only when the iterator reaches it (so that a caller loading
    each one before taking the next holds one serialized segment at a time)."""
    onnx = _onnx()
    model = onnx.load(str(path))
    graph = model.graph
    if any(attr.type in (attr.GRAPH, attr.GRAPHS) for node in graph.node for attr in node.attribute):
        raise BundleError(f"{path.name} has control-flow nodes, which cannot be split into segments")
    nodes = list(graph.node)
    weights = {tensor.name: tensor for tensor in graph.initializer}
    size = {name: int(np.prod(tensor.dims)) for name, tensor in weights.items()}
    constant = set(weights)
    constant_nodes = []
    for index, node in enumerate(nodes):
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or (inputs and all(name in constant for name in inputs)):
            constant_nodes.append(index)
            constant.update(node.output)
            for name in node.output:
                size[name] = max(size.get(name, 0) for name in inputs) if inputs else 0
    work = sorted(set(range(len(nodes))) - set(constant_nodes))
    cost = np.array([sum(size.get(name, 0) for name in nodes[i].input if name in constant) for i in work], dtype=np.float64)
    outputs = [value.name for value in graph.output]
    last_use = _last_use(nodes, work, constant, outputs)
    cuts = _cuts(nodes, work, last_use, cost, count)
    parts = []
    for start, stop in zip(cuts, cuts[1:]):
        members = [work[k] for k in range(start, stop)]
        made = {name for i in members for name in nodes[i].output}
        reads = list(dict.fromkeys(n for i in members for n in nodes[i].input if n and n not in constant and n not in made))
        writes = [name for i in members for name in nodes[i].output if last_use.get(name, -1) >= stop]
        needed = _constant_closure(nodes, constant_nodes, {n for i in members for n in nodes[i].input if n in constant})
        parts.append((sorted(needed) + members, reads, writes))
    types = {value.name: value for value in [*graph.value_info, *graph.input, *graph.output]}
    crossing = {name for _, reads, writes in parts for name in reads + writes}
    if not crossing <= types.keys():
        types.update({value.name: value for value in onnx.shape_inference.infer_shapes(model).graph.value_info})
    if not crossing <= types.keys():
        raise BundleError(f"{path.name}: no type recorded for {min(crossing - types.keys())}, so it cannot be split")

    def serialized():
        for index, (members, reads, writes) in enumerate(parts):
            used = {name for i in members for name in nodes[i].input} & weights.keys()
            part = onnx.helper.make_graph(
                [nodes[i] for i in members],
                f"{graph.name}_segment{index}",
                [types[name] for name in reads],
                [types[name] for name in writes],
                [weights[name] for name in sorted(used)],
            )
            part_model = onnx.helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version)
            yield Segment(part_model.SerializeToString(), tuple(reads))

    return outputs, serialized()


def _last_use(nodes, work: list[int], constant: set[str], outputs: list[str]) -> dict[str, int]:
    """Each computed tensor's last reader, as a position in `work` (the graph's outputs: past the end)."""
    last = {}
    for position, index in enumerate(work):
        for name in nodes[index].input:
            if name and name not in constant:
                last[name] = position
    last.update({name: len(work) for name in outputs})
    return last


def _cuts(nodes, work: list[int], last_use: dict[str, int], cost: np.ndarray, count: int) -> list[int]:
    """Positions in `work` where segments start, and its end: near each `1/count` share of the cost, the position
    within a quarter share of it that the fewest tensors cross."""
    made_at = {name: position for position, index in enumerate(work) for name in nodes[index].output}
    change = np.zeros(len(work) + 2, dtype=np.int64)
    for name, last in last_use.items():
        first = made_at.get(name, -1) + 1  # a graph input crosses every cut up to its last reader
        if last >= first:
            change[first] += 1
            change[last + 1] -= 1
    crossing = np.cumsum(change)[: len(work) + 1]
    total = np.concatenate([[0.0], np.cumsum(cost if cost.sum() else np.ones(len(work)))])
    share = total[-1] / count
    cuts = [0]
    for k in range(1, count):
        low, high = np.searchsorted(total, [share * (k - 0.25), share * (k + 0.25)])
        candidates = range(max(int(low), cuts[-1] + 1), min(int(high), len(work) - 1) + 1)
        if candidates:
            cuts.append(min(candidates, key=lambda p: (crossing[p], abs(total[p] - share * k))))
    return cuts + [len(work)]


def _constant_closure(nodes, constant_nodes: list[int], names: set[str]) -> set[int]:
    """The constant nodes that compute `names`, and those they read from."""
    wanted, needed = set(names), set()
    for index in reversed(constant_nodes):
        if any(name in wanted for name in nodes[index].output):
            needed.add(index)
            wanted.update(name for name in nodes[index].input if name)
    return needed


class SegmentedGraph:
    """A graph run as its segments, one after another: `steps` yields after each segment's run and returns the
    outputs; `run` runs them all. `reads[k]` are the tensors segment `k` reads (`sessions[k]` runs it); `inputs` and
    `outputs` are the whole graph's (a `Session`'s, for the manifest check)."""

    def __init__(self, reads: list[tuple[str, ...]], sessions: list, outputs: list[str]):
        self.reads, self.sessions = reads, sessions
        specs = {spec.name: spec for session in sessions for spec in [*session.inputs, *session.outputs]}
        made = {spec.name for session in sessions for spec in session.outputs}
        self.inputs = [specs[name] for name in dict.fromkeys(n for names in reads for n in names) if name not in made]
        self.outputs = [specs[name] for name in outputs]
        # what is still to be read after each segment: the values kept from one run to the next
        self._kept = [set(outputs).union(*reads[k + 1 :]) for k in range(len(reads))]

    def steps(self, feeds: dict[str, np.ndarray]):
        """Run the segments on `feeds`, yielding after each; returns every output."""
        values = dict(feeds)
        for names, session, kept in zip(self.reads, self.sessions, self._kept):
            values.update(session.run({name: values[name] for name in names}))
            values = {name: value for name, value in values.items() if name in kept}
            yield
        return {spec.name: values[spec.name] for spec in self.outputs}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_steps(self.steps(feeds))


def load_segmented(path: Path, count: int, open_segment: Callable[[Path, int], Session]) -> SegmentedGraph:
    """`path`'s graph split into at most `count` segments, each loaded by `open_segment(file, index)` from a file
    of its own, as a whole graph is: onnxruntime keeps a copy of the weights of a model given as bytes (400 MB more
    for OneVision's int8 SigLIP). The files go once they are loaded."""
    outputs, segments = split_graph(path, count)
    reads, sessions = [], []
    with tempfile.TemporaryDirectory(prefix="llava-rt-segments-") as directory:
        for index, segment in enumerate(segments):  # each loaded before the next is serialized
            file = Path(directory) / f"segment{index}.onnx"
            file.write_bytes(segment.model)
            sessions.append(open_segment(file, index))
            file.unlink()
            reads.append(segment.inputs)
    del segments, segment  # the whole graph as read by onnx, and the last segment
    _release_freed_memory()
    return SegmentedGraph(reads, sessions, outputs)


def _release_freed_memory() -> None:
    """Give freed memory back to the system (after a split: the whole graph as onnx read it). glibc's malloc keeps it
    for the process otherwise: 2.2 GB of resident memory for OneVision's fp32 SigLIP, 0.3 GB for its int8 one. Does
    nothing where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_steps(steps):
    """Run a generator of steps to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value
